import math

import pytest
import torch

from utils import TINY_MODEL_16

from cosmos_fast import CosmosLoss, MomentumSchedule, build_teacher, clamp_logit_scales, create_model, ema_update
from cosmos_fast.optim import build_adamw
from cosmos_fast.step import cosmos_train_step


def _batch(b=3):
    g = torch.Generator().manual_seed(0)
    crops = [torch.randn(b, 3, 16, 16, generator=g) for _ in range(2)]
    crops += [torch.randn(b, 3, 8, 8, generator=g) for _ in range(2)]
    text = torch.randint(1, 18, (4 * b, 6), generator=g)
    text[:, 4] = 19
    return crops, text


def test_build_teacher_is_frozen_fp32_copy():
    student = create_model(TINY_MODEL_16).to(torch.bfloat16)
    teacher = build_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.dtype == torch.float32 for p in teacher.parameters())
    for (n, s), (_, t) in zip(student.named_parameters(), teacher.named_parameters()):
        assert torch.equal(s.float(), t), n
        assert s.data_ptr() != t.data_ptr()


def test_ema_update_formula():
    torch.manual_seed(0)
    student, teacher = create_model(TINY_MODEL_16), create_model(TINY_MODEL_16)
    before = {n: p.clone() for n, p in teacher.named_parameters()}
    ema_update(teacher, student, 0.9)
    s = dict(student.named_parameters())
    for n, p in teacher.named_parameters():
        torch.testing.assert_close(p, 0.9 * before[n] + 0.1 * s[n], rtol=1e-6, atol=1e-7)


def test_fp32_teacher_moves_with_bf16_student():
    student = create_model(TINY_MODEL_16)
    teacher = build_teacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01)
    student = student.to(torch.bfloat16)
    ref = {n: p.clone() for n, p in teacher.named_parameters()}
    ema_update(teacher, student, 0.999)
    moved = sum(int(not torch.equal(p, ref[n])) for n, p in teacher.named_parameters())
    assert moved == len(ref)


def test_ema_rejects_mismatched_models():
    other = dict(TINY_MODEL_16, text_cfg=dict(TINY_MODEL_16["text_cfg"], layers=2))
    with pytest.raises(ValueError, match="student-only"):
        ema_update(create_model(TINY_MODEL_16), create_model(other), 0.99)
    with pytest.raises(ValueError, match="momentum"):
        ema_update(create_model(TINY_MODEL_16), create_model(TINY_MODEL_16), 1.5)


@pytest.mark.parametrize("order", ["before_step", "after_step"])
def test_ema_order_flag(order):
    torch.manual_seed(0)
    student = create_model(TINY_MODEL_16)
    teacher = create_model(TINY_MODEL_16)          # different weights, so the update is visible
    teacher.requires_grad_(False)
    t0 = {n: p.clone() for n, p in teacher.named_parameters()}
    s0 = {n: p.detach().clone() for n, p in student.named_parameters()}
    opt = build_adamw(student, lr=1e-2)
    crops, text = _batch()
    cosmos_train_step(student, teacher, CosmosLoss(), opt, crops, text, momentum=0.9, ema_order=order)
    s1 = {n: p.detach().clone() for n, p in student.named_parameters()}
    src = s0 if order == "before_step" else s1
    for n, p in teacher.named_parameters():
        expect = 0.9 * t0[n] + 0.1 * src[n]
        if "logit_scale" in n:
            expect = expect.clamp(0, math.log(100))
        torch.testing.assert_close(p, expect, rtol=1e-6, atol=1e-7, msg=n)
    assert any(not torch.equal(s0[n], s1[n]) for n in s0)


def test_bad_ema_order():
    with pytest.raises(ValueError, match="ema_order"):
        cosmos_train_step(None, None, None, None, None, None, 0.9, ema_order="whenever")


def test_momentum_schedules():
    fixed = MomentumSchedule(0.99)
    assert fixed(0) == fixed(1000) == 0.99
    cos = MomentumSchedule(0.99, "cosine", total_steps=100)
    assert cos(0) == pytest.approx(0.99)
    assert cos(50) == pytest.approx(0.995)
    assert cos(100) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="total_steps"):
        MomentumSchedule(0.99, "cosine")
    with pytest.raises(ValueError, match="'fixed' or 'cosine'"):
        MomentumSchedule(0.99, "linear")


def test_clamp_logit_scales_on_both_models():
    a, b = create_model(TINY_MODEL_16), create_model(TINY_MODEL_16)
    with torch.no_grad():
        a.logit_scale.fill_(10.0)
        a.distill_logit_scale.fill_(-1.0)
        b.logit_scale.fill_(5.0)
        b.distill_logit_scale.fill_(2.0)
    clamp_logit_scales(a, b)
    assert a.logit_scale.item() == pytest.approx(math.log(100))
    assert a.distill_logit_scale.item() == 0.0
    assert b.logit_scale.item() == pytest.approx(math.log(100))
    assert b.distill_logit_scale.item() == 2.0
