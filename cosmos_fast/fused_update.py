"""The teacher EMA and the student's AdamW in one pass over flat fp32 buffers (``optim.fused_update``).

Today's update is two passes over ~300 separate tensors: the EMA (:func:`cosmos_fast.ema.ema_update`,
θ_T ← m·θ_T + (1 − m)·θ_S) and torch's AdamW. :class:`FusedEmaAdamW` lays each parameter group of
the student (the official groups of :func:`cosmos_fast.optim.param_groups`: weight decay only on
≥ 2-D weights) out in one flat fp32 buffer per quantity — student weights, their gradients, the
teacher's matching weights, ``exp_avg``, ``exp_avg_sq`` — and makes every parameter, gradient and
optimizer-state tensor a *view* into those buffers. The model, the teacher and checkpoints keep their
keys and shapes; the update then runs group by group, a handful of vector ops per group:

1. EMA (official order, ``ema.order = before_step``): θ_T ← m·θ_T + (1 − m)·θ_S from the student's
   current weights, before they are updated (:meth:`FusedEmaAdamW.set_ema` queues it for the next
   :meth:`~FusedEmaAdamW.step`; :meth:`~FusedEmaAdamW.ema` runs it at once, for ``after_step``);
2. AdamW with decoupled weight decay, bias correction, ε outside the square root, amsgrad off.

Equality. On CPU the ops are exactly those of torch's single-tensor AdamW (the CPU default) and of
the ``torch._foreach`` EMA, in the same order with the same scalars, applied to the concatenation
instead of to each tensor: the result is bitwise equal (tests/test_fused_update.py). On CUDA the
update calls ``torch._fused_adamw_`` (the kernel behind ``AdamW(fused=True)``, today's CUDA optimizer)
on the flat buffers, with the step count, the learning rate and the EMA momentum held in device
tensors, so the step can be captured in a CUDA graph (no ``.item()`` or host branch on a tensor
value; :meth:`FusedEmaAdamW.sync_scalars` refreshes lr and momentum before each replay); there the
kernel orders the AdamW arithmetic its own way and the EMA's (1 − m)·θ_S is rounded before the add,
so it is close, not bitwise (tested on fixed gradients; the path also runs on CPU, ``capturable=True``).

Gradients are views into the flat gradient buffer and stay allocated: ``zero_grad`` zeroes the buffer
(whatever ``set_to_none`` says) and backward accumulates into it. A parameter that received no
gradient is therefore updated with a zero gradient, where torch's AdamW would skip it; every
student parameter receives a gradient in a COSMOS step (asserted in the tests).

Checkpoints. :meth:`state_dict` is torch AdamW's format (per-parameter ``step``, ``exp_avg``,
``exp_avg_sq``), so a state written by either optimizer loads into the other; :meth:`load_state_dict`
copies the loaded moments into the flat buffers. Not used under DeepSpeed (its engine owns the
optimizer and its partitions). No bf16 shadow weights are written.
"""
from __future__ import annotations

import torch
from torch import nn

from .ema import _param_pairs, _unwrap
from .optim import param_groups


class FusedEmaAdamW(torch.optim.AdamW):
    """AdamW over the student's official parameter groups, flattened, with the teacher's EMA in the
    same per-group pass. The student and teacher parameters must be fp32 on one device.
    ``capturable`` (default: on CUDA) selects the device-scalar path (``torch._fused_adamw_``, which
    also runs on CPU, so the tests exercise it there)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, lr: float = 5e-4, betas=(0.9, 0.98),
                 eps: float = 1e-8, weight_decay: float = 0.5, capturable: bool | None = None):
        super().__init__(param_groups(student, weight_decay), lr=lr, betas=betas, eps=eps,
                         weight_decay=weight_decay, foreach=False)
        t_params, _ = _param_pairs(teacher, student)          # same names and shapes, or a clear error
        t_named = dict(_unwrap(teacher).named_parameters())
        teacher_of = {id(p): t_named[n] for n, p in _unwrap(student).named_parameters()}
        params = [p for g in self.param_groups for p in g["params"]]
        if len(params) != len(t_params):
            raise ValueError("optim.fused_update needs every student parameter trainable (the EMA runs over the "
                             "optimizer's groups); set optim.fused_update=off")
        devices = {p.device for p in params} | {t.device for t in t_params}
        bad = [p.dtype for p in params + t_params if p.dtype != torch.float32]
        if bad or len(devices) != 1:
            raise ValueError(f"optim.fused_update needs fp32 student and teacher parameters on one device, got "
                             f"dtypes {sorted({str(d) for d in bad}) or ['float32']} on {sorted(map(str, devices))}")
        self.device = devices.pop()
        self.capturable = self.device.type == "cuda" if capturable is None else capturable
        with torch.no_grad():
            self.flat = [self._flatten(g["params"], [teacher_of[id(p)] for p in g["params"]])
                         for g in self.param_groups]
        self._momentum = None            # the queued EMA momentum (set_ema), consumed by step()
        if self.capturable:              # device scalars: read by the kernels, never by the host
            self._lr = [torch.tensor(float(g["lr"]), device=self.device) for g in self.param_groups]
            self._m = torch.zeros((), device=self.device)
            self._one_minus_m = torch.zeros((), device=self.device)

    # ---------------------------------------------------------------- layout
    def _flatten(self, params: list, teachers: list) -> dict:
        """Flat buffers for one group; the group's parameters, gradients and state become views."""
        n = sum(p.numel() for p in params)
        buf = {k: torch.zeros(n, dtype=torch.float32, device=self.device)
               for k in ("param", "teacher", "grad", "exp_avg", "exp_avg_sq")}
        step = torch.zeros((), dtype=torch.float32, device=self.device if self.capturable else "cpu")
        off = 0
        for p, t in zip(params, teachers):
            k = p.numel()
            views = {name: b[off:off + k].view_as(p) for name, b in buf.items()}
            views["param"].copy_(p.detach())
            views["teacher"].copy_(t.detach())
            if p.grad is not None:
                views["grad"].copy_(p.grad)
            p.data = views["param"]
            t.data = views["teacher"]
            p.grad = views["grad"]
            self.state[p] = {"step": step, "exp_avg": views["exp_avg"], "exp_avg_sq": views["exp_avg_sq"]}
            off += k
        buf["step"] = step
        buf["grads"] = [p.grad for p in params]      # the views, to notice a replaced gradient
        return buf

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat gradient buffers; the gradients stay views into them (see the module docstring)."""
        for g, f in zip(self.param_groups, self.flat):
            self._check_grads(g, f)
            f["grad"].zero_()

    @staticmethod
    def _check_grads(group: dict, f: dict) -> None:
        """Put back a gradient that something replaced (``p.grad = ...``) or dropped (``None``)."""
        if all(p.grad is v for p, v in zip(group["params"], f["grads"])):
            return
        with torch.no_grad():
            for p, v in zip(group["params"], f["grads"]):
                if p.grad is not v:
                    if p.grad is None:
                        v.zero_()
                    else:
                        v.copy_(p.grad)
                    p.grad = v

    # ---------------------------------------------------------------- update
    def set_ema(self, momentum: float) -> None:
        """Queue θ_T ← m·θ_T + (1 − m)·θ_S for the next :meth:`step`, from the student's weights before
        that step updates them (the official ``before_step`` order)."""
        _check_momentum(momentum)
        self._momentum = momentum
        if self.capturable and not self._capturing():
            self._m.fill_(momentum)
            self._one_minus_m.fill_(1.0 - momentum)

    def sync_scalars(self, momentum: float | None = None) -> None:
        """CUDA graphs: write the groups' ``lr`` and the EMA ``momentum`` into the device tensors the
        captured update reads; call it outside the graph before each replay (during capture the update
        reads these tensors and writes none of them)."""
        if not self.capturable:
            return
        for t, group in zip(self._lr, self.param_groups):
            t.fill_(group["lr"])
        if momentum is not None:
            _check_momentum(momentum)
            self._m.fill_(momentum)
            self._one_minus_m.fill_(1.0 - momentum)

    def _capturing(self) -> bool:
        return self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()

    @torch.no_grad()
    def ema(self, momentum: float | None = None) -> None:
        """Run the EMA now (``after_step``, or a queued one the fp16 loss scaler's skip left over)."""
        if momentum is not None:
            self.set_ema(momentum)
        if self._momentum is None:
            return
        for f in self.flat:
            self._ema(f)
        self._momentum = None

    def _ema(self, f: dict) -> None:
        if self.capturable:
            f["teacher"].mul_(self._m).add_(f["param"] * self._one_minus_m)
        else:                         # the ops and scalars of ema.ema_update: bitwise equal on CPU
            f["teacher"].mul_(self._momentum).add_(f["param"], alpha=1.0 - self._momentum)

    @torch.no_grad()
    def step(self, closure=None):
        """One pass per group: the queued EMA (if any), then AdamW on the flat buffers."""
        if closure is not None:
            raise ValueError("FusedEmaAdamW.step takes no closure")
        capturing = self.capturable and self._capturing()
        for i, (group, f) in enumerate(zip(self.param_groups, self.flat)):
            self._check_grads(group, f)
            if self._momentum is not None:
                self._ema(f)
            if self.capturable:
                if not capturing:     # a captured graph reads the tensor: sync_scalars refreshes it
                    self._lr[i].fill_(group["lr"])
                self._adamw_cuda(group, f, self._lr[i])
            else:
                self._adamw_cpu(group, f)
        self._momentum = None

    @staticmethod
    def _adamw_cpu(group: dict, f: dict) -> None:
        """torch's single-tensor AdamW (amsgrad off, not maximising), on the concatenation."""
        p, grad, exp_avg, exp_avg_sq = f["param"], f["grad"], f["exp_avg"], f["exp_avg_sq"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        f["step"] += 1
        step = f["step"].item()
        if wd != 0:
            p.mul_(1 - lr * wd)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1 ** step
        bias_correction2 = 1 - beta2 ** step
        step_size = lr / bias_correction1
        denom = (exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(eps)
        p.addcdiv_(exp_avg, denom, value=-step_size)

    @staticmethod
    def _adamw_cuda(group: dict, f: dict, lr: torch.Tensor) -> None:
        """``torch._fused_adamw_`` (AdamW(fused=True)'s kernel) with device-side step and lr."""
        beta1, beta2 = group["betas"]
        f["step"].add_(1)
        torch._fused_adamw_([f["param"]], [f["grad"]], [f["exp_avg"]], [f["exp_avg_sq"]], [], [f["step"]],
                            amsgrad=False, lr=lr, beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                            eps=group["eps"], maximize=False, grad_scale=None, found_inf=None)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """torch AdamW's format; each parameter gets its own ``step`` tensor (torch's AdamW increments
        every parameter's count in place, so a count shared across a group would run ahead there)."""
        sd = super().state_dict()
        sd["state"] = {k: {**v, "step": v["step"].clone()} for k, v in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load torch AdamW's format (written by either optimizer) into the flat buffers."""
        super().load_state_dict(state_dict)
        with torch.no_grad():
            for group, f in zip(self.param_groups, self.flat):
                loaded = [self.state.get(p, {}) for p in group["params"]]
                if not any(loaded):        # saved before the first step: fresh moments
                    steps = [torch.zeros(())]
                    f["exp_avg"].zero_()
                    f["exp_avg_sq"].zero_()
                else:
                    if not all(loaded):
                        raise ValueError("optimizer state has moments for only part of a parameter group; the "
                                         "fused update needs all or none (set optim.fused_update=off)")
                    steps = [s["step"] for s in loaded]
                    for s, p in zip(loaded, group["params"]):
                        self._view(f, p, "exp_avg").copy_(s["exp_avg"])
                        self._view(f, p, "exp_avg_sq").copy_(s["exp_avg_sq"])
                first = torch.as_tensor(steps[0]).float()
                if any(not torch.equal(torch.as_tensor(s).float().cpu(), first.cpu()) for s in steps):
                    raise ValueError("optimizer state has different step counts within a parameter group; the "
                                     "fused update needs one per group (set optim.fused_update=off)")
                f["step"].copy_(first)
                for p in group["params"]:
                    self.state[p] = {"step": f["step"], "exp_avg": self._view(f, p, "exp_avg"),
                                     "exp_avg_sq": self._view(f, p, "exp_avg_sq")}

    @staticmethod
    def _view(f: dict, p: torch.Tensor, name: str) -> torch.Tensor:
        """The slice of flat buffer ``name`` that lines up with parameter ``p`` (a view of ``f['param']``)."""
        off = p.storage_offset() - f["param"].storage_offset()
        return f[name][off:off + p.numel()].view_as(p)


def _check_momentum(momentum: float) -> None:
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must lie in [0, 1], got {momentum}")
