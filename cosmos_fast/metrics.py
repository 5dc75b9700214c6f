"""What a run logs: ``metrics.jsonl`` (one strict-JSON line per completed optimizer step, marker
lines where a run starts from weights, truncated on exact resume), the evaluation jsonl files and
TensorBoard scalars (``OUTPUT/tb``)."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("cosmos_fast.metrics")

METRICS_MARKER = "marker"
TRAIN_SCALARS = ("loss", "clip_loss", "distill_loss", "lr", "momentum", "logit_scale", "distill_logit_scale",
                 "samples_per_s")


def strict_json(row: dict) -> str:
    """One strict-JSON line: non-finite floats (which json.dumps would write as NaN/Infinity) become null."""
    def clean(x):
        if isinstance(x, float) and not np.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x
    return json.dumps(clean(row), allow_nan=False)


class MetricsLog:
    """``metrics.jsonl``; every method is a no-op on ranks other than the main one (``enabled``)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled

    def start(self) -> None:
        """A new run: an empty file."""
        if self.enabled:
            self.path.write_text("")

    def lines(self) -> list[str]:
        """The file's lines; a torn last line (a crash or a full disk during the append) is dropped."""
        if not self.path.is_file():
            return []
        lines = [line for line in self.path.read_text(errors="replace").splitlines() if line.strip()]
        if lines:
            try:
                json.loads(lines[-1])
            except ValueError:
                log.warning("%s: dropping a torn last line (%d characters): %.80r", self.path,
                            len(lines[-1]), lines[-1])
                lines.pop()
        return lines

    def truncate(self, step: int) -> None:
        """Exact resume: drop the rows after ``step``, only after the last marker line (rows before a
        marker belong to an earlier run in this folder and are never removed)."""
        if not self.enabled:
            return
        lines = self.lines()
        rows = []
        for line in lines:
            try:
                rows.append(json.loads(line))
            except ValueError:
                rows.append(None)                     # an unreadable line is kept as it is
        last_marker = max((i for i, r in enumerate(rows) if r is not None and METRICS_MARKER in r), default=-1)
        keep = lines[:last_marker + 1] + [line for line, r in zip(lines[last_marker + 1:], rows[last_marker + 1:])
                                          if r is None or r.get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def mark(self, what: str, step: int) -> None:
        """A run that starts from weights: append a marker line, keep every earlier row."""
        if not self.enabled:
            return
        lines = self.lines()
        lines.append(strict_json({METRICS_MARKER: what, "step": step, "time": time.time()}))
        self.path.write_text("".join(line + "\n" for line in lines))

    def append(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(strict_json(row) + "\n")


def open_tensorboard(folder: Path, step: int):
    """A SummaryWriter on ``folder`` (None when tensorboard is not installed)."""
    try:
        from torch.utils.tensorboard import SummaryWriter      # optional dependency
    except ImportError:
        log.warning("tensorboard is not installed; TensorBoard scalars are off")
        return None
    # a resumed run drops the events logged after its checkpoint, so curves are not drawn twice
    return SummaryWriter(str(folder), purge_step=step or None)


def log_train_scalars(tb, row: dict, step: int) -> None:
    for k in TRAIN_SCALARS:
        tb.add_scalar(f"train/{k}", row[k], step)
    tb.add_scalar("train/skipped_samples", sum(row["skipped_samples"].values()), step)


def write_retrieval(path: Path, tb, step: int, results: dict) -> None:
    """Append the held-out retrieval results to ``path`` (eval.jsonl) and TensorBoard."""
    with open(path, "a") as fh:
        fh.write(json.dumps({"step": step, **results}) + "\n")
    if tb is not None:
        for m, r in results.items():
            for k, v in r.items():
                if k.startswith(("i2t", "t2i")):
                    tb.add_scalar(f"eval/{m}_{k}", v, step)
