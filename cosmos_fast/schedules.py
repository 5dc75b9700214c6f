"""Learning-rate schedule of cosmos_method.md §5, indexed by the global optimizer step t (0-based,
set before each step): linear warm-up lr·(t+1)/W for t < W, then a cosine to exactly 0 at S."""
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
