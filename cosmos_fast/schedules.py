"""The per-step schedules, indexed by the global optimizer step t (0-based, set before each step).

* :class:`WarmupCosineLR` — the learning rate of cosmos_method.md §5: linear warm-up lr·(t+1)/W for
  t < W, then a cosine to exactly 0 at S.
* :class:`MomentumSchedule` — the EMA teacher's momentum (§2): fixed m₀ (every released script) or
  the cosine ramp m(t) = 1 − (1 − m₀)·½(1 + cos(π·t/S)).
"""
from __future__ import annotations

import math


class WarmupCosineLR:
    def __init__(self, base_lr: float, warmup: int, total_steps: int):
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        self.base_lr, self.warmup, self.total_steps = base_lr, warmup, total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.base_lr * (step + 1) / self.warmup
        span = self.total_steps - self.warmup
        if span <= 0:
            return self.base_lr
        progress = min(step - self.warmup, span) / span
        return 0.5 * (1 + math.cos(math.pi * progress)) * self.base_lr


class MomentumSchedule:
    """EMA momentum per optimizer step: ``fixed`` (m₀) or ``cosine`` (m₀ → 1 over ``total_steps``)."""

    def __init__(self, base: float = 0.999, kind: str = "fixed", total_steps: int | None = None):
        if not 0.0 <= base <= 1.0:
            raise ValueError(f"EMA momentum must lie in [0, 1], got {base}")
        if kind not in ("fixed", "cosine"):
            raise ValueError(f"momentum schedule must be 'fixed' or 'cosine', got {kind!r}")
        if kind == "cosine" and (not total_steps or total_steps <= 0):
            raise ValueError(f"the cosine momentum schedule needs total_steps > 0, got {total_steps!r}")
        self.base, self.kind, self.total_steps = base, kind, total_steps

    def __call__(self, step: int) -> float:
        if self.kind == "fixed":
            return self.base
        return 1.0 - (1.0 - self.base) * 0.5 * (1.0 + math.cos(math.pi * step / self.total_steps))
