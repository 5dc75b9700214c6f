"""The multi-crop recipe of cosmos_method.md §4.4, as data: the torchvision pipeline
(:mod:`.transforms`), the fused kernel's reference (:mod:`cosmos_fast.reference.multicrop`) and the
DALI graph (:mod:`.dali_multicrop`) all read it from here.

| step                        | global crop 1        | global crop 2 | each local crop         |
|-----------------------------|----------------------|---------------|-------------------------|
| RandomResizedCrop, bicubic  | size G, scale [s, 1] | same          | size L, scale [0.05, s] |
| horizontal flip             | p 0.5                | p 0.5         | p 0.5                   |
| ColorJitter(.4, .4, .2, .1) | p 0.8                | p 0.8         | p 0.8                   |
| grayscale                   | p 0.2                | p 0.2         | p 0.2                   |
| PIL Gaussian blur r~U[.1,2] | p 1.0 (rand <= p)    | p 0.1         | p 0.5                   |
| solarize (threshold 128)    | —                    | p 0.2         | —                       |
| ToTensor + Normalize (OpenAI CLIP mean/std) | ✓    | ✓             | ✓                       |

What differs per crop is a :class:`Crop` (:func:`crops` lists them for a config); what all crops share
is a module constant.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from ..config import LOCAL_CROP_MIN_SCALE, check_crop_scale
from .normalize import OPENAI_MEAN, OPENAI_STD

N_GLOBAL = 2                                   # COSMOS uses exactly two global crops
RATIO = (3.0 / 4.0, 4.0 / 3.0)                 # RandomResizedCrop aspect ratios (log-uniform), 10 tries
FLIP_P = 0.5
JITTER_P = 0.8
# ColorJitter strengths: brightness, contrast, saturation factors ~ U[1 − x, 1 + x], hue ~ U[−x, x]
JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1}
# torchvision's ColorJitter applies its four ops (0 brightness, 1 contrast, 2 saturation, 3 hue) in the
# order of torch.randperm(4): one of these 24, by index
JITTER_ORDERS = tuple(itertools.permutations(range(4)))
ORDER_INDEX = {o: i for i, o in enumerate(JITTER_ORDERS)}
GRAY_P = 0.2
BLUR_RADIUS = (0.1, 2.0)                       # PIL GaussianBlur radius ~ U[lo, hi] (the standard deviation)
SOLARIZE_THRESHOLD = 128
MEAN, STD = OPENAI_MEAN, OPENAI_STD            # ToTensor + Normalize

# the random parameters of one crop, in the order of the fused kernel's parameter vector (and of the
# DALI graph's debug output): the crop window, the coins and the jitter factors, the blur radius
PARAM_FIELDS = ("y0", "x0", "h", "w", "flip", "jitter", "brightness", "contrast", "saturation", "hue", "order",
                "gray", "blur", "radius", "solarize")


def jitter_range(op: str) -> tuple[float, float]:
    """The range ColorJitter draws ``op``'s factor from (torchvision's rule)."""
    x = JITTER[op]
    return (-x, x) if op == "hue" else (max(0.0, 1.0 - x), 1.0 + x)


@dataclass(frozen=True)
class Crop:
    """What one crop of the recipe does differently from the others."""
    size: int                          # output side in px
    scale: tuple[float, float]         # RandomResizedCrop area fraction
    blur_p: float                      # Gaussian blur probability (1.0: always, still drawn as rand <= p)
    solarize_p: float                  # solarize probability (0: no solarize step)


def crops(global_size: int, local_size: int, crop_scale: float, n_local: int) -> list[Crop]:
    """The §4.4 crops of one sample: global 1, global 2, then ``n_local`` local crops."""
    check_crop_scale(crop_scale)
    glob = (crop_scale, 1.0)
    return ([Crop(global_size, glob, 1.0, 0.0), Crop(global_size, glob, 0.1, 0.2)]
            + [Crop(local_size, (LOCAL_CROP_MIN_SCALE, crop_scale), 0.5, 0.0)] * n_local)
