"""Multi-crop augmentation with torchvision, exactly cosmos_method.md §4.4.

| step                     | global crop 1 | global crop 2 | each local crop |
|--------------------------|---------------|---------------|-----------------|
| RandomResizedCrop bicubic| size G, scale [s, 1] | same   | size L, scale [0.05, s] |
| horizontal flip          | 0.5           | 0.5           | 0.5             |
| ColorJitter(.4,.4,.2,.1) | p 0.8         | p 0.8         | p 0.8           |
| grayscale                | p 0.2         | p 0.2         | p 0.2           |
| PIL Gaussian blur r~U[.1,2] | p 1.0 (rand <= p) | p 0.1   | p 0.5           |
| solarize (threshold 128) | —             | p 0.2         | —               |
| ToTensor + Normalize (OpenAI CLIP mean/std) | ✓ | ✓      | ✓               |

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

from . import pil_hue
from .normalize import OPENAI_MEAN, OPENAI_STD
from .pil_crop import ORDER_INDEX, PARAM_FIELDS, augment_crop


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
        if not 0.05 < crop_scale < 1.0:
            raise ValueError(f"data.crop_scale must lie in (0.05, 1), got {crop_scale}")
        if n_global != 2:
            raise ValueError(f"COSMOS uses exactly 2 global crops, got {n_global}")
        self.n_local = n_local
        flip_color = [
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
        ]
        normalize = [T.ToTensor(), T.Normalize(OPENAI_MEAN, OPENAI_STD)]

        def rrc(size, scale):
            return [T.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC), _to_rgb]

        self.global1 = T.Compose(rrc(global_size, (crop_scale, 1.0)) + flip_color
                                 + [PILGaussianBlur(1.0)] + normalize)
        self.global2 = T.Compose(rrc(global_size, (crop_scale, 1.0)) + flip_color
                                 + [PILGaussianBlur(0.1), T.RandomSolarize(threshold=128, p=0.2)] + normalize)
        self.local = T.Compose(rrc(local_size, (0.05, crop_scale)) + flip_color
                               + [PILGaussianBlur(0.5)] + normalize)

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        img = _to_rgb(img)
        return [self.global1(img), self.global2(img)] + [self.local(img) for _ in range(self.n_local)]


class FusedMultiCropTransform(MultiCropTransform):
    """:class:`MultiCropTransform` with each crop made by the fused kernel of :mod:`.pil_crop`.

    The random parameters come from torch's generator exactly as the torchvision transforms draw
    them (each transform's own ``get_params`` and coins, in the same order), then one kernel call makes
    the crop with Pillow's arithmetic, so the tensors equal :class:`MultiCropTransform`'s bit for bit
    under the same seed (tests/test_pil_crop.py); the loader ran 2.0× as fast with it (bench_data.py,
    2 workers). Needs numba."""

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
            elif isinstance(t, T.RandomSolarize) and t.threshold == 128:
                p["solarize"] = int(torch.rand(1).item() < t.p)
            elif not (t is _to_rgb or isinstance(t, T.ToTensor)
                      or (isinstance(t, T.Normalize) and tuple(t.mean) == OPENAI_MEAN and tuple(t.std) == OPENAI_STD)):
                raise TypeError(f"FusedMultiCropTransform has no fused equivalent of {t!r}")
        return p, size

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        img = _to_rgb(img)
        arr = np.asarray(img)
        crops = []
        for comp in [self.global1, self.global2] + [self.local] * self.n_local:
            p, size = self._params(comp, img)
            crops.append(torch.from_numpy(augment_crop(arr, [p[f] for f in PARAM_FIELDS], size)))
        return crops


AUGMENT_IMPLS = ("auto", "pil", "fused")


def resolve_augment(impl: str) -> str:
    """``data.augment``: ``pil`` (torchvision's PIL ops), ``fused`` (the same crops from the Numba kernel;
    needs numba) or ``auto`` (fused when numba is installed)."""
    if impl not in AUGMENT_IMPLS:
        raise ValueError(f"data.augment = {impl!r} must be one of {', '.join(AUGMENT_IMPLS)}")
    if impl == "fused" and not pil_hue.available():
        raise ValueError("data.augment = 'fused' needs numba (pip install numba); use 'pil' or 'auto'")
    if impl == "auto":
        return "fused" if pil_hue.available() else "pil"
    return impl


def eval_transform(size: int = 224):
    return T.Compose([T.Resize(size, interpolation=InterpolationMode.BICUBIC), T.CenterCrop(size), _to_rgb,
                      T.ToTensor(), T.Normalize(OPENAI_MEAN, OPENAI_STD)])


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block with torch's CPU generator seeded, restoring the caller's state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
