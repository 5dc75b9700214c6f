"""Reference cross-attention pooling: the official formulation, kept as the spec and CPU truth.

The official pooler (cosmos_method.md §1.5) is ``LN_q`` / ``LN_k`` and one
``nn.MultiheadAttention(D, 8)``; the official student (§1.6) repeats each sample's context once per
query (crop-/caption-major tiling), runs ``LN_k`` and the K/V projections on every copy and
attends with one query at a time; the pooled vector is added to the raw query and L2-normalised.

* :class:`OfficialPooler` — that module, with the official state-dict keys (a
  :class:`cosmos_fast.model.pooler.CrossAttentionPooler` state dict loads into it with
  ``strict=True``), and :func:`official_features` — the repeat tiling, residual and normalisation
  around it. The tests' truth.
* :func:`pool_repeat` / :func:`cross_pool_reference` — the same formulation on a
  ``CrossAttentionPooler``'s own modules and weights (the ``cross_pool`` op's ``"reference"``
  implementation) through ``F.multi_head_attention_forward``, which ``nn.MultiheadAttention``
  runs too; the two agree up to floating-point order (the module projects K and V in one packed
  matmul because its key and value are one tensor; tests/test_cross_pool.py checks both).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class OfficialPooler(nn.Module):
    """``LN_q``, ``LN_k`` and ``nn.MultiheadAttention``, as the official module.

    ``forward(context_repeated: (n·B, L, D), query: (n·B, 1, D)) -> (n·B, 1, D)``: one query per
    copy of the context, before the residual add.
    """

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln_q = nn.LayerNorm(d)
        self.ln_k = nn.LayerNorm(d)

    def forward(self, context_repeated: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        c = self.ln_k(context_repeated)
        return self.attn(self.ln_q(query), c, c, need_weights=False)[0]


def official_features(pooler: OfficialPooler, context: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """The official cross-modal features: context (B, L, D) repeated query-major, one query
    (B, n, D) per copy through ``pooler``, residual add and L2 normalisation. Returns (B, n, D)."""
    b, n, d = queries.shape
    ctx = context.repeat(n, 1, 1)                         # query-major tiling, as in the official code
    q = queries.transpose(0, 1).reshape(n * b, 1, d)
    pooled = pooler(ctx, q).squeeze(1)
    return F.normalize(q.squeeze(1) + pooled, dim=-1).view(n, b, d).transpose(0, 1)


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
