"""The training step with no host synchronisation, and its CUDA graph (``train.cuda_graph``).

:func:`cosmos_fast.step.train_step` asks the host whether the loss is finite before ``backward``
(``bool(torch.isfinite(loss))``): the CPU waits for the forward to finish every step and cannot
queue the next one. :class:`DeviceStep` runs the same step — zero_grad → forward/loss → backward →
EMA (official order: before the optimizer step) → optimizer step → clamp — with the skip decided
on the device:

* ``ok = isfinite(loss)`` stays a device tensor; ``backward`` always runs (a non-finite loss gives
  non-finite gradients, which nothing keeps);
* the EMA gets the momentum ``where(ok, m, 1)``: m = 1 leaves the teacher bit-for-bit unchanged;
* :class:`KeepOnSkip` copies the student's weights and the optimizer state before the optimizer
  step and puts them back with ``where(ok, new, old)`` after it (state that did not exist yet is
  reset to AdamW's zero initial state). A fused EMA + AdamW pass that takes ``ok`` itself can
  replace this copy; the step calls the engine's ``ema`` and ``optimizer_step`` either way;
* the step returns one device vector (``OUT_KEYS``): the losses, both scales and ``finite``
  (1.0 or 0.0), read by the trainer once per flush (log interval, checkpoint, end), which then
  counts the skipped steps into metrics.jsonl exactly as for the eager step. A skipped step keeps
  its place in the LR and momentum schedules (the host learns of it only at the flush), as an fp16
  overflow step does.

With ``capture`` (CUDA) the first ``warmup_steps`` steps run eagerly on a side stream (they
compile, autotune and create the optimizer state), the next is recorded as one CUDA graph over
static input buffers and every later step copies its batch into those buffers and replays the
graph: one launch for the whole step. The LR and the momentum are device tensors filled before
each replay; the optimizer is made capturable (``capturable=True``, tensor LR). A batch of another
shape runs eagerly (logged once).

Where a graph cannot be captured (:func:`cuda_graph_blocker`: CPU, DeepSpeed, the fp16
GradScaler, activation checkpointing, a non-capturable optimizer, the fused EMA + AdamW of
``optim.fused_update`` — not wired into the graph yet —, caption truncation, whose length is read
on the host) ``train.cuda_graph = auto`` keeps the eager step and logs
why; ``on`` is refused at start (``trainer.check_config``). :func:`compile_blocker` is the same for
``train.compile``.
"""
from __future__ import annotations

import logging
import time

import torch

from .config import EMA_ORDERS
from .step import cosmos_forward_loss

log = logging.getLogger("cosmos_fast.device_step")

OUT_KEYS = ("loss", "clip_loss", "distill_loss", "logit_scale", "distill_logit_scale", "finite")


def cuda_graph_blocker(cfg, device_type: str, world: int, deepspeed: bool) -> str | None:
    """Why this run cannot replay its step as a CUDA graph (None: it can)."""
    if device_type != "cuda":
        return f"the device is {device_type}, and a CUDA graph records CUDA kernels"
    if deepspeed or world > 1:
        return "DeepSpeed's engine step synchronises with the host and communicates outside any graph"
    if cfg.train.precision == "amp_fp16":
        return "train.precision = amp_fp16: the GradScaler reads its inf check on the host every step"
    if cfg.model.grad_checkpointing:
        return ("model.grad_checkpointing: the recomputation saves and restores the CUDA RNG state, which a "
                "capture does not allow")
    if cfg.distributed.optimizer != "torch_adamw":
        return f"distributed.optimizer = {cfg.distributed.optimizer} is not capturable (torch_adamw is)"
    if cfg.model.truncate_captions:
        return ("model.truncate_captions: the caption length is read on the host every step (set "
                "model.truncate_captions=false to capture the step)")
    if cfg.optim.fused_update != "off":
        return (f"optim.fused_update = {cfg.optim.fused_update}: the fused EMA + AdamW pass is not wired into the "
                f"graphed step yet (set optim.fused_update=off to capture the step with torch's capturable AdamW)")
    return None


def compile_blocker(cfg, world: int, deepspeed: bool) -> str | None:
    """Why this run cannot compile its transformer blocks (None: it can)."""
    if (deepspeed or world > 1) and cfg.distributed.zero_stage == 3:
        return ("ZeRO-3 gathers each block's weights in forward hooks, which a compiled block call "
                "would trace through")
    return None


class KeepOnSkip:
    """Put the student's weights and the optimizer state back after an update whose loss was not
    finite, without reading the flag on the host: :meth:`save` before the update, :meth:`restore`
    after it."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = optimizer
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._fresh: list[torch.Tensor] = []

    def _state(self, p) -> list[torch.Tensor]:
        return [v for v in self.optimizer.state.get(p, {}).values() if torch.is_tensor(v)]

    @torch.no_grad()
    def save(self) -> None:
        tensors = list(self.params)
        self._fresh = [p for p in self.params if not self._state(p)]
        for p in self.params:
            tensors += self._state(p)
        self._saved = [(t, t.clone()) for t in tensors]

    @torch.no_grad()
    def restore(self, ok: torch.Tensor) -> None:
        """Where ``ok`` is False: the saved values again, and AdamW's zero initial state for the
        parameters that had none (lazily created by this update)."""
        for t, old in self._saved:
            t.copy_(torch.where(ok, t, old))
        for p in self._fresh:
            for t in self._state(p):
                t.copy_(torch.where(ok, t, torch.zeros_like(t)))
        self._saved, self._fresh = [], []


class DeviceStep:
    """One COSMOS step per call on ``engine`` (a :class:`cosmos_fast.engine.LocalEngine`) with no
    host synchronisation; recorded as a CUDA graph and replayed with ``capture`` (see the module
    docstring). ``step(crops, captions, lr, momentum)`` returns the (len(OUT_KEYS),) fp32 device
    vector; ``skipped`` counts the non-finite steps on the device."""

    def __init__(self, engine, loss_fn, ema_order: str = "before_step", capture: bool = False,
                 warmup_steps: int = 3):
        if ema_order not in EMA_ORDERS:
            raise ValueError(f"ema_order must be one of {EMA_ORDERS}, got {ema_order!r}")
        self.engine, self.loss_fn, self.ema_order = engine, loss_fn, ema_order
        self.capture, self.warmup_steps = capture, warmup_steps
        device = next(engine.student.parameters()).device
        self.momentum = torch.ones((), dtype=torch.float64, device=device)   # 1 - m as the host computes it
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        self.guard = KeepOnSkip(engine.student, engine.optimizer)
        self.graph = None
        self._static = None
        self._shapes = None
        self._out = None
        self._calls = 0
        self._warned_shape = False
        if capture:
            self._make_capturable(device)

    def _make_capturable(self, device: torch.device) -> None:
        for group in self.engine.optimizer.param_groups:
            group["capturable"] = True
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
        ac = self.engine.autocast
        if ac is not None:            # autocast's weight-cast cache must be off while capturing
            self.engine.autocast = torch.autocast(device.type, dtype=ac.fast_dtype, cache_enabled=False)

    # ------------------------------------------------------------------ the step
    def _step(self, crops, captions) -> torch.Tensor:
        """zero_grad → forward/loss → backward → EMA → optimizer step → clamp, the skip on the device."""
        e = self.engine
        e.zero_grad()
        with e.forward_context():
            losses = cosmos_forward_loss(e.model, e.teacher_forward, self.loss_fn, e.inputs(crops), captions,
                                         teacher_context=e.teacher_context())
        ok = torch.isfinite(losses["loss"].detach())
        e.backward(losses["loss"])
        keep = torch.where(ok, self.momentum, 1.0)        # m = 1: a skipped step leaves the teacher as it is
        self.guard.save()
        if self.ema_order == "before_step":
            e.ema(keep)
        e.optimizer_step()
        self.guard.restore(ok)
        if self.ema_order == "after_step":
            e.ema(keep)
        e.clamp()
        self.skipped.add_((~ok).long())
        return torch.stack([losses[k].detach().float().reshape(()) for k in OUT_KEYS[:-1]] + [ok.float()])

    def __call__(self, crops: list, captions: torch.Tensor, lr: float, momentum: float) -> torch.Tensor:
        self.engine.set_lr(lr)
        self.momentum.fill_(momentum)
        if not self.capture:
            return self._step(crops, captions)
        shapes = [(tuple(x.shape), x.dtype) for x in (*crops, captions)]
        if self._shapes is not None and shapes != self._shapes:
            if not self._warned_shape:
                log.warning("a batch of another shape than the CUDA graph's (%s, not %s): such steps run eagerly",
                            shapes, self._shapes)
                self._warned_shape = True
            return self._step(crops, captions)
        if self._static is None:
            self._shapes = shapes
            self._static = [x.clone() for x in (*crops, captions)]
        else:
            for dst, src in zip(self._static, (*crops, captions)):
                dst.copy_(src, non_blocking=True)
        static_crops, static_captions = self._static[:-1], self._static[-1]
        self._calls += 1
        if self.graph is None and self._calls <= self.warmup_steps:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self._step(static_crops, static_captions)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            self.engine.optimizer.zero_grad(set_to_none=True)   # the graph's backward allocates them in its pool
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._out = self._step(static_crops, static_captions)
            torch.cuda.synchronize()
            log.info("CUDA graph of the training step captured in %.2f s (after %d eager warm-up steps)",
                     time.perf_counter() - t0, self.warmup_steps)
        self.graph.replay()
        return self._out.clone()
