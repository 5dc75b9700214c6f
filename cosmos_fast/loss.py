"""``CosmosLoss``: the COSMOS objective (16 CLIP pairs with τ + 64 distillation pairs with τ_d).

The forward takes the official keyword arguments (lists of B×D blocks) and returns
``{"distill_loss", "clip_loss"}`` with ``output_dict=True``, else their sum. ``impl`` selects the
implementation through :mod:`cosmos_fast.ops`.
"""
from __future__ import annotations

import torch
from torch import nn

from .ops import resolve_contrastive_impl
from .reference.contrastive import cosmos_loss_reference


def _check_list(name: str, xs, expect_len: int | None = None, shape=None):
    if isinstance(xs, torch.Tensor) or not isinstance(xs, (list, tuple)):
        raise TypeError(f"{name} must be a list of B×D tensors, got {type(xs).__name__}")
    if expect_len is not None and len(xs) != expect_len:
        raise ValueError(f"{name} must have exactly {expect_len} entries, got {len(xs)}")
    if not xs:
        raise ValueError(f"{name} is empty")
    for i, x in enumerate(xs):
        if not torch.is_tensor(x) or x.dim() != 2 or (shape is not None and tuple(x.shape) != shape):
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"{name}[{i}] must be a {'×'.join(map(str, shape or ('B', 'D')))} tensor, got {got}")
    return tuple(xs[0].shape)


class CosmosLoss(nn.Module):
    def __init__(self, impl: str = "auto"):
        super().__init__()
        self.impl = resolve_contrastive_impl(impl)

    def forward(self, s_image_features, s_text_features, logit_scale, t_image_features,
                t_text_features, distill_logit_scale, s_img_crossmodal_features,
                s_txt_crossmodal_features, output_dict: bool = False):
        shape = _check_list("s_image_features", s_image_features)
        if len(s_image_features) < 2:
            raise ValueError(f"s_image_features needs the 2 global crops first, got {len(s_image_features)} entries")
        _check_list("s_text_features", s_text_features, shape=shape)
        _check_list("t_image_features", t_image_features, 2, shape)
        _check_list("t_text_features", t_text_features, 2, shape)
        _check_list("s_img_crossmodal_features", s_img_crossmodal_features, shape=shape)
        _check_list("s_txt_crossmodal_features", s_txt_crossmodal_features, shape=shape)
        out = cosmos_loss_reference(
            s_image_features, s_text_features, logit_scale, t_image_features, t_text_features,
            distill_logit_scale, s_img_crossmodal_features, s_txt_crossmodal_features)
        return out if output_dict else out["distill_loss"] + out["clip_loss"]
