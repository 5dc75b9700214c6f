"""COSMOS' cross-attention pooler with one shared context per sample.

For each sample b with context C_b (L×Dc) and n queries Q_b (n×D):

    K_b, V_b = LN_k(C_b)·W_kᵀ + b_k, LN_k(C_b)·W_vᵀ + b_v      (once per sample)
    Q        = LN_q(Q_b)·W_qᵀ + b_q                             (per query)
    out      = out_proj(MHA-core(Q, K_b, V_b))                   (n×D, no mask, 8 heads)

This equals the official formulation, which repeats the context n times and runs
``nn.MultiheadAttention(query=LN_q(q), key=LN_k(C), value=LN_k(C))`` on every copy, up to
floating-point order — but LN_k and the K/V projections run once per sample instead of n times.
The returned tensor is the attention output *before* the residual add of the raw query.
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import LayerNorm, PackedAttention


class CrossAttentionPooler(nn.Module):
    """``forward(context: (B, L, Dc), queries: (B, n, D)) -> (B, n, D)``.

    State-dict keys are the official ones: ``attn.in_proj_weight`` (3D×D), ``attn.in_proj_bias``,
    ``attn.out_proj.{weight,bias}``, ``ln_q.*``, ``ln_k.*``. COSMOS uses context_dim = d_model; other
    context widths are rejected (the packed in-projection assumes it).
    """

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8):
        super().__init__()
        if context_dim != d_model:
            raise ValueError(f"CrossAttentionPooler needs context_dim == d_model "
                             f"(packed K/V projection), got context_dim={context_dim}, d_model={d_model}")
        self.d_model, self.n_head = d_model, n_head
        self.attn = PackedAttention(d_model, n_head)
        self.ln_q = LayerNorm(d_model)
        self.ln_k = LayerNorm(context_dim)

    def forward(self, context: torch.Tensor, queries: torch.Tensor, core=None, absorbed: bool = False) -> torch.Tensor:
        """``core``: an alternative attention core (q, k, v) -> o, e.g. the fused Triton kernel;
        ``absorbed``: attend without forming K and V (see ``PackedAttention._absorbed_cross``)."""
        if context.dim() != 3 or queries.dim() != 3:
            raise ValueError(f"context must be (B, L, Dc) and queries (B, n, D); got "
                             f"{tuple(context.shape)} and {tuple(queries.shape)}")
        if context.shape[0] != queries.shape[0]:
            raise ValueError(f"context batch {context.shape[0]} != queries batch {queries.shape[0]}")
        if context.shape[-1] != self.d_model or queries.shape[-1] != self.d_model:
            raise ValueError(f"pooler width is {self.d_model}; got context width {context.shape[-1]} "
                             f"and query width {queries.shape[-1]}")
        return self.attn(self.ln_q(queries), context=self.ln_k(context), core=core, absorbed=absorbed)
