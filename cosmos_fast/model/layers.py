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


class PackedAttentionWeights(nn.Module):
    """Multi-head attention weights in ``nn.MultiheadAttention``'s packed layout.

    Holds ``in_proj_weight`` (3W×W), ``in_proj_bias`` (3W) and ``out_proj`` (W→W) with
    ``nn.MultiheadAttention``'s default initialisation (in this order, which fixes the RNG draws).
    :class:`PackedAttention` (self-attention) and the pooler's
    :class:`cosmos_fast.model.pooler.CrossAttention` add the forward; each reads its weights inside
    its own forward, as ZeRO-3 requires (it gathers a module's parameters when that module's
    forward runs).
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


class PackedAttention(PackedAttentionWeights):
    """Multi-head self-attention over x (N, L, W), causal or not, through the model's attention
    switch (:mod:`cosmos_fast.model.attention`)."""

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        n, length, w = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(n, length, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        o = attention(q, k, v, causal=causal)
        return self.out_proj(o.transpose(1, 2).reshape(n, length, w))


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


def _run_block(block: ResidualAttentionBlock, x: torch.Tensor, causal: bool) -> torch.Tensor:
    return block(x, causal=causal)


_compiled_blocks: dict = {}


def compiled_block(backend: str = "inductor"):
    """The one ``torch.compile``'d block call every compiled :class:`Transformer` shares (regional
    compilation). The block is an argument, so its weights are graph inputs and one graph serves
    every layer of every tower of every model with that token shape; ``dynamic=False`` keeps one
    graph per static shape (224-px crops, 96-px crops, captions; with and without grad). Tests
    pass ``backend="aot_eager"``: the same tracing without inductor's code generation."""
    if backend not in _compiled_blocks:
        _compiled_blocks[backend] = torch.compile(_run_block, backend=backend, dynamic=False)
    return _compiled_blocks[backend]


class Transformer(nn.Module):
    """The residual blocks. With ``compiled`` set to a ``torch.compile`` backend name
    (:meth:`cosmos_fast.model.CosmosCLIP.set_compiled_blocks`) each block runs through
    :func:`compiled_block` in training mode; ``eval()`` runs them eagerly, so evaluation's other
    batch sizes compile nothing."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.width, self.layers = width, layers
        self.grad_checkpointing = False
        self.compiled: str | None = None
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers))

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        run = compiled_block(self.compiled) if self.compiled and self.training else _run_block
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(run, block, x, causal, use_reentrant=False)
            else:
                x = run(block, x, causal)
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
