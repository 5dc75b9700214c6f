"""Reference COSMOS loss: one B_g×B_g logit matrix per pair, exactly as the official code.

Pair loss (cosmos_method.md §3.2), after the official distributed gather (§3.4):

    Z = τ·U·Vᵀ ;  ℓ(U, V; τ) = ½·[CE_rows(Z) + CE_rows(Zᵀ)] with diagonal labels

W = 1 uses two matmuls (τU·Vᵀ and τV·Uᵀ); W > 1 all-gathers both operands without autograd, puts
this rank's grad-carrying tensor back in its slot, and every rank computes the full B_g×B_g loss
(the transpose view serves the second direction). A list loss is the plain mean over all
|𝒰|·|𝒱| pairs. The COSMOS total is

    L_clip   = L(S_I[0:2], S_T; τ)                                          16 pairs
    L_cosmos = ¼·[L(S_XI, R_I) + L(S_XI, R_T) + L(S_XT, R_I) + L(S_XT, R_T)]  64 pairs, τ_d
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Official ``gather_features``: all_gather without autograd, local slot keeps its graph."""
    world, rank = _world()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts)


def pair_loss_reference(u: torch.Tensor, v: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of one pair of B×D feature blocks (rows i of U and V match)."""
    world, _ = _world()
    if world == 1:
        logits_uv = scale * u @ v.T
        logits_vu = scale * v @ u.T
    else:
        logits_uv = scale * gather_no_grad(u) @ gather_no_grad(v).T
        logits_vu = logits_uv.T
    labels = torch.arange(logits_uv.shape[0], device=logits_uv.device)
    return (F.cross_entropy(logits_uv, labels) + F.cross_entropy(logits_vu, labels)) / 2


def list_loss_reference(us, vs, scale) -> torch.Tensor:
    """Mean of the pair loss over every (U, V) in us × vs."""
    total = sum(pair_loss_reference(u, v, scale) for u in us for v in vs)
    return total / (len(us) * len(vs))


def cosmos_loss_reference(s_image_features, s_text_features, logit_scale, t_image_features,
                          t_text_features, distill_logit_scale, s_img_crossmodal_features,
                          s_txt_crossmodal_features) -> dict:
    """``{"distill_loss", "clip_loss"}`` for lists of B×D feature blocks (teacher detached)."""
    t_img = [t.detach() for t in t_image_features]
    t_txt = [t.detach() for t in t_text_features]
    distill = (list_loss_reference(s_img_crossmodal_features, t_img, distill_logit_scale)
               + list_loss_reference(s_img_crossmodal_features, t_txt, distill_logit_scale)
               + list_loss_reference(s_txt_crossmodal_features, t_img, distill_logit_scale)
               + list_loss_reference(s_txt_crossmodal_features, t_txt, distill_logit_scale)) / 4
    clip = list_loss_reference(list(s_image_features[:2]), s_text_features, logit_scale)
    return {"distill_loss": distill, "clip_loss": clip}
