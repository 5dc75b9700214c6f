"""One COSMOS training step (cosmos_method.md Appendix A), written once over an engine's primitives
(:mod:`cosmos_fast.engine`): the trainer runs it on either engine; the demo, tests and benchmarks
call :func:`cosmos_train_step` with plain objects."""
from __future__ import annotations

import contextlib

import torch

from .config import EMA_ORDERS
from .engine import LocalEngine
from .profiling import NULL_TIMER


def cosmos_forward_loss(student, teacher, loss_fn, crops, captions: torch.Tensor, timer=NULL_TIMER,
                        teacher_context=None) -> dict:
    """Student on all crops/captions, teacher (no grad) on the 2 global crops and captions, loss."""
    b = crops[0].shape[0]
    with timer.phase("student_forward"):
        s = student(crops, captions, batch_size=b)
    with timer.phase("teacher_forward"), torch.no_grad(), teacher_context or contextlib.nullcontext():
        t = teacher(torch.cat([crops[0], crops[1]]), captions[:2 * b])
    with timer.phase("loss"):
        losses = _loss(loss_fn, s, t, b)
    losses["loss"] = losses["clip_loss"] + losses["distill_loss"]
    losses["logit_scale"] = s["logit_scale"].detach()               # as used in this step's forward
    losses["distill_logit_scale"] = s["distill_logit_scale"].detach()
    return losses


def _loss(loss_fn, s, t, b):
    dtype = s["image_features"].dtype
    return loss_fn(      # (n·B, D) crop-/caption-major tensors, read as views by the fast paths
        s_image_features=s["image_features"],
        s_text_features=s["text_features"],
        logit_scale=s["logit_scale"],
        t_image_features=t["image_features"].to(dtype),
        t_text_features=t["text_features"].to(dtype),
        distill_logit_scale=s["distill_logit_scale"],
        s_img_crossmodal_features=s["img_crossmodal_features"],
        s_txt_crossmodal_features=s["txt_crossmodal_features"],
        output_dict=True,
        batch_size=b,
    )


def train_step(engine, loss_fn, crops, captions, momentum: float, ema_order: str = "before_step",
               timer=NULL_TIMER) -> dict:
    """zero_grad → forward/loss → finite? → backward → EMA (official: before the step) → optimizer
    step → clamp both logit scales on both models, on ``engine``'s student and teacher.

    Returns the detached losses plus ``finite`` (False: the loss was NaN/inf and nothing was
    updated — no backward, no EMA, no optimizer step; under DeepSpeed the loss is global on every
    rank, so every rank skips together) and ``overflow`` (True: the fp16 loss scaler found inf/nan
    gradients and skipped the optimizer step; the EMA still ran, as officially).
    """
    if ema_order not in EMA_ORDERS:
        raise ValueError(f"ema_order must be one of {EMA_ORDERS}, got {ema_order!r}")
    engine.zero_grad()
    with engine.forward_context():
        losses = cosmos_forward_loss(engine.model, engine.teacher_forward, loss_fn, engine.inputs(crops), captions,
                                     timer, teacher_context=engine.teacher_context())
    out = {k: v.detach() for k, v in losses.items()}
    out["finite"] = bool(torch.isfinite(out["loss"]))
    out["overflow"] = False
    if not out["finite"]:
        return out
    with timer.phase("backward"):
        engine.backward(losses["loss"])
    fused = ema_order == "before_step" and getattr(engine, "fused_ema", False)
    if ema_order == "before_step" and not fused:
        with timer.phase("ema"):
            engine.ema(momentum)
    with timer.phase("optimizer"):         # fused: the EMA runs first inside the optimizer's pass
        out["overflow"] = engine.optimizer_step(ema_momentum=momentum) if fused else engine.optimizer_step()
    if ema_order == "after_step":
        with timer.phase("ema"):
            engine.ema(momentum)
    engine.clamp()
    return out


def cosmos_train_step(student, teacher, loss_fn, optimizer, crops, captions, momentum: float,
                      ema_order: str = "before_step", scaler=None, autocast=None,
                      grad_clip_norm: float | None = None, timer=NULL_TIMER) -> dict:
    """:func:`train_step` on plain objects (one process): ``autocast`` a context around the forward
    and loss, ``scaler`` an fp16 ``GradScaler``, ``grad_clip_norm`` clips the global norm."""
    if ema_order not in EMA_ORDERS:
        raise ValueError(f"ema_order must be one of {EMA_ORDERS}, got {ema_order!r}")
    engine = LocalEngine(student, teacher, optimizer, autocast=autocast, scaler=scaler, grad_clip_norm=grad_clip_norm)
    return train_step(engine, loss_fn, crops, captions, momentum, ema_order, timer)
