"""Per-phase wall-clock timers for the training step (``data_wait``, ``student_forward``,
``teacher_forward``, ``loss``, ``backward``, ``ema``, ``optimizer``).

Disabled timers cost one attribute check per phase. Enabled ones synchronise the device at phase
boundaries (CUDA), so they change overlap a little: use them for breakdowns, not for throughput.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch

PHASES = ("data_wait", "student_forward", "teacher_forward", "loss", "backward", "ema", "optimizer")


class PhaseTimer:
    def __init__(self, enabled: bool = False, device: torch.device | None = None):
        self.enabled = enabled
        self.device = device
        self.totals: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def _sync(self):
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name: str):
        if not self.enabled:
            yield
            return
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.totals[name] += time.perf_counter() - t0
            self.counts[name] += 1

    def add(self, name: str, seconds: float) -> None:
        if self.enabled:
            self.totals[name] += seconds
            self.counts[name] += 1

    def mean(self) -> dict[str, float]:
        """Mean seconds per occurrence of each phase."""
        return {k: self.totals[k] / self.counts[k] for k in self.totals if self.counts[k]}

    def reset(self) -> None:
        self.totals.clear()
        self.counts.clear()


NULL_TIMER = PhaseTimer(enabled=False)
