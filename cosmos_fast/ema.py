"""The EMA teacher (cosmos_method.md §2).

* :func:`build_teacher` — a deep copy of the student with every parameter frozen, kept in fp32.
* :func:`ema_update` — θ_T ← m·θ_T + (1 − m)·θ_S for every parameter pair (matched by name),
  with ``torch._foreach`` ops: a handful of kernel launches for the whole model.
* :func:`clamp_logit_scales` — both logit scales into [0, ln 100], applied to student and teacher
  after every optimizer step.
* ``ema.order`` (``config.EMA_ORDERS``, applied by :mod:`cosmos_fast.step`): the official order
  updates the teacher after ``backward`` and *before* the optimizer step (so it averages in the
  weights used by this step's forward); ``"after_step"`` averages in the freshly updated weights.

The momentum schedule is :class:`cosmos_fast.schedules.MomentumSchedule`.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .model.cosmos import LOGIT_SCALE_MAX

SCALE_NAMES = ("logit_scale", "distill_logit_scale")


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def build_teacher(student: nn.Module) -> nn.Module:
    """Teacher = copy of the (unwrapped) student, fp32, without gradients."""
    teacher = copy.deepcopy(_unwrap(student)).float()
    teacher.requires_grad_(False)
    return teacher


def _param_pairs(teacher: nn.Module, student: nn.Module):
    tp = dict(_unwrap(teacher).named_parameters())
    sp = dict(_unwrap(student).named_parameters())
    if tp.keys() != sp.keys():
        only_t, only_s = sorted(tp.keys() - sp.keys()), sorted(sp.keys() - tp.keys())
        raise ValueError(f"teacher and student parameters differ: teacher-only {only_t[:10]}, "
                         f"student-only {only_s[:10]}")
    for name in tp:
        if tp[name].shape != sp[name].shape:
            raise ValueError(f"parameter {name}: teacher {tuple(tp[name].shape)} vs student "
                             f"{tuple(sp[name].shape)}")
    names = list(tp)
    return [tp[n] for n in names], [sp[n].detach() for n in names]


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float | torch.Tensor) -> None:
    """θ_T ← m·θ_T + (1 − m)·θ_S over all parameters (buffers are not averaged).

    ``momentum`` may be a 0-dim float64 tensor on the parameters' device (the CUDA-graph step,
    :mod:`cosmos_fast.device_step`): then nothing reads it on the host, the result equals the
    float path's, and m = 1 leaves the teacher bit-for-bit unchanged (m·θ_T + 0·θ_S with a
    finite student)."""
    if not torch.is_tensor(momentum) and not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must lie in [0, 1], got {momentum}")
    t_params, s_params = _param_pairs(teacher, student)
    if any(s.dtype != t.dtype for t, s in zip(t_params, s_params)):
        s_params = [s.to(t.dtype) for t, s in zip(t_params, s_params)]
    torch._foreach_mul_(t_params, momentum)
    if torch.is_tensor(momentum):
        weight = 1.0 - momentum               # fp64 momentum: the weight the float path computes
        for t, s in zip(t_params, s_params):
            t.addcmul_(s, weight)             # rounded as add(alpha=...) is: one fused multiply-add
    else:
        torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


@torch.no_grad()
def clamp_logit_scales(*models: nn.Module, max_value: float = LOGIT_SCALE_MAX) -> None:
    """Clamp ``logit_scale`` and ``distill_logit_scale`` into [0, ln 100] in place."""
    for model in models:
        model = _unwrap(model)
        for name in SCALE_NAMES:
            p = getattr(model, name, None)
            if p is not None:
                p.clamp_(0.0, max_value)
