"""Cross-modal features through the fused Triton attention core (``cross_pool`` impl ``"fused"``).

    K_b, V_b = LN_k(C_b)·W_kᵀ + b_k, LN_k(C_b)·W_vᵀ + b_v     once per sample (cuBLAS, B·L rows)
    Q        = LN_q(Q_b)·W_qᵀ + b_q                            B·n rows
    A        = attention core, per (sample, head)               Triton (cosmos_fast.kernels.cross_pool)
    out      = normalize(Q_b + out_proj(A))                     (B, n, D)

LayerNorms, projections, the residual add and the L2 normalisation stay in PyTorch; the kernel
reads the head-split projections in place and returns a buffer whose head merge is free.
Differentiable in the queries, the context and every pooler parameter.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F


def _kernel_module():
    try:
        from cosmos_fast.kernels import cross_pool as kernel
    except ImportError as e:            # triton missing (the kernels module imports it)
        raise RuntimeError(f"cross_pool impl='fused' needs triton, which failed to import: {e}") from e
    return kernel


def cross_pool_fused(pooler, context: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """norm(queries + pooler(context, queries)) with the Triton attention core.

    pooler: a :class:`cosmos_fast.model.pooler.CrossAttentionPooler` (width D, H heads);
    context: (B, L, D), one shared context per sample; queries: (B, n, D), 1 ≤ n ≤ 128.
    Returns (B, n, D) L2-normalised features in the queries' dtype (or the autocast dtype).
    Needs CUDA tensors, or TRITON_INTERPRET=1 set before the kernel module is first imported.
    """
    if not queries.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError(
            f"cross_pool impl='fused' runs Triton kernels and needs CUDA tensors, got {queries.device}; "
            "use impl='shared' (or 'auto') on CPU, or set TRITON_INTERPRET=1 before import to run the "
            "Triton interpreter (slow, for tests)")
    kernel = _kernel_module()
    # through the pooler's own forward (which validates the shapes, and reads the weights inside
    # their modules as ZeRO-3 needs): LN_k and K/V once per sample, the Triton kernel as the core
    pooled = pooler(context, queries, core=kernel.cross_pool_attn)
    return F.normalize(queries + pooled, dim=-1)
