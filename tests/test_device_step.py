"""The step without host syncs (cosmos_fast.device_step): equal to the eager step, a non-finite loss
skipped on the device (weights, optimizer state and teacher unchanged, one skip counted, no
``.item()`` / ``bool()`` during the step), the fallback reasons, and on CUDA the graphed step
equal to the eager one."""
import contextlib
import json
import logging
import sys
from pathlib import Path

import pytest
import torch

from test_trainer import rows, small_cfg
from utils import TINY_MODEL_16, assert_close

from cosmos_fast import CosmosLoss, build_teacher, create_model
from cosmos_fast.config import ConfigError, load_config
from cosmos_fast.data.synthetic import write_demo_data
from cosmos_fast.device_step import OUT_KEYS, DeviceStep, compile_blocker, cuda_graph_blocker
from cosmos_fast.engine import LocalEngine
from cosmos_fast.model.cosmos import CosmosCLIP
from cosmos_fast.optim import build_adamw
from cosmos_fast.step import train_step
from cosmos_fast.trainer import NonFiniteLossError, Trainer, check_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import bench_step_paths  # noqa: E402



pytestmark = pytest.mark.usefixtures("one_thread")    # conftest.py


def _batch(seed, b=3, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    crops = [torch.randn(b, 3, 16, 16, generator=g) for _ in range(2)]
    crops += [torch.randn(b, 3, 8, 8, generator=g) for _ in range(2)]
    text = torch.randint(1, 18, (4 * b, 6), generator=g)
    text[:, 4] = 19
    return [c.to(device) for c in crops], text.to(device)


class FlakyLoss(CosmosLoss):
    """The COSMOS loss, NaN on the calls listed in ``nan_calls`` (counted from 1)."""

    def __init__(self, nan_calls=()):
        super().__init__()
        self.nan_calls, self.calls = set(nan_calls), 0

    def forward(self, *a, **k):
        self.calls += 1
        out = super().forward(*a, **k)
        if self.calls in self.nan_calls:
            out["clip_loss"] = out["clip_loss"] * float("nan")
        return out


def _engine(device="cpu", seed=0):
    torch.manual_seed(seed)
    student = create_model(TINY_MODEL_16, truncate_captions=False).to(device)   # its length is a host read
    teacher = build_teacher(student)
    teacher.requires_grad_(False)
    with torch.no_grad():                       # a teacher unlike the student: the EMA is visible
        for p in teacher.parameters():
            p.mul_(0.5)
    extra = {"fused": True} if device == "cuda" else {}
    return LocalEngine(student, teacher, build_adamw(student, lr=1e-2, weight_decay=0.1, **extra))


def _state(engine):
    """Student, teacher and optimizer state, cloned."""
    opt = {f"{i}.{k}": v.clone() for i, s in enumerate(engine.optimizer.state.values())
           for k, v in s.items() if torch.is_tensor(v)}
    return ({n: p.detach().clone() for n, p in engine.student.named_parameters()},
            {n: p.clone() for n, p in engine.teacher.named_parameters()}, opt)


def _assert_same(a, b, exact=False):
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if exact:
                assert torch.equal(x[k].cpu(), y[k].cpu()), k
            else:
                assert_close(x[k].cpu().float(), y[k].cpu().float(), msg=k)


@contextlib.contextmanager
def no_host_sync(monkeypatch):
    """Reading a tensor's value on the host raises (``.item()``, ``bool()``, ``float()``, ``tolist()``...)."""
    item = torch.Tensor.item

    def refuse(*a, **k):
        raise AssertionError("host sync inside the step")
    with monkeypatch.context() as m:
        for name in ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy"):
            m.setattr(torch.Tensor, name, refuse)
        # CPU-only host reads that CUDA never makes: the model's token-range check, and the
        # non-capturable AdamW's step counter (a CPU tensor; the graph's AdamW keeps it on the device)
        m.setattr(CosmosCLIP, "_check_text", lambda self, text: None)
        m.setattr(sys.modules["torch.optim.adam"], "_get_value", lambda x: item(x) if torch.is_tensor(x) else x)
        yield


def _eager(engine, loss_fn, batches, m=0.9, lr=1e-2):
    outs = []
    for crops, text in batches:
        engine.set_lr(lr)
        outs.append(train_step(engine, loss_fn, crops, text, momentum=m))
    return outs


def test_device_step_equals_eager_step(order="before_step"):
    batches = [_batch(s) for s in range(2)]
    eager, dev = _engine(), _engine()
    outs = [train_step(eager, CosmosLoss(), c, t, momentum=0.9, ema_order=order) for c, t in batches]
    step = DeviceStep(dev, CosmosLoss(), ema_order=order)
    vecs = [step(c, t, lr=1e-2, momentum=0.9) for c, t in batches]
    for out, vec in zip(outs, vecs):
        for i, k in enumerate(OUT_KEYS[:-1]):
            assert_close(vec[i], out[k].float(), msg=k)
        assert vec[-1] == 1.0
    _assert_same(_state(dev), _state(eager), exact=True)        # the same kernels in the same order
    assert int(step.skipped) == 0


def test_nonfinite_loss_skipped_on_the_device_without_host_sync(monkeypatch):
    """NaN on the first call (no optimizer state yet) and the third: each leaves the student, the
    teacher and the optimizer state as they were, counts one skip, and matches today's eager skip
    (EMA after the step here: the restore must come before it)."""
    batches = [_batch(s) for s in range(3)]
    eager, dev = _engine(), _engine()
    loss = FlakyLoss({1, 3})
    outs = [train_step(eager, loss, c, t, momentum=0.9, ema_order="after_step") for c, t in batches]
    assert [o["finite"] for o in outs] == [False, True, False]
    step = DeviceStep(dev, FlakyLoss({1, 3}), ema_order="after_step")
    fresh = _state(dev)
    vecs, states = [], []
    for crops, text in batches:
        with no_host_sync(monkeypatch):
            vecs.append(step(crops, text, lr=1e-2, momentum=0.9))
        states.append(_state(dev))
    assert [float(v[-1]) for v in vecs] == [0.0, 1.0, 0.0]
    assert torch.isnan(vecs[0][0]) and torch.isnan(vecs[2][0])
    s0, t0, opt0 = states[0]                     # first call skipped: weights untouched, state at AdamW's zeros
    _assert_same((s0, t0), fresh[:2], exact=True)
    assert opt0 and all(not v.any() for v in opt0.values())
    assert any(not torch.equal(states[1][0][k], s0[k]) for k in s0)     # the finite step moved the student
    _assert_same(states[2], states[1], exact=True)                      # third call skipped: nothing moved
    assert int(step.skipped) == 2
    # today's eager skip gives the same weights, teacher and AdamW state (its step counter: 1)
    _assert_same(states[2], _state(eager), exact=True)
    steps = [v for k, v in states[2][2].items() if k.endswith(".step")]
    assert steps and all(float(s) == 1.0 for s in steps)


def test_fallback_reasons_and_refused_on():
    base = ["data.train_shards=x-{0..3}.tar", "data.num_workers=1"]
    cfg = load_config("tiny-cpu", base)
    assert "device is cpu" in cuda_graph_blocker(cfg, "cpu", 1, False)
    assert "DeepSpeed" in cuda_graph_blocker(cfg, "cuda", 2, True)
    assert "model.truncate_captions" in cuda_graph_blocker(cfg, "cuda", 1, False)
    base += ["model.truncate_captions=false"]
    assert "optim.fused_update = auto" in cuda_graph_blocker(load_config("tiny-cpu", base), "cuda", 1, False)
    base += ["optim.fused_update=off"]
    cfg = load_config("tiny-cpu", base)
    assert cuda_graph_blocker(cfg, "cuda", 1, False) is None
    fp16 = load_config("tiny-cpu", base + ["train.precision=amp_fp16"])
    assert "GradScaler" in cuda_graph_blocker(fp16, "cuda", 1, False)
    ckpt = load_config("tiny-cpu", base + ["model.grad_checkpointing=true"])
    assert "grad_checkpointing" in cuda_graph_blocker(ckpt, "cuda", 1, False)
    z3 = load_config("tiny-cpu", base + ["distributed.zero_stage=3"])
    assert "ZeRO-3" in compile_blocker(z3, 2, True) and compile_blocker(z3, 1, False) is None
    with pytest.raises(ConfigError, match="train.cuda_graph = 'on'.*device is cpu"):
        check_config(load_config("tiny-cpu", base + ["train.cuda_graph=on"]), cuda=False)
    with pytest.raises(ConfigError, match="train.compile = 'on'.*ZeRO-3"):
        check_config(load_config("tiny-cpu", base + ["train.compile=on", "distributed.zero_stage=3",
                                                     "distributed.backend=deepspeed"]), world_size=2, cuda=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("nan_batches", [(), (4, 6)])
def test_graphed_step_equals_eager_step_on_cuda(nan_batches):
    """Warm-up (3 eager steps), capture on the 4th, replays after: the same weights, teacher and
    AdamW state as the same step never captured (capturable AdamW both), the losses and skips of
    today's eager step, also across non-finite steps inside the graph (NaN pixels: a replay runs
    no Python)."""
    batches = [_batch(s, device="cuda") for s in range(8)]
    for i in nan_batches:
        batches[i][0][0][0] = float("nan")
    eager, uncaptured, dev = _engine("cuda"), _engine("cuda"), _engine("cuda")
    outs = _eager(eager, CosmosLoss(), batches)
    ref = DeviceStep(uncaptured, CosmosLoss(), capture=True, warmup_steps=len(batches))   # never captures
    step = DeviceStep(dev, CosmosLoss(), capture=True, warmup_steps=3)
    refs = [ref(c, t, lr=1e-2, momentum=0.9) for c, t in batches]
    vecs = [step(c, t, lr=1e-2, momentum=0.9) for c, t in batches]
    assert step.graph is not None and ref.graph is None
    assert [bool(v[-1]) for v in vecs] == [o["finite"] for o in outs] == [i not in nan_batches for i in range(8)]
    for out, vec, r in zip(outs, vecs, refs):
        torch.testing.assert_close(vec, r, rtol=1e-6, atol=1e-7, equal_nan=True)
        if out["finite"]:
            assert_close(vec[0], out["loss"].float(), rtol=1e-4, atol=1e-5)
    _assert_same(_state(dev), _state(uncaptured))
    assert int(step.skipped) == len(nan_batches)


def test_trainer_with_the_device_step_counts_skips_at_flushes(tmp_path, caplog):
    """The trainer's deferred path (the CUDA graph's, run eagerly here): rows and skip counts reach
    metrics.jsonl at the flushes as in the eager path; a skipped step keeps its schedule slot."""
    data = write_demo_data(tmp_path / "demo", n_train=64, n_val=16, samples_per_shard=16, seed=1)
    cfg = small_cfg(data, "train.max_nonfinite=2", "train.save_every_steps=3", "train.log_every_steps=5",
                    "data.batch_size=4", "data.train_num_samples=32")
    with caplog.at_level(logging.INFO, logger="cosmos_fast"):
        t = Trainer(cfg, tmp_path / "run")
    assert "train.cuda_graph = auto: eager step (the device is cpu" in caplog.text
    assert "train.compile = auto: transformer blocks eager (the device is cpu" in caplog.text
    loss = FlakyLoss({2, 4, 5})                       # one isolated NaN, then two in a row
    t.device_step = DeviceStep(t.engine, loss, cfg.ema.order)
    with caplog.at_level(logging.WARNING, logger="cosmos_fast"), pytest.raises(NonFiniteLossError, match="2 non-finite"):
        t.train()                                     # flushes at the step-3 checkpoint and at step 5
    t.close()
    r = rows(tmp_path / "run" / "metrics.jsonl")
    assert [x["step"] for x in r] == [1, 3]
    assert [x["nonfinite_steps"] for x in r] == [0, 1]
    assert "step 2: non-finite loss" in caplog.text and "skipped on the device" in caplog.text
    body = torch.load(tmp_path / "run" / "checkpoints" / "epoch_latest.pt", weights_only=True)
    assert body["trainer"]["step"] == 3 and body["trainer"]["nonfinite_total"] == 1


def test_step_paths_benchmark_smoke(tmp_path):
    """benchmarks/bench_step_paths.py on CPU (eager vs the sync-free step): equality passes, rows written."""
    model = json.dumps({"embed_dim": 16, "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 16, "layers": 1,
                                                        "head_width": 8},
                        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}})
    out = bench_step_paths.run(bench_step_paths.parse_args(
        ["--model", model, "--batch", "2", "--device", "cpu", "--paths", "eager,graph", "--warmup", "1", "--reps", "1",
         "--results-dir", str(tmp_path)]))
    assert [r["path"] for r in out["rows"]] == ["eager", "graph"]
    assert Path(out["csv"]).parent == tmp_path / "step_paths"
    assert all(r["median_s"] > 0 and r["samples_per_s"] > 0 for r in out["rows"])
