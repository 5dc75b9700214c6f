"""Multi-crop augmentation with torchvision: the recipe of cosmos_method.md §4.4 (:mod:`.recipe`)
as torchvision / PIL transforms, and the same crops from the fused kernel (:mod:`cosmos_fast.ops.multicrop`).

All randomness comes from torch's CPU generator, so a caller can make one sample's crops
deterministic by seeding it (see :func:`seeded`). The evaluation transform is resize-shortest-side
(bicubic) + center crop + normalise.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from ..config import AUGMENT_IMPLS, RENAMED_AUGMENT
from ..ops import multicrop as multicrop_op
from . import recipe
from .recipe import ORDER_INDEX, PARAM_FIELDS


class PILGaussianBlur:
    """PIL ``GaussianBlur`` with radius ~ U[radius_min, radius_max], applied when rand <= p."""

    def __init__(self, p: float, radius_min: float = 0.1, radius_max: float = 2.0):
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        if torch.rand(()).item() > self.p:
            return img
        radius = self.radius_min + (self.radius_max - self.radius_min) * torch.rand(()).item()
        return img.filter(ImageFilter.GaussianBlur(radius=radius))

    def __repr__(self):
        return f"PILGaussianBlur(p={self.p}, radius=[{self.radius_min}, {self.radius_max}])"


def _to_rgb(img: Image.Image) -> Image.Image:
    return img.convert("RGB") if img.mode != "RGB" else img


class MultiCropTransform:
    """PIL image → list of ``n_global`` + ``n_local`` normalised float tensors (3×H×W)."""

    def __init__(self, global_size: int = 224, local_size: int = 96, crop_scale: float = 0.4,
                 n_global: int = 2, n_local: int = 6):
        if n_global != recipe.N_GLOBAL:
            raise ValueError(f"COSMOS uses exactly {recipe.N_GLOBAL} global crops, got {n_global}")
        self.n_local = n_local
        global1, global2, local = recipe.crops(global_size, local_size, crop_scale, 1)
        self.global1, self.global2, self.local = (self._compose(c) for c in (global1, global2, local))

    @staticmethod
    def _compose(crop: recipe.Crop) -> T.Compose:
        """One crop of the recipe as torchvision transforms."""
        steps = [T.RandomResizedCrop(crop.size, scale=crop.scale, ratio=recipe.RATIO,
                                     interpolation=InterpolationMode.BICUBIC), _to_rgb,
                 T.RandomHorizontalFlip(p=recipe.FLIP_P),
                 T.RandomApply([T.ColorJitter(**recipe.JITTER)], p=recipe.JITTER_P),
                 T.RandomGrayscale(p=recipe.GRAY_P),
                 PILGaussianBlur(crop.blur_p, *recipe.BLUR_RADIUS)]
        if crop.solarize_p > 0:
            steps.append(T.RandomSolarize(threshold=recipe.SOLARIZE_THRESHOLD, p=crop.solarize_p))
        return T.Compose(steps + [T.ToTensor(), T.Normalize(recipe.MEAN, recipe.STD)])

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        img = _to_rgb(img)
        return [self.global1(img), self.global2(img)] + [self.local(img) for _ in range(self.n_local)]


class FusedMultiCropTransform(MultiCropTransform):
    """:class:`MultiCropTransform` with each crop made by the fused kernel (:mod:`cosmos_fast.ops.multicrop`).

    The random parameters come from torch's generator exactly as the torchvision transforms draw
    them (each transform's own ``get_params`` and coins, in the same order), then one kernel call makes
    the crop with Pillow's arithmetic, so the tensors equal :class:`MultiCropTransform`'s bit for bit
    under the same seed (tests/test_multicrop.py), faster (benchmarks/bench_multicrop.py). Needs numba."""

    def _params(self, comp: T.Compose, img: Image.Image) -> tuple[dict, int]:
        p = dict(flip=0, jitter=0, brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0, order=0, gray=0, blur=0,
                 radius=0.5, solarize=0)
        size = None
        for t in comp.transforms:
            if isinstance(t, T.RandomResizedCrop):
                p["y0"], p["x0"], p["h"], p["w"] = t.get_params(img, t.scale, t.ratio)
                size = t.size[0]
            elif isinstance(t, T.RandomHorizontalFlip):
                p["flip"] = int(torch.rand(1) < t.p)
            elif isinstance(t, T.RandomApply):
                if not t.p < torch.rand(1):
                    (jitter,) = t.transforms
                    order, b, c, s, h = jitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation,
                                                          jitter.hue)
                    p.update(jitter=1, order=ORDER_INDEX[tuple(order.tolist())], brightness=b, contrast=c,
                             saturation=s, hue=h)
            elif isinstance(t, T.RandomGrayscale):
                p["gray"] = int(torch.rand(1) < t.p)
            elif isinstance(t, PILGaussianBlur):
                if not torch.rand(()).item() > t.p:
                    p["blur"] = 1
                    p["radius"] = t.radius_min + (t.radius_max - t.radius_min) * torch.rand(()).item()
            elif isinstance(t, T.RandomSolarize) and t.threshold == recipe.SOLARIZE_THRESHOLD:
                p["solarize"] = int(torch.rand(1).item() < t.p)
            elif not (t is _to_rgb or isinstance(t, T.ToTensor)
                      or (isinstance(t, T.Normalize) and tuple(t.mean) == recipe.MEAN and tuple(t.std) == recipe.STD)):
                raise TypeError(f"FusedMultiCropTransform has no fused equivalent of {t!r}")
        return p, size

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        img = _to_rgb(img)
        arr = np.asarray(img)
        crops = []
        for comp in [self.global1, self.global2] + [self.local] * self.n_local:
            p, size = self._params(comp, img)
            crops.append(torch.from_numpy(multicrop_op.augment_crop(arr, [p[f] for f in PARAM_FIELDS], size)))
        return crops


def resolve_augment(impl: str) -> str:
    """``data.augment``: ``torchvision`` (torchvision's PIL ops), ``fused`` (the same crops from the Numba
    kernel; needs numba) or ``auto`` (fused when numba is installed)."""
    if impl in RENAMED_AUGMENT:
        raise ValueError(f"data.augment = {impl!r} was renamed to {RENAMED_AUGMENT[impl]!r}")
    if impl not in AUGMENT_IMPLS:
        raise ValueError(f"data.augment = {impl!r} must be one of {', '.join(AUGMENT_IMPLS)}")
    if impl == "fused" and not multicrop_op.numba_available():
        raise ValueError("data.augment = 'fused' needs numba (pip install numba); use 'torchvision' or 'auto'")
    if impl == "auto":
        return "fused" if multicrop_op.numba_available() else "torchvision"
    return impl


def eval_transform(size: int = 224):
    return T.Compose([T.Resize(size, interpolation=InterpolationMode.BICUBIC), T.CenterCrop(size), _to_rgb,
                      T.ToTensor(), T.Normalize(recipe.MEAN, recipe.STD)])


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block with torch's CPU generator seeded, restoring the caller's state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
