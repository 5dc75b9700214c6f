"""Transformer building blocks with the open_clip / COSMOS parameter names.

Every module here keeps the official state-dict keys (``attn.in_proj_weight``, ``attn.in_proj_bias``,
``attn.out_proj.*``, ``ln_1.*``, ``ln_2.*``, ``mlp.c_fc.*``, ``mlp.c_proj.*``) so released COSMOS and
open_clip checkpoints load with ``strict=True``. Layout is batch-first throughout.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import attention


class LayerNorm(nn.LayerNorm):
    """LayerNorm (eps 1e-5) that returns the input dtype; under autocast it computes in fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class PackedAttention(nn.Module):
    """Multi-head attention weights in ``nn.MultiheadAttention``'s packed layout.

    Holds ``in_proj_weight`` (3W×W), ``in_proj_bias`` (3W) and ``out_proj`` (W→W) with
    ``nn.MultiheadAttention``'s default initialisation. ``forward(x)`` is self-attention;
    ``forward(x, context=c)`` is cross-attention of the queries x over the keys/values of c
    (projected once per context row). Every weight is read inside this module's own forward, as
    ZeRO-3 requires (it gathers a module's parameters when that module's forward runs).
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"attention width {width} is not divisible by heads {heads}")
        self.width, self.heads = width, heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def project(self, x: torch.Tensor, which: int) -> torch.Tensor:
        """Apply the q (0), k (1) or v (2) input projection to ``x`` (..., W)."""
        w = self.width
        return F.linear(x, self.in_proj_weight[which * w:(which + 1) * w],
                        self.in_proj_bias[which * w:(which + 1) * w])

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        return x.unflatten(-1, (self.heads, self.width // self.heads)).transpose(1, 2)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        n, _, length, _ = x.shape
        return x.transpose(1, 2).reshape(n, length, self.width)

    def _absorbed_cross(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Cross-attention of x (N×n×W) over context (N×L×W) with the K/V projections absorbed.

        Per head h with q_h = W_q,h x + b_q,h (scaled by d^-1/2):
            q_h · (W_k,h c_l + b_k,h) = (W_k,hᵀ q_h) · c_l + const      (b_k cancels in the softmax)
            Σ_l p_l (W_v,h c_l + b_v,h) = W_v,h (Σ_l p_l c_l) + b_v,h   (the weights sum to 1)
        so no L-row K or V is formed: the scores and the pooled context cost n·H·L·W multiply-adds
        per sample instead of the 2·L·W² of the K/V projections (8× fewer for COSMOS' n = H = 8,
        W = 512). Equal to the K/V formulation up to floating-point order; b_k gets a zero gradient
        (its exact gradient: the softmax is invariant to it).
        """
        n_batch, n, w = x.shape
        heads, d = self.heads, self.width // self.heads
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, _, bv = self.in_proj_bias.chunk(3)
        q = F.linear(x, wq, bq) * d ** -0.5                                       # N × n × W
        # The core in fp32 (fp64 stays), like SDPA's internal softmax: in bf16 the W-long absorbed
        # queries, score dot products and their rounding before the softmax would double the K/V
        # formulation's error (measured on an H200: 2.4× torch bf16's error on the queries' gradient).
        acc = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            q = q.to(acc).reshape(n_batch * n, heads, d).transpose(0, 1)          # H × Nn × d
            qk = torch.matmul(q, wk.to(acc).view(heads, d, w))                    # H × Nn × W
            qk = qk.view(heads, n_batch, n, w).permute(1, 2, 0, 3).reshape(n_batch, n * heads, w)
            ctx = context.to(acc)
            p = torch.matmul(qk, ctx.transpose(1, 2)).softmax(dim=-1)           # N × nH × L
            pooled = torch.matmul(p, ctx)                                         # N × nH × W
            pooled = pooled.view(n_batch * n, heads, w).transpose(0, 1)           # H × Nn × W
            o = torch.matmul(pooled, wv.to(acc).view(heads, d, w).transpose(1, 2))   # H × Nn × d
        o = o.transpose(0, 1).reshape(n_batch, n, w).to(x.dtype) + bv
        return self.out_proj(o)

    def forward(self, x: torch.Tensor, causal: bool = False, context: torch.Tensor | None = None,
                core=None, absorbed: bool = False) -> torch.Tensor:
        """Self-attention over x, or (with ``context``) cross-attention of x over context; ``core``
        replaces the attention core (q, k, v) -> o for the cross-attention (the fused kernel);
        ``absorbed`` computes the cross-attention without K and V (:meth:`_absorbed_cross`)."""
        if context is not None and absorbed:
            return self._absorbed_cross(x, context)
        if context is not None:
            w = self.width
            q = self.split_heads(self.project(x, 0))                   # N × H × n × d
            # K and V in one matmul over the context (one weight slice, one gradient buffer)
            kv = F.linear(context, self.in_proj_weight[w:], self.in_proj_bias[w:])
            k, v = (self.split_heads(t) for t in kv.chunk(2, dim=-1))  # N × H × L × d (views)
            o = core(q, k, v) if core is not None else attention(q, k, v, causal=causal)
            return self.out_proj(self.merge_heads(o))
        n, length, w = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(n, length, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        return self.out_proj(self.merge_heads(attention(q, k, v, causal=causal)))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x)) with exact GELU."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = LayerNorm(width)
        self.attn = PackedAttention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(width, hidden), gelu=nn.GELU(), c_proj=nn.Linear(hidden, width)))

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.width, self.layers = width, layers
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers))

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, causal, use_reentrant=False)
            else:
                x = block(x, causal=causal)
        return x


def resample_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """COSMOS' per-forward resampling of a (1 + g0², C) positional table to (1 + grid², C).

    Bicubic (a = -0.75, clamped borders, ``align_corners=False``, no antialias) with the explicit
    scale factor ((grid + 0.1) / g0) in both directions, so source coordinates are
    (j + 0.5)·g0/(grid + 0.1) − 0.5. The CLS row is kept as is. Gradients flow into ``pos``.
    """
    cls, patch = pos[:1], pos[1:]
    g0 = math.isqrt(patch.shape[0])
    if g0 * g0 != patch.shape[0]:
        raise ValueError(f"positional table has {patch.shape[0]} patch rows, not a square grid")
    channels = patch.shape[1]
    scale = (grid + 0.1) / g0
    patch = patch.reshape(1, g0, g0, channels).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, scale_factor=(scale, scale), mode="bicubic", align_corners=False)
    if patch.shape[-2:] != (grid, grid):
        raise RuntimeError(f"positional resampling produced {tuple(patch.shape[-2:])}, "
                           f"expected ({grid}, {grid})")
    patch = patch.permute(0, 2, 3, 1).reshape(grid * grid, channels)
    return torch.cat([cls, patch], dim=0)
