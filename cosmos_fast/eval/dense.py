"""Dense patch features for zero-shot segmentation (image side of cosmos_method.md §6.5).

The features are the patch tokens after ``ln_post`` (no CLS), multiplied by ``visual.proj``
(width → D) and L2-normalised; ``image_token_mapping`` is not used. The official segmentation code
runs this on the **teacher**, in fp32.

With ``csa=True`` the last vision block is replaced at inference by SCLIP's correlative
self-attention (CSA, ``--use-csa``): q, k, v come from the block's packed in-projection on
``ln_1(x)``; per head the attention weights are softmax(q·qᵀ/√d) + softmax(k·kᵀ/√d) (d the head
width, no mask); ``x + out_proj(weights · v)``, then the block's usual MLP residual. The tower's
embedding (patchify, CLS, positional table resampled for non-native sizes, ``ln_pre``) and the
other blocks run unchanged; the model's own forward is not touched.

Sliding windows, text queries and post-processing are :mod:`cosmos_fast.eval.segmentation`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import gathered
from ..model.layers import ResidualAttentionBlock
from .sharding import unwrap


def csa_block(block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """``block`` (a pre-LN residual block) with its self-attention replaced by CSA, on x (N, L, W)."""
    attn = block.attn
    n, length, w = x.shape
    d = w // attn.heads
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(n, length, 3, attn.heads, d).permute(2, 0, 3, 1, 4)      # each N × heads × L × d
    scale = d ** -0.5
    weights = (torch.softmax(q @ q.transpose(-1, -2) * scale, dim=-1)
               + torch.softmax(k @ k.transpose(-1, -2) * scale, dim=-1))
    o = (weights @ v).transpose(1, 2).reshape(n, length, w)
    x = x + attn.out_proj(o)
    return x + block.mlp(block.ln_2(x))


def tower_tokens(visual: nn.Module, images: torch.Tensor, csa: bool = False) -> torch.Tensor:
    """The vision tower's patch tokens after ``ln_post`` (N×g²×width, no CLS), its blocks run one
    by one so the last can be replaced by :func:`csa_block`. With ``csa=False`` this is the tower's
    own forward (tests/test_segmentation.py checks it bit for bit)."""
    grid = visual.check_input(images)
    x = visual.conv1(images).flatten(2).transpose(1, 2)                             # N × g² × width
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + visual.pos_embed(grid).to(x.dtype)
    x = visual.ln_pre(x)
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        x = block(x)
    x = csa_block(blocks[-1], x) if csa else blocks[-1](x)
    return visual.ln_post(x)[:, 1:]


def dense_features(model: nn.Module, images: torch.Tensor, normalize: bool = True, csa: bool = False) -> torch.Tensor:
    """``images`` N×3×H×H → N×g×g×D patch embeddings (g = H / patch size), unit norm by default;
    ``csa`` replaces the last vision block by CSA (module docstring). ``model`` may be wrapped
    (DDP / DeepSpeed) or ZeRO-3 partitioned: its weights are gathered for the call when they are
    not already (a collective then: call it on every rank)."""
    m = unwrap(model)
    with gathered(m):
        if csa:
            tokens = tower_tokens(m.visual, images, csa=True)
        else:
            _, tokens = m.encode_image(images, normalize=False, return_tokens=True)    # N × g² × width
        x = tokens @ m.visual.proj.to(tokens.dtype)                                     # N × g² × D
    if normalize:
        x = F.normalize(x, dim=-1)
    g = math.isqrt(x.shape[1])
    return x.reshape(x.shape[0], g, g, x.shape[-1])
