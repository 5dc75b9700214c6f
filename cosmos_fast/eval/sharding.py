"""How evaluation runs on every rank: the rank sharding of the items (:class:`Shards`), the model
behind a DDP / DeepSpeed wrapper (:func:`unwrap`), the ZeRO-3 weights gathered for the evaluation
(:func:`cosmos_fast.engine.gathered`) and autocast (:func:`autocast`). DeepSpeed training itself is
:mod:`cosmos_fast.engine`.

Every rank encodes a contiguous slice of the items and the slices are ``all_gather``ed, so every rank
ends with the full feature matrix and computes the same metrics: there is no rank-0-only path, which
deadlocks under ZeRO-3 where each forward gathers parameters from all ranks (cosmos_method.md §7
item 19). For the same reason every rank gets exactly ``ceil(n / world)`` items: a short last slice
is padded with copies of an item, so all ranks run the same number of forward calls; the padding
rows are dropped after the gather.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from torch import nn


class Shards:
    """Rank / world of the evaluation and the slice of ``n`` items each rank encodes."""

    def __init__(self, distributed: bool | None = None, group=None):
        initialised = dist.is_available() and dist.is_initialized()
        if distributed is None:
            distributed = initialised
        if distributed and not initialised:
            raise RuntimeError("distributed evaluation was requested but torch.distributed is not initialised")
        self.group = group
        self.distributed = bool(distributed)
        self.world = dist.get_world_size(group) if self.distributed else 1
        self.rank = dist.get_rank(group) if self.distributed else 0

    def per_rank(self, n: int) -> int:
        return math.ceil(n / self.world)

    def indices(self, n: int) -> list[int]:
        """This rank's items (``per_rank(n)`` of them, padded with a repeated index)."""
        per = self.per_rank(n)
        start = min(self.rank * per, n)
        own = list(range(start, min(start + per, n)))
        pad = own[-1] if own else n - 1
        return own + [pad] * (per - len(own))

    def gather(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """Rows of every rank (each ``per_rank(n)`` long) → the ``n`` real rows in item order."""
        if self.world == 1:
            return local[:n]
        per = self.per_rank(n)
        if local.shape[0] != per:
            raise ValueError(f"rank {self.rank} holds {local.shape[0]} rows, expected {per}")
        # NCCL gathers device tensors, gloo host tensors
        comm = local.cuda() if dist.get_backend(self.group) == "nccl" else local.cpu()
        parts = [torch.empty_like(comm) for _ in range(self.world)]
        dist.all_gather(parts, comm.contiguous(), group=self.group)
        rows = [p[:max(0, min(per, n - r * per))] for r, p in enumerate(parts)]
        return torch.cat(rows).to(local.device)


def unwrap(model: nn.Module) -> nn.Module:
    """The CosmosCLIP behind a DDP / DeepSpeed wrapper (a bare model is returned as is, so the
    never-wrapped teacher works too — §7 item 19)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype`` on ``device`` (fp32, i.e. no autocast, when ``dtype`` is None)."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
