"""Dense patch features for zero-shot segmentation (image side of cosmos_method.md §6.5).

The features are the patch tokens after ``ln_post`` (no CLS), multiplied by ``visual.proj``
(width → D) and L2-normalised; ``image_token_mapping`` is not used. The official segmentation code
runs this on the **teacher**. Not implemented here: the CSA replacement of the last block
(``--use-csa``), sliding windows and the mmseg post-processing.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .sharding import unwrap


def dense_features(model: nn.Module, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """``images`` N×3×H×H → N×g×g×D patch embeddings (g = H / patch size), unit norm by default."""
    m = unwrap(model)
    _, tokens = m.encode_image(images, normalize=False, return_tokens=True)    # N × g² × width
    x = tokens @ m.visual.proj.to(tokens.dtype)                                 # N × g² × D
    if normalize:
        x = F.normalize(x, dim=-1)
    g = math.isqrt(x.shape[1])
    return x.reshape(x.shape[0], g, g, x.shape[-1])
