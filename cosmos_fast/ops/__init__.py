"""The one switch that decides how each fused op runs.

Ops and the implementations available today:

* ``cross_pool(pooler, context, queries, impl)`` → norm(queries + pooler(context, queries)), (B, n, D)
    - ``"fused"``     : LN_k and K/V once per sample, Triton attention core (kernels/cross_pool.py)
    - ``"absorbed"``  : LN_k once per sample, no K/V: W_k folded into the queries and W_v applied
                        to the attention-pooled context (n·H·L·D instead of 2·L·D² multiply-adds
                        per sample; the CPU default when n·H < D)
    - ``"shared"``    : LN_k and K/V once per sample, PyTorch attention
    - ``"reference"`` : the official repeat-the-context formulation (cosmos_fast.reference)
* ``contrastive`` (the COSMOS loss) is selected through ``CosmosLoss(impl=...)``:
    - ``"fused"``     : Triton kernels (kernels/contrastive.py), no B×B tensor; CUDA, or the Triton
                        interpreter when TRITON_INTERPRET=1
    - ``"blockwise"`` : the same algorithm in PyTorch tiles (the CPU path)
    - ``"reference"`` : per-pair B×B logits, exactly the official loss

``"auto"`` picks the fastest implementation measured for the inputs: on CUDA the Triton loss and the
shared-K/V pooler (PyTorch's SDPA beat the Triton pooling core on an H200), on CPU the blockwise loss
and the absorbed pooler (shared-K/V when n·H ≥ D). The environment variable
``COSMOS_FAST_IMPL`` (e.g. ``reference``) overrides ``"auto"`` everywhere for debugging.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..reference.cross_pool import cross_pool_reference

CROSS_POOL_IMPLS = ("fused", "absorbed", "shared", "reference")
CONTRASTIVE_IMPLS = ("fused", "blockwise", "reference")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_runnable(device: torch.device) -> bool:
    """Triton kernels run natively on CUDA, or on CPU tensors under TRITON_INTERPRET=1."""
    if not triton_available():
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_contrastive_impl(impl: str = "auto", device: torch.device | None = None) -> str:
    """Validate ``impl``; with a device, also turn ``"auto"`` into a concrete implementation."""
    if impl == "auto":
        override = os.environ.get("COSMOS_FAST_IMPL")
        if override in CONTRASTIVE_IMPLS:
            impl = override
        elif device is not None:
            impl = "fused" if device.type == "cuda" and triton_available() else "blockwise"
        else:
            return "auto"
    if impl not in CONTRASTIVE_IMPLS:
        raise ValueError(f"unknown contrastive implementation {impl!r}; available: {('auto',) + CONTRASTIVE_IMPLS}")
    if impl == "fused" and device is not None and not triton_runnable(device):
        raise RuntimeError(f"contrastive impl='fused' needs CUDA tensors (got {device}) and triton, or "
                           f"TRITON_INTERPRET=1 for testing; use impl='blockwise' on CPU")
    return impl


def resolve_cross_pool_impl(impl: str = "auto", device: torch.device | None = None,
                            shape: tuple[int, int, int] | None = None) -> str:
    """Validate ``impl``; ``"auto"`` becomes shared on CUDA (measured fastest there: on an H200 in bf16,
    fwd+bwd at L = 196, B = 128 took 1.81 ms shared, 2.35 ms fused, 2.36 ms absorbed, 4.48 ms
    reference; bench_results/cross_pool), otherwise absorbed when ``shape`` = (n queries, heads,
    width) has n·heads < width (fewer FLOPs than K/V), else shared."""
    if impl == "auto":
        override = os.environ.get("COSMOS_FAST_IMPL")
        if override in CROSS_POOL_IMPLS:
            return override
        if device is not None and device.type == "cuda":
            return "shared"
        if shape is not None and shape[0] * shape[1] >= shape[2]:
            return "shared"
        return "absorbed"
    if impl not in CROSS_POOL_IMPLS:
        raise ValueError(f"unknown cross_pool implementation {impl!r}; available: {('auto',) + CROSS_POOL_IMPLS}")
    return impl


def cross_pool(pooler, context: torch.Tensor, queries: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Cross-modal features norm(q + attn(LN_q(q), LN_k(C))) for (B, n, D) queries over (B, L, D) context."""
    impl = resolve_cross_pool_impl(impl, queries.device, (queries.shape[-2], pooler.n_head, pooler.d_model))
    if impl == "reference":
        return cross_pool_reference(pooler, context, queries)
    if impl == "fused":
        from ..fused_cross_pool import cross_pool_fused   # lazy: imports triton

        return cross_pool_fused(pooler, context, queries)
    return F.normalize(queries + pooler(context, queries, absorbed=impl == "absorbed"), dim=-1)
