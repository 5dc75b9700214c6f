"""Equality with the official COSMOS implementation (shared/fixtures/official_tiny.pt)."""
import pytest
import torch

from conftest import FIXTURE
from utils import assert_close

from cosmos_fast import CosmosLoss, create_model, load_checkpoint
from cosmos_fast.optim import build_adamw, param_groups
from cosmos_fast.step import cosmos_train_step


def test_state_dict_layout_matches_official(official):
    model = create_model(official["config"])
    ours = model.state_dict()
    assert list(ours) == list(official["state_dict"])
    for k, v in official["state_dict"].items():
        assert ours[k].shape == v.shape, k


@pytest.mark.parametrize("pool_impl", ["absorbed", "shared", "reference", "fused"])
def test_student_forward(official, official_model, pool_impl):
    official_model.pool_impl = pool_impl
    try:
        out = official_model(official["crops"], official["captions"], batch_size=official["batch_size"])
    finally:
        official_model.pool_impl = "auto"
    assert set(out) == set(official["student_out"])
    for k, v in official["student_out"].items():
        assert_close(out[k], v)


def test_teacher_forward(official, official_model):
    b = official["batch_size"]
    out = official_model(torch.cat(official["crops"][:2]), official["captions"][:2 * b])
    assert set(out) == set(official["teacher_out"])
    for k, v in official["teacher_out"].items():
        assert_close(out[k], v)


IMPLS = ["reference", "blockwise", "fused"]     # fused runs under the Triton interpreter on CPU


@pytest.mark.parametrize("impl", IMPLS)
def test_loss_value_and_gradients(official, impl):
    p = official["scale_params"].clone().requires_grad_(True)
    inputs = {k: [x.clone().requires_grad_(True) for x in v] for k, v in official["loss_inputs"].items()}
    out = CosmosLoss(impl)(logit_scale=p[0].exp(), distill_logit_scale=p[1].exp(), output_dict=True, **inputs)
    assert_close(out["distill_loss"], official["loss_out"]["distill_loss"])
    assert_close(out["clip_loss"], official["loss_out"]["clip_loss"])
    (out["distill_loss"] + out["clip_loss"]).backward()
    assert_close(p.grad, official["scale_grads"])
    for name, grads in official["loss_grads"].items():
        for i, (x, g) in enumerate(zip(inputs[name], grads)):
            if g is None:   # unused by the official loss (local crops in L_clip)
                assert x.grad is None, f"{name}[{i}] should get no gradient"
            else:
                assert_close(x.grad, g)
    for name in ("t_image_features", "t_text_features"):
        assert all(x.grad is None for x in inputs[name]), "the teacher must receive no gradient"


@pytest.mark.parametrize("impl", IMPLS)
def test_one_full_training_step(official, impl):
    step = official["one_step"]
    student = create_model(official["config"])
    student.load_state_dict(official["state_dict"])
    teacher = create_model(official["config"])
    teacher.load_state_dict(step["teacher_before"])
    teacher.requires_grad_(False)
    opt = build_adamw(student, lr=step["lr"], betas=step["betas"], eps=step["eps"],
                      weight_decay=step["weight_decay"])
    grads = {}
    orig_step = opt.step

    def spy_step(*a, **k):   # capture gradients right before the optimizer step
        grads.update({n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
        return orig_step(*a, **k)

    opt.step = spy_step
    losses = cosmos_train_step(student, teacher, CosmosLoss(impl), opt, official["crops"], official["captions"],
                               momentum=step["momentum"], ema_order="before_step")
    loss_ref = step["loss"]
    assert_close(losses["distill_loss"], loss_ref["distill_loss"])
    assert_close(losses["clip_loss"], loss_ref["clip_loss"])
    assert set(grads) == set(step["student_grads"])
    for n, g in step["student_grads"].items():
        assert_close(grads[n].reshape(g.shape), g, grad=True, atol=1e-5 * float(g.abs().max()) + 1e-12)
    after = student.state_dict()
    for n, ref in step["student_after"].items():
        g = step["student_grads"][n]
        # AdamW's first update is ~lr·sign(g): compare where g is well above rounding (our
        # shared-K/V pooling and the tiled loss sum in another order than the official code)
        solid = g.abs() > 1e-5 * g.abs().max()
        assert_close(after[n][solid], ref[solid])
    t_after = teacher.state_dict()
    for n, ref in step["teacher_after"].items():
        assert_close(t_after[n], ref)


def test_official_parameter_groups(official_model):
    groups = param_groups(official_model, 0.5)
    assert [g["weight_decay"] for g in groups] == [0.0, 0.5]
    no_decay, decay = groups[0]["params"], groups[1]["params"]
    names = {id(p): n for n, p in official_model.named_parameters()}
    assert {names[id(p)] for p in decay} >= {"positional_embedding", "visual.positional_embedding",
                                             "token_embedding.weight", "visual.conv1.weight",
                                             "visual.attn_cross_pool.attn.in_proj_weight"}
    assert {"logit_scale", "distill_logit_scale", "visual.class_embedding"} <= {names[id(p)] for p in no_decay}
    assert all(p.ndim >= 2 for p in decay) and not any("bias" in names[id(p)] for p in decay)


@pytest.mark.parametrize("which,key", [("student", "state_dict"), ("teacher", None)])
def test_load_official_checkpoint(official, tmp_path, which, key):
    path = tmp_path / "official.pt"
    torch.save(official["official_checkpoint"], path)
    model = create_model(official["config"])
    meta = load_checkpoint(path, model, which=which)
    assert meta["epoch"] == official["official_checkpoint"]["epoch"]
    ref = official["state_dict"] if key else official["one_step"]["teacher_before"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_fixture_untouched_by_tests(official):
    # the session fixture is shared: make sure nothing above mutated it in place
    fresh = torch.load(FIXTURE, weights_only=True)
    for k, v in fresh["state_dict"].items():
        assert torch.equal(v, official["state_dict"][k]), k
