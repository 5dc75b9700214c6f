"""``CosmosLoss``: the COSMOS objective (16 CLIP pairs with τ + 64 distillation pairs with τ_d).

The forward takes the official keyword arguments — lists of B×D blocks, as the official
``COSMOSLoss`` — or the model's (n·B, D) crop-/caption-major tensors directly with ``batch_size``
(no copy: the fused and blockwise paths read them as views). It returns
``{"distill_loss", "clip_loss"}`` with ``output_dict=True``, else their sum. ``impl`` selects the
implementation through :mod:`cosmos_fast.ops`: ``"auto"`` (Triton on CUDA, blockwise on CPU),
``"fused"``, ``"blockwise"`` or ``"reference"``. ``grad_semantics`` matters only with several
ranks (see :mod:`cosmos_fast.contrastive`).
"""
from __future__ import annotations

import torch
from torch import nn

from .contrastive import cosmos_loss_fast
from .ops import resolve_contrastive_impl
from .reference.contrastive import cosmos_loss_reference


def _blocks(name: str, xs, batch_size, expect_count: int | None = None, width=None):
    """Validate one feature argument; returns (list of B×D blocks, base tensor or None)."""
    if torch.is_tensor(xs):
        if batch_size is None:
            raise TypeError(f"{name} is a tensor: pass batch_size (or a list of B×D tensors)")
        if xs.dim() != 2 or xs.shape[0] % batch_size or xs.shape[0] == 0:
            raise ValueError(f"{name} of shape {tuple(xs.shape)} is not (n·{batch_size}, D)")
        blocks, base = list(xs.split(batch_size)), xs
    elif isinstance(xs, (list, tuple)):
        blocks, base = list(xs), None
    else:
        raise TypeError(f"{name} must be a list of B×D tensors or an (n·B, D) tensor, got {type(xs).__name__}")
    if not blocks:
        raise ValueError(f"{name} is empty")
    if expect_count is not None and len(blocks) != expect_count:
        raise ValueError(f"{name} must have exactly {expect_count} entries, got {len(blocks)}")
    shape = width or (tuple(blocks[0].shape) if torch.is_tensor(blocks[0]) else None)
    for i, x in enumerate(blocks):
        if not torch.is_tensor(x) or x.dim() != 2 or (shape is not None and tuple(x.shape) != shape):
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"{name}[{i}] must be a {'×'.join(map(str, shape or ('B', 'D')))} tensor, got {got}")
    return blocks, base


class CosmosLoss(nn.Module):
    def __init__(self, impl: str = "auto", grad_semantics: str = "official"):
        super().__init__()
        if grad_semantics not in ("official", "exact"):
            raise ValueError(f"grad_semantics must be 'official' or 'exact', got {grad_semantics!r}")
        self.impl = resolve_contrastive_impl(impl)
        self.grad_semantics = grad_semantics

    def forward(self, s_image_features, s_text_features, logit_scale, t_image_features,
                t_text_features, distill_logit_scale, s_img_crossmodal_features,
                s_txt_crossmodal_features, output_dict: bool = False, batch_size: int | None = None):
        si, si_base = _blocks("s_image_features", s_image_features, batch_size)
        shape = tuple(si[0].shape)
        if len(si) < 2:
            raise ValueError(f"s_image_features needs the 2 global crops first, got {len(si)} entries")
        b = shape[0]
        st = _blocks("s_text_features", s_text_features, b, None, shape)
        ti = _blocks("t_image_features", t_image_features, b, 2, shape)
        tt = _blocks("t_text_features", t_text_features, b, 2, shape)
        xi = _blocks("s_img_crossmodal_features", s_img_crossmodal_features, b, None, shape)
        xt = _blocks("s_txt_crossmodal_features", s_txt_crossmodal_features, b, None, shape)
        impl = resolve_contrastive_impl(self.impl, si[0].device)
        if impl == "reference":
            out = cosmos_loss_reference(si, st[0], logit_scale, ti[0], tt[0], distill_logit_scale, xi[0], xt[0])
        else:
            def base(arg, count=None):   # the (n·B, D) view, or one concatenation of a list
                blocks, whole = arg
                if whole is not None:
                    return whole if count is None else whole[: count * b]
                return torch.cat(blocks[:count])
            out = cosmos_loss_fast(base((si, si_base), 2), base(st), logit_scale, base(ti), base(tt),
                                   distill_logit_scale, base(xi), base(xt), batch_size=b, impl=impl,
                                   grad_semantics=self.grad_semantics)
        return out if output_dict else out["distill_loss"] + out["clip_loss"]
