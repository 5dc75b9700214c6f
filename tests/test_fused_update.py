"""The fused EMA + AdamW pass (cosmos_fast.fused_update) against today's separate passes.

Equality on CPU in fp32 is *bitwise*: the fused pass applies the same ops with the same scalars as
torch's single-tensor AdamW and the foreach EMA, to flat buffers instead of separate tensors, so
every weight, teacher weight, moment and step count is compared with ``torch.equal``.
"""
import copy
import io
import logging

import pytest
import torch

from utils import TINY_MODEL_16

from cosmos_fast import CosmosLoss, build_teacher, create_model
from cosmos_fast.config import ConfigError, load_config, validate
from cosmos_fast.ema import ema_update
from cosmos_fast.engine import build_engine, fused_update_enabled
from cosmos_fast.fused_update import FusedEmaAdamW
from cosmos_fast.model.cosmos import LOGIT_SCALE_MAX
from cosmos_fast.optim import build_adamw
from cosmos_fast.step import cosmos_train_step

CUDA = torch.cuda.is_available()
LRS = [1e-2, 3e-3, 5e-2, 2e-3]           # a schedule that changes every step
MOMENTA = [0.9, 0.95, 0.5, 0.99]


def _batch(b=3, device="cpu"):
    g = torch.Generator().manual_seed(0)
    crops = [torch.randn(b, 3, 16, 16, generator=g) for _ in range(2)]
    crops += [torch.randn(b, 3, 8, 8, generator=g) for _ in range(2)]
    text = torch.randint(1, 18, (4 * b, 6), generator=g)
    text[:, 4] = 19
    return [c.to(device) for c in crops], text.to(device)


def _pair(device="cpu"):
    torch.manual_seed(0)
    student = create_model(TINY_MODEL_16).to(device)
    teacher = build_teacher(student)
    with torch.no_grad():                       # a teacher apart from the student, so the EMA shows
        for p in teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
        student.logit_scale.fill_(4.7)          # above ln 100: the first step's clamp cuts it
    return student, teacher


def _opts(student, teacher, fused: bool, **kw):
    kw = {"lr": LRS[0], "weight_decay": 0.1, **kw}
    return FusedEmaAdamW(student, teacher, **kw) if fused else build_adamw(student, **kw)


def _run(student, teacher, opt, order, steps, start=0, device="cpu"):
    crops, text = _batch(device=device)
    for i in range(start, start + steps):
        for g in opt.param_groups:
            g["lr"] = LRS[i]
        cosmos_train_step(student, teacher, CosmosLoss("reference"), opt, crops, text, momentum=MOMENTA[i],
                          ema_order=order)


def _assert_equal(a: dict, b: dict, what: str):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, (what, k)
        assert torch.equal(a[k], b[k]), (what, k, float((a[k] - b[k]).abs().max()))


def _opt_state(opt) -> dict:
    sd = opt.state_dict()
    return {f"{i}.{k}": torch.as_tensor(v) for i, s in sd["state"].items() for k, v in s.items()}


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("order", ["before_step", "after_step"])
def test_fused_update_bitwise_equals_separate_passes(order):
    """Three COSMOS steps, two groups with weight decay, lr and momentum changing every step, the
    logit-scale clamp hit: student, teacher and optimizer state bitwise equal."""
    ref_s, ref_t = _pair()
    ref_opt = _opts(ref_s, ref_t, fused=False)
    s, t = _pair()
    opt = _opts(s, t, fused=True)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.1]
    assert all(len(g["params"]) for g in opt.param_groups)
    _run(ref_s, ref_t, ref_opt, order, 1)
    assert float(ref_s.logit_scale.detach()) == pytest.approx(LOGIT_SCALE_MAX)         # the clamp acted
    assert all(p.grad is not None for p in ref_s.parameters())   # so a zero gradient = no gradient
    _run(ref_s, ref_t, ref_opt, order, 2, start=1)
    _run(s, t, opt, order, 3)
    _assert_equal(s.state_dict(), ref_s.state_dict(), "student")
    _assert_equal(t.state_dict(), ref_t.state_dict(), "teacher")
    _assert_equal(_opt_state(opt), _opt_state(ref_opt), "optimizer")
    assert s.logit_scale.data_ptr() == opt.flat[0]["param"].data_ptr() + 4 * (
        s.logit_scale.storage_offset() - opt.flat[0]["param"].storage_offset())     # still a view


@pytest.mark.parametrize("writer", ["unfused", "fused"])
def test_state_dict_round_trip_and_resume_across_paths(writer):
    """Two steps on one path, a checkpoint (through torch.save), the third step on both paths from
    it: bitwise equal, whichever path wrote the state."""
    s, t = _pair()
    opt = _opts(s, t, fused=writer == "fused")
    _run(s, t, opt, "before_step", 2)
    saved = _roundtrip({"s": s.state_dict(), "t": t.state_dict(), "opt": opt.state_dict()})
    assert saved["opt"]["state"].keys() == _opt_state_keys(opt)
    results = []
    for fused in (False, True):
        s2, t2 = _pair()
        s2.load_state_dict(saved["s"])
        t2.load_state_dict(saved["t"])
        opt2 = _opts(s2, t2, fused=fused)
        opt2.load_state_dict(copy.deepcopy(saved["opt"]))
        _assert_equal(_opt_state(opt2), _opt_state(opt), f"loaded into {'fused' if fused else 'unfused'}")
        _run(s2, t2, opt2, "before_step", 1, start=2)
        results.append((s2.state_dict(), t2.state_dict(), _opt_state(opt2)))
    for a, b, what in zip(results[0], results[1], ("student", "teacher", "optimizer")):
        _assert_equal(b, a, what)


def _opt_state_keys(opt):
    return set(range(sum(len(g["params"]) for g in opt.param_groups)))


def test_fresh_state_round_trips_and_bad_states_refused():
    s, t = _pair()
    fused = _opts(s, t, fused=True)
    fused.load_state_dict(build_adamw(create_model(TINY_MODEL_16), weight_decay=0.1).state_dict())  # no moments yet
    assert all(float(f["step"]) == 0 for f in fused.flat)
    ref_s, ref_t = _pair()
    ref = _opts(ref_s, ref_t, fused=False)
    _run(ref_s, ref_t, ref, "before_step", 1)
    sd = ref.state_dict()
    sd["state"][0]["step"] = sd["state"][0]["step"] + 1
    with pytest.raises(ValueError, match="different step counts"):
        fused.load_state_dict(sd)
    del sd["state"][0]
    with pytest.raises(ValueError, match="only part of a parameter group"):
        fused.load_state_dict(sd)


def test_replaced_or_dropped_gradients_are_taken_back():
    s, t = _pair()
    opt = _opts(s, t, fused=True)
    p, q = s.text_projection, s.logit_scale
    p.grad = torch.ones_like(p)                     # replaced: copied into the flat buffer
    q.grad = None                                   # dropped: a zero gradient
    opt.zero_grad()
    assert p.grad.data_ptr() != 0 and float(p.grad.abs().sum()) == 0 and q.grad is not None
    assert all(x.grad is v for g, f in zip(opt.param_groups, opt.flat) for x, v in zip(g["params"], f["grads"]))


def test_rejects_what_it_cannot_flatten():
    s, t = _pair()
    with pytest.raises(ValueError, match="fp32"):
        FusedEmaAdamW(copy.deepcopy(s).double(), copy.deepcopy(t).double())
    s.visual.conv1.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="trainable"):
        FusedEmaAdamW(s, t)
    with pytest.raises(ValueError, match="momentum"):
        FusedEmaAdamW(*_pair()).set_ema(1.5)


def test_config_key_and_resolution(caplog):
    cfg = load_config("tiny-cpu", ["optim.fused_update=on"])         # YAML reads bare on/off as bools
    assert cfg.optim.fused_update == "on"
    assert load_config("tiny-cpu", ["optim.fused_update=off"]).optim.fused_update == "off"
    with pytest.raises(ConfigError, match="optim.fused_update"):
        validate(load_config("tiny-cpu", ["optim.fused_update=maybe"]))
    with pytest.raises(ConfigError, match="optim.fused_update.*distributed.optimizer"):
        validate(load_config("tiny-cpu", ["optim.fused_update=on", "distributed.optimizer=deepspeed_fused_adam"]))
    with pytest.raises(ConfigError, match="DeepSpeed"):
        validate(load_config("tiny-cpu", ["optim.fused_update=on", "distributed.backend=deepspeed"]))
    auto = load_config("tiny-cpu")
    assert auto.optim.fused_update == "auto"
    assert fused_update_enabled(auto, deepspeed=False)[0]
    on, why = fused_update_enabled(auto, deepspeed=True)
    assert not on and "DeepSpeed" in why
    assert fused_update_enabled(load_config("tiny-cpu", ["train.precision=amp_fp16"]), deepspeed=False)[0]
    assert not fused_update_enabled(load_config("tiny-cpu", ["distributed.optimizer=deepspeed_fused_adam"]),
                                    deepspeed=False)[0]
    assert not fused_update_enabled(load_config("tiny-cpu", ["optim.fused_update=off"]), deepspeed=False)[0]
    s, t = _pair()
    with caplog.at_level(logging.INFO, logger="cosmos_fast"):
        engine = build_engine(load_config("tiny-cpu", ["optim.fused_update=off"]), s, t, torch.device("cpu"))
    assert not engine.fused_ema and "optim.fused_update off: optim.fused_update = off" in caplog.text
    engine = build_engine(auto, s, t, torch.device("cpu"))
    assert engine.fused_ema and isinstance(engine.optimizer, FusedEmaAdamW)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="CUDA"))])
def test_capturable_path_close_to_separate_passes(device):
    """The device-scalar path (the CUDA one: torch._fused_adamw_, tensor lr / step / momentum; it runs on
    CPU too) against the separate passes (on CUDA: AdamW(fused=True), today's CUDA optimizer) on the same
    fixed gradients: not bitwise (the kernel orders the AdamW arithmetic its own way; the lr is an fp32
    tensor; the EMA's (1 − m)·θ_S is rounded before the add), within 1e-5 relative over three steps.
    (Through the model, rounding-level gradients such as the attention key bias's would turn such
    differences into ±lr updates, so the gradients are fixed here.)"""
    ref_s, ref_t = _pair(device)
    ref_opt = build_adamw(ref_s, lr=LRS[0], weight_decay=0.1, **({"fused": True} if device == "cuda" else {}))
    s, t = _pair(device)
    opt = _opts(s, t, fused=True, capturable=True)
    assert opt.capturable and opt.flat[0]["step"].device == opt.device
    g = torch.Generator().manual_seed(2)
    grads = {n: torch.randn(p.shape, generator=g).to(device) for n, p in ref_s.named_parameters()}
    for i in range(3):
        for model, o in ((ref_s, ref_opt), (s, opt)):
            o.zero_grad()
            for n, p in model.named_parameters():
                if p.grad is None:
                    p.grad = grads[n].clone()
                else:
                    p.grad.copy_(grads[n])
            for group in o.param_groups:
                group["lr"] = LRS[i]
        ema_update(ref_t, ref_s, MOMENTA[i])
        ref_opt.step()
        opt.set_ema(MOMENTA[i])
        opt.step()
    for a, b in ((s, ref_s), (t, ref_t)):
        ref = b.state_dict()
        for k, v in a.state_dict().items():
            torch.testing.assert_close(v, ref[k], rtol=1e-5, atol=1e-6, msg=k)
    opt.sync_scalars(0.5)
    assert float(opt._m) == 0.5 and float(opt._lr[1]) == pytest.approx(LRS[2])


def test_fp16_loss_scaler_skip_still_runs_the_ema():
    """The GradScaler path (CPU scaler, fp32 model): the first step overflows and is skipped by the
    scaler, its EMA still runs (as officially); then two normal steps. Bitwise equal to the separate
    passes."""
    results = []
    for fused in (False, True):
        s, t = _pair()
        s0, t0 = s.text_projection.detach().clone(), t.text_projection.clone()
        opt = _opts(s, t, fused=fused)
        scaler = torch.amp.GradScaler("cpu", init_scale=1e38, backoff_factor=1e-36, growth_interval=1000)
        crops, text = _batch()
        flags = []
        for i in range(3):
            flags.append(cosmos_train_step(s, t, CosmosLoss("reference"), opt, crops, text, momentum=MOMENTA[i],
                                           scaler=scaler)["overflow"])
            if i == 0:                  # skipped: the student stays, the teacher still averages it in
                assert torch.equal(s.text_projection.detach(), s0)
                torch.testing.assert_close(t.text_projection, MOMENTA[0] * t0 + (1 - MOMENTA[0]) * s0)
        assert flags == [True, False, False]
        results.append((s.state_dict(), t.state_dict()))
    _assert_equal(results[1][0], results[0][0], "student")
    _assert_equal(results[1][1], results[0][1], "teacher")
