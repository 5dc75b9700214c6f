"""The official AdamW parameter groups (cosmos_method.md §5, open_clip v2.24 rule).

No weight decay for a parameter whose tensor has fewer than 2 dimensions or whose name contains
``bn``, ``ln``, ``bias`` or ``logit_scale``; ``weight_decay`` for every other tensor (including the
positional tables and the token embedding). Only the student is optimised.
"""
from __future__ import annotations

import torch
from torch import nn


def no_weight_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if no_weight_decay(name, p) else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0},
            {"params": decay, "weight_decay": weight_decay}]


def build_adamw(model: nn.Module, lr: float = 5e-4, betas=(0.9, 0.98), eps: float = 1e-8,
                weight_decay: float = 0.5, **kwargs) -> torch.optim.AdamW:
    """torch AdamW over the official groups (``fused=True`` may be passed on CUDA)."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, **kwargs)
