"""COSMOS' cross-attention pooler with one shared context per sample.

For each sample b with context C_b (L×Dc) and n queries Q_b (n×D):

    K_b, V_b = LN_k(C_b)·W_kᵀ + b_k, LN_k(C_b)·W_vᵀ + b_v      (once per sample)
    Q        = LN_q(Q_b)·W_qᵀ + b_q                             (per query)
    out      = out_proj(MHA-core(Q, K_b, V_b))                   (n×D, no mask, 8 heads)

This equals the official formulation, which repeats the context n times and runs
``nn.MultiheadAttention(query=LN_q(q), key=LN_k(C), value=LN_k(C))`` on every copy, up to
floating-point order — but LN_k and the K/V projections run once per sample instead of n times.
The returned tensor is the attention output *before* the residual add of the raw query. The
attention itself is one of the implementations of the ``cross_pool`` op
(:mod:`cosmos_fast.ops.cross_pool`), which the op's switch picks.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.cross_pool import absorbed_attention, fused_attention, ln_pool, shared_attention
from .attention import attention
from .layers import LayerNorm, PackedAttentionWeights

POOL_IMPLS = ("shared", "absorbed", "fused")     # the implementations that run inside the module


class ContextLayerNorm(LayerNorm):
    """The pooler's LN_k. ``forward(context)`` normalises the context; ``forward(context,
    pool_queries=q̃)`` instead returns Σ_l softmax_l(q̃·LN_k(c_l))·LN_k(c_l), (N, M, W), by the fused
    kernel (:func:`cosmos_fast.ops.cross_pool.ln_pool`), so LN_k's γ and β are read inside this
    module's forward, as ZeRO-3 requires. Same parameters and state-dict keys as a LayerNorm."""

    def forward(self, x: torch.Tensor, pool_queries: torch.Tensor | None = None) -> torch.Tensor:
        if pool_queries is None:
            return super().forward(x)
        return ln_pool(x, pool_queries, self.weight, self.bias, self.eps)


class CrossAttention(PackedAttentionWeights):
    """Cross-attention of queries x (N, n, W) over a context (N, L, W), with ``impl`` one of
    ``"shared"`` (K/V once per context row, the model's attention switch as the core),
    ``"absorbed"`` (no K/V) or ``"fused"`` (no K/V, LN_k and the pooling in a Triton kernel: the
    context is then the raw one and ``ln_k`` the pooler's :class:`ContextLayerNorm`).

    The implementation runs inside this module's forward with this module's weights and
    ``out_proj`` is called as a submodule: DeepSpeed ZeRO-3 gathers parameters per module forward.
    """

    def forward(self, x: torch.Tensor, context: torch.Tensor, impl: str = "shared",
                ln_k: ContextLayerNorm | None = None) -> torch.Tensor:
        if impl == "shared":
            o = shared_attention(x, context, self.in_proj_weight, self.in_proj_bias, self.heads, core=attention)
        elif impl == "absorbed":
            o = absorbed_attention(x, context, self.in_proj_weight, self.in_proj_bias, self.heads)
        elif impl == "fused":
            if ln_k is None:
                raise ValueError("CrossAttention impl='fused' takes the raw context and the pooler's ln_k")
            o = fused_attention(x, context, self.in_proj_weight, self.in_proj_bias, self.heads, ln_k)
        else:
            raise ValueError(f"CrossAttention runs impl {POOL_IMPLS}, got {impl!r} "
                             f"(the 'reference' formulation is cosmos_fast.reference.cross_pool)")
        return self.out_proj(o)


class CrossAttentionPooler(nn.Module):
    """``forward(context: (B, L, Dc), queries: (B, n, D), impl="shared") -> (B, n, D)``.

    State-dict keys are the official ones: ``attn.in_proj_weight`` (3D×D), ``attn.in_proj_bias``,
    ``attn.out_proj.{weight,bias}``, ``ln_q.*``, ``ln_k.*``. COSMOS uses context_dim = d_model; other
    context widths are rejected (the packed in-projection assumes it). ``impl``: see
    :class:`CrossAttention`; :func:`cosmos_fast.ops.cross_pool` chooses it.
    """

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8):
        super().__init__()
        if context_dim != d_model:
            raise ValueError(f"CrossAttentionPooler needs context_dim == d_model "
                             f"(packed K/V projection), got context_dim={context_dim}, d_model={d_model}")
        self.d_model, self.n_head = d_model, n_head
        self.attn = CrossAttention(d_model, n_head)
        self.ln_q = LayerNorm(d_model)
        self.ln_k = ContextLayerNorm(context_dim)

    def forward(self, context: torch.Tensor, queries: torch.Tensor, impl: str = "shared") -> torch.Tensor:
        if context.dim() != 3 or queries.dim() != 3:
            raise ValueError(f"context must be (B, L, Dc) and queries (B, n, D); got "
                             f"{tuple(context.shape)} and {tuple(queries.shape)}")
        if context.shape[0] != queries.shape[0]:
            raise ValueError(f"context batch {context.shape[0]} != queries batch {queries.shape[0]}")
        if context.shape[-1] != self.d_model or queries.shape[-1] != self.d_model:
            raise ValueError(f"pooler width is {self.d_model}; got context width {context.shape[-1]} "
                             f"and query width {queries.shape[-1]}")
        if impl == "fused":         # LN_k runs inside the kernel, called from attn through ln_k's forward
            return self.attn(self.ln_q(queries), context, impl=impl, ln_k=self.ln_k)
        return self.attn(self.ln_q(queries), self.ln_k(context), impl=impl)
