"""Reference cross-attention pooling: the official formulation, kept as the spec and CPU truth.

The official student repeats each sample's context once per query (crop-/caption-major tiling),
runs ``LN_k`` and the K/V projections on every copy and applies ``nn.MultiheadAttention`` to one
query at a time; the pooled vector is added to the raw query and L2-normalised.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pool_repeat(pooler, context: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Attention output of ``pooler`` (a CrossAttentionPooler) via the repeat formulation.

    context: (B, L, Dc); queries: (B, n, D). Returns (B, n, D), before the residual add.
    """
    b, n, d = queries.shape
    # the official order (cosmos_method.md §1.6): repeat the raw context, then LN_k on every copy
    ctx = pooler.ln_k(context.repeat(n, 1, 1))                       # (n·B) × L × Dc, query-major
    q = pooler.ln_q(queries.transpose(0, 1).reshape(n * b, 1, d))     # (n·B) × 1 × D
    a = pooler.attn
    out, _ = F.multi_head_attention_forward(
        q.transpose(0, 1), ctx.transpose(0, 1), ctx.transpose(0, 1),
        embed_dim_to_check=d, num_heads=pooler.n_head,
        in_proj_weight=a.in_proj_weight, in_proj_bias=a.in_proj_bias,
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
        out_proj_weight=a.out_proj.weight, out_proj_bias=a.out_proj.bias,
        training=False, need_weights=False)
    return out.squeeze(0).view(n, b, d).transpose(0, 1)


def cross_pool_reference(pooler, context: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """norm(queries + pool_repeat(...)): the cross-modal features, (B, n, D)."""
    return F.normalize(queries + pool_repeat(pooler, context, queries), dim=-1)
