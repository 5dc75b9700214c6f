"""The COSMOS CLIP: open_clip ViT image tower + text transformer + two cross-attention poolers.

Parameter names, shapes and state-dict order are those of the official COSMOS checkpoints
(cosmos_method.md §1.10): the text tower sits at the top level (``transformer.*``,
``token_embedding``, ``positional_embedding``, ``ln_final``, ``text_projection``), the image pooler
at ``visual.attn_cross_pool`` and the text pooler at ``text_attn_cross_pool``.

Caption truncation (``truncate_captions``, config ``model.truncate_captions``). The text tower is
causal and pools the first end-of-text token (the argmax id, as open_clip), so a caption's global
feature does not depend on any position after that token. Only caption 0's token features feed a
pooler (the image pooler's context, cosmos_method.md §1.6); student captions 1+ and the teacher's
captions are therefore run only up to the batch's last end-of-text position, rounded up to a multiple
of :data:`TEXT_BUCKET` (few distinct shapes), with the positional table and the causal mask sliced to
that length. The result equals the full-length run up to floating-point reassociation in the shorter
matrix products (tests/test_caption_truncation.py). Finding the length reads one integer from the
device (a host sync on CUDA); :func:`executed_text_tokens` counts the tokens a step then runs.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.cross_pool import cross_pool
from .config import ModelConfig, resolve_model_config
from .layers import LayerNorm, Transformer, resample_pos_embed
from .pooler import CrossAttentionPooler

LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)
TEXT_BUCKET = 16          # truncated caption lengths are multiples of this (or the full context)


def truncated_length(text: torch.Tensor, context_length: int, bucket: int = TEXT_BUCKET) -> int:
    """The length the rows of ``text`` (N × L token ids) are run at: one past the last row's first
    end-of-text (argmax) position, rounded up to a multiple of ``bucket``, at most ``context_length``."""
    if text.shape[0] == 0:
        return context_length
    last = int(text.argmax(dim=-1).max())
    return min(context_length, -(-(last + 1) // bucket) * bucket)


def text_runs(captions: torch.Tensor, batch_size: int, context_length: int, truncate: bool = True) -> dict:
    """The text-tower calls of one COSMOS step as (rows, length) pairs, for the student (all
    caption-major ``captions``) and the teacher (the first two captions)."""
    b, n = batch_size, captions.shape[0]
    if not truncate:
        return {"student": [(n, context_length)], "teacher": [(min(n, 2 * b), context_length)]}
    rest = truncated_length(captions[b:], context_length)
    student = [(n, context_length)] if rest == context_length else [(b, context_length), (n - b, rest)]
    return {"student": student, "teacher": [(min(n, 2 * b), truncated_length(captions[:2 * b], context_length))]}


def executed_text_tokens(captions: torch.Tensor, batch_size: int, context_length: int, truncate: bool = True) -> dict:
    """Text tokens one COSMOS step runs through the towers: ``student`` / ``teacher`` as executed
    (with ``truncate``), and ``official_student`` / ``official_teacher`` at the full context for every
    caption. Per token the tower's FLOPs are linear in these counts, except attention's (rows × length²)."""
    runs = text_runs(captions, batch_size, context_length, truncate)
    full = text_runs(captions, batch_size, context_length, truncate=False)
    count = lambda r: sum(rows * length for rows, length in r)             # noqa: E731
    return {"student": count(runs["student"]), "teacher": count(runs["teacher"]),
            "official_student": count(full["student"]), "official_teacher": count(full["teacher"])}


class VisionTower(nn.Module):
    """ViT image tower (``visual.*`` keys), owner of the image cross-attention pooler.

    ``forward(x)`` on N×3×H×H returns the global embedding f (N×D, un-normalised) and, with
    ``return_tokens``, the patch tokens after ``ln_post`` without CLS (N×g²×width).
    """

    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int,
                 mlp_ratio: float, output_dim: int, pooler_heads: int = 8):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"vision_cfg.image_size {image_size} is not a multiple of "
                             f"vision_cfg.patch_size {patch_size}")
        self.image_size, self.patch_size, self.width = image_size, patch_size, width
        self.grid = image_size // patch_size
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid ** 2 + 1, width))
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp_ratio)
        self.attn_cross_pool = CrossAttentionPooler(output_dim, output_dim, n_head=pooler_heads)
        self.ln_post = LayerNorm(width)

    def check_input(self, x: torch.Tensor) -> int:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"image batch must be N×3×H×W, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h != w:
            raise ValueError(f"image size {h}×{w} is not square")
        if h % self.patch_size:
            raise ValueError(f"image size {h} is not a multiple of the patch size {self.patch_size}")
        return h // self.patch_size

    def pos_embed(self, grid: int) -> torch.Tensor:
        if grid == self.grid:
            return self.positional_embedding
        return resample_pos_embed(self.positional_embedding, grid)

    def forward(self, x: torch.Tensor, return_tokens: bool = False):
        grid = self.check_input(x)
        x = self.conv1(x).flatten(2).transpose(1, 2)                  # N × g² × width
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed(grid).to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        x = self.ln_post(x)
        f = x[:, 0] @ self.proj
        return (f, x[:, 1:]) if return_tokens else f


class CosmosCLIP(nn.Module):
    def __init__(self, cfg: ModelConfig, pool_impl: str = "auto", truncate_captions: bool = True):
        super().__init__()
        self.cfg = cfg
        self.pool_impl = pool_impl
        self.truncate_captions = truncate_captions        # see the module docstring
        v, t, d = cfg.vision_cfg, cfg.text_cfg, cfg.embed_dim
        self.embed_dim = d
        self.context_length, self.vocab_size = t.context_length, t.vocab_size
        # parameters first: their order is the state-dict order of the official files
        self.positional_embedding = nn.Parameter(torch.empty(t.context_length, t.width))
        self.text_projection = nn.Parameter(torch.empty(t.width, d))
        # the two scalars live as 1-element tensors (DeepSpeed cannot broadcast 0-dim parameters);
        # state dicts carry the official 0-dim shape (see _scalars_to_0d / _scalars_from_0d)
        self.logit_scale = nn.Parameter(torch.full((1,), LOGIT_SCALE_INIT))
        self.distill_logit_scale = nn.Parameter(torch.full((1,), LOGIT_SCALE_INIT))
        self.visual = VisionTower(v.image_size, v.patch_size, v.width, v.layers, v.heads,
                                  v.mlp_ratio, output_dim=d)
        self.transformer = Transformer(t.width, t.layers, t.heads, t.mlp_ratio)
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.ln_final = LayerNorm(t.width)
        self.text_attn_cross_pool = CrossAttentionPooler(t.width, t.width, n_head=8)
        self.image_token_mapping = nn.Linear(v.width, d)
        self.text_token_mapping = nn.Linear(t.width, d)
        self._init_text()
        self.register_state_dict_post_hook(_scalars_to_0d)
        self.register_load_state_dict_pre_hook(_scalars_from_0d)

    # ------------------------------------------------------------------ init
    def _init_text(self) -> None:
        t = self.cfg.text_cfg
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        attn_std = t.width ** -0.5
        proj_std = t.width ** -0.5 * (2 * t.layers) ** -0.5
        fc_std = (2 * t.width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=t.width ** -0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.transformer.grad_checkpointing = enable
        self.transformer.grad_checkpointing = enable

    def set_compiled_blocks(self, enable: bool = True, backend: str = "inductor") -> None:
        """Run both towers' blocks through one shared ``torch.compile``'d block call in training
        mode (:func:`cosmos_fast.model.layers.compiled_block`); eager when False or in ``eval()``."""
        self.visual.transformer.compiled = backend if enable else None
        self.transformer.compiled = backend if enable else None

    # --------------------------------------------------------------- encoders
    def encode_image(self, image: torch.Tensor, normalize: bool = True, return_tokens: bool = False):
        """Global image embedding (N×D); with ``return_tokens`` also the patch tokens after
        ``ln_post`` (N×g²×width, no CLS, not mapped) for dense tasks."""
        f, tokens = self.visual(image, return_tokens=True)
        if normalize:
            f = F.normalize(f, dim=-1)
        return (f, tokens) if return_tokens else f

    def _check_text(self, text: torch.Tensor) -> None:
        if text.dim() != 2 or text.shape[1] != self.context_length:
            raise ValueError(f"captions must be (N, {self.context_length}) token ids, got shape "
                             f"{tuple(text.shape)}")
        if text.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"captions must be integer token ids, got dtype {text.dtype}")
        if not text.is_cuda and text.numel() and (text.min() < 0 or text.max() >= self.vocab_size):
            raise ValueError(f"caption token ids must lie in [0, {self.vocab_size}), got range "
                             f"[{int(text.min())}, {int(text.max())}]")

    def encode_text(self, text: torch.Tensor, normalize: bool = True, return_tokens: bool = False,
                    truncate: bool | None = None):
        """Global text embedding (N×D) from the first EOT (argmax id); with ``return_tokens`` also
        all positions after ``ln_final`` (N×L×width, not mapped). ``truncate`` (default: the model's
        ``truncate_captions`` unless tokens are returned) runs the rows only up to their bucketed last
        end-of-text position (module docstring)."""
        self._check_text(text)
        eot = text.argmax(dim=-1)
        if truncate is None:
            truncate = self.truncate_captions and not return_tokens
        elif truncate and return_tokens:
            raise ValueError("encode_text: truncate=True returns no token features for the cut positions; "
                             "pass return_tokens=False")
        length = truncated_length(text, self.context_length) if truncate else self.context_length
        pos = self.positional_embedding[:length] if length < self.context_length else self.positional_embedding
        x = self.token_embedding(text[:, :length]) + pos.to(self.token_embedding.weight.dtype)
        x = self.ln_final(self.transformer(x, causal=True))
        pooled = x[torch.arange(x.shape[0], device=x.device), eot]
        g = pooled @ self.text_projection
        if normalize:
            g = F.normalize(g, dim=-1)
        return (g, x) if return_tokens else g

    # ---------------------------------------------------------------- forward
    def forward(self, images, captions: torch.Tensor, batch_size: int | None = None) -> dict:
        """Student path with ``batch_size`` (crop list + caption-major captions), otherwise the
        teacher / evaluation path (one image batch, unimodal features only)."""
        if batch_size is None:
            if isinstance(images, (list, tuple)):
                images = torch.cat(list(images))
            return {
                "image_features": self.encode_image(images),
                "text_features": self.encode_text(captions),
                "logit_scale": self.logit_scale.exp().reshape(()),
                "distill_logit_scale": self.distill_logit_scale.exp().reshape(()),
            }
        return self.forward_multicrop(images, captions, batch_size)

    def _check_multicrop(self, crops, captions, batch_size: int) -> int:
        if not isinstance(crops, (list, tuple)):
            raise TypeError(f"crops must be a list of image tensors, got {type(crops).__name__}")
        if len(crops) < 2:
            raise ValueError(f"crop list has length {len(crops)}; COSMOS needs 2 global crops "
                             f"followed by the local crops")
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        for i, c in enumerate(crops):
            if not torch.is_tensor(c) or c.dim() != 4 or c.shape[0] != batch_size:
                shape = tuple(c.shape) if torch.is_tensor(c) else type(c).__name__
                raise ValueError(f"crop {i} must be a {batch_size}×3×H×W tensor, got {shape}")
        if crops[0].shape != crops[1].shape:
            raise ValueError(f"the two global crops differ in size: {tuple(crops[0].shape)} vs "
                             f"{tuple(crops[1].shape)}")
        n = captions.shape[0]
        if captions.dim() != 2 or n % batch_size or n < batch_size:
            raise ValueError(f"captions of shape {tuple(captions.shape)}: the row count {n} is not "
                             f"a positive multiple of batch_size {batch_size}")
        return n // batch_size

    def _encode_crop_runs(self, crops: Sequence[torch.Tensor]):
        """One tower call per run of equal-size crops; tokens kept for the first run only."""
        feats, tokens, start = [], None, 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            x = torch.cat(list(crops[start:end])) if end - start > 1 else crops[start]
            if start == 0:
                f, tokens = self.visual(x, return_tokens=True)
            else:
                f = self.visual(x)
            feats.append(f)
            start = end
        return torch.cat(feats), tokens

    def _encode_captions(self, captions: torch.Tensor, b: int):
        """Caption 0 at full length (its tokens are the image pooler's context), the others truncated
        when ``truncate_captions`` cuts anything; otherwise one call for all."""
        if self.truncate_captions and captions.shape[0] > b:
            if truncated_length(captions[b:], self.context_length) < self.context_length:
                g0, tokens = self.encode_text(captions[:b], normalize=False, return_tokens=True)
                rest = self.encode_text(captions[b:], normalize=False, truncate=True)
                return torch.cat([g0, rest]), tokens
        return self.encode_text(captions, normalize=False, return_tokens=True)

    def forward_multicrop(self, crops, captions: torch.Tensor, batch_size: int) -> dict:
        b = batch_size
        n_caps = self._check_multicrop(crops, captions, b)
        n_crops = len(crops)
        f, img_tokens = self._encode_crop_runs(crops)                     # (n_crops·B)×D
        g, txt_tokens = self._encode_captions(captions, b)                 # (n_caps·B)×D, caption 0's tokens
        # contexts: global crop 0 and global caption 0 only; mappings only on the rows used
        p_img = self.image_token_mapping(img_tokens[:b])                   # B × g² × D
        p_txt = self.text_token_mapping(txt_tokens[:b])                    # B × L × D
        d = f.shape[-1]
        q_img = f.view(n_crops, b, d).transpose(0, 1)                      # B × n_crops × D
        q_txt = g.view(n_caps, b, d).transpose(0, 1)                       # B × n_caps × D
        xi = cross_pool(self.text_attn_cross_pool, p_txt, q_img, impl=self.pool_impl)
        xt = cross_pool(self.visual.attn_cross_pool, p_img, q_txt, impl=self.pool_impl)
        return {
            "image_features": F.normalize(f, dim=-1),
            "text_features": F.normalize(g, dim=-1),
            "img_crossmodal_features": xi.transpose(0, 1).reshape(n_crops * b, d),
            "txt_crossmodal_features": xt.transpose(0, 1).reshape(n_caps * b, d),
            "logit_scale": self.logit_scale.exp().reshape(()),
            "distill_logit_scale": self.distill_logit_scale.exp().reshape(()),
        }


SCALAR_KEYS = ("logit_scale", "distill_logit_scale")


def _scalars_to_0d(module, state_dict, prefix, local_metadata):
    for name in SCALAR_KEYS:
        key = prefix + name
        if key in state_dict and state_dict[key].dim() == 1 and state_dict[key].numel() == 1:
            state_dict[key] = state_dict[key].reshape(())


def _scalars_from_0d(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                     error_msgs):
    for name in SCALAR_KEYS:
        key = prefix + name
        if key in state_dict and state_dict[key].dim() == 0:
            state_dict[key] = state_dict[key].reshape(1)


def create_model(cfg="tiny", device=None, dtype=None, pool_impl: str = "auto",
                 truncate_captions: bool = True) -> CosmosCLIP:
    """Build a COSMOS CLIP from a name (``"ViT-B-16"``, ``"ViT-B-32"``, ``"tiny"``, any open_clip
    ViT config) or an open_clip-style dict. Weights are random (official initialisation)."""
    cfg = resolve_model_config(cfg)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = CosmosCLIP(cfg, pool_impl=pool_impl, truncate_captions=truncate_captions)
    if dtype is not None:
        model = model.to(dtype)
    return model

