"""What the segmentation pieces share: a benchmark's post-processing settings (cosmos_method.md §6.5)
and one data set of images with ground-truth label maps."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

IGNORE_INDEX = 255


@dataclass(frozen=True)
class SegSettings:
    """One benchmark's inference settings (§6.5's table and preprocessing).

    ``logit_scale`` multiplies the cosine logits before the softmax over queries; a pixel whose
    largest class probability is below ``prob_thd`` becomes class 0 (background); ``area_thd``
    (None = off) drops classes covering less than that fraction of the image. The image is resized
    with its aspect ratio kept to a short side of ``short_side`` (long side at most ``max_long_side``)
    and segmented in ``slide_crop`` windows every ``slide_stride`` pixels."""
    logit_scale: float = 40.0
    prob_thd: float = 0.0
    area_thd: float | None = None
    short_side: int = 336
    max_long_side: int = 2048
    slide_crop: int = 224
    slide_stride: int = 112


@dataclass
class SegmentationSet:
    """``images[i]`` with its label map ``masks[i]`` (a PNG of class indices, 'P' or 'L' mode).

    ``class_file``: one class per line, comma-separated synonyms (each a text query), line k is class
    k. ``label_lut`` (256 entries, uint8) maps the stored values to class indices, ``IGNORE_INDEX``
    (255) for pixels the metric skips; None keeps the stored values."""
    name: str
    images: Sequence[Path]
    masks: Sequence[Path]
    class_file: Path
    settings: SegSettings = field(default_factory=SegSettings)
    label_lut: np.ndarray | None = None

    def __post_init__(self):
        if len(self.images) != len(self.masks):
            raise ValueError(f"segmentation set {self.name}: {len(self.images)} images but {len(self.masks)} masks")
        if self.label_lut is not None and self.label_lut.shape != (256,):
            raise ValueError(f"segmentation set {self.name}: label_lut must have 256 entries")

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int) -> tuple[Image.Image, np.ndarray]:
        """(RGB image, H×W uint8 class indices with 255 = ignore) of item ``i``, both at the image's
        original size; a mask whose size differs from its image's is an error naming both files."""
        img = Image.open(self.images[i]).convert("RGB")
        mask = Image.open(self.masks[i])
        if mask.mode not in ("P", "L"):
            raise ValueError(f"{self.masks[i]}: label map must be a palette or grayscale PNG, got mode {mask.mode}")
        if mask.size != img.size:
            raise ValueError(f"{self.masks[i]}: label map is {mask.size}, its image {self.images[i]} is {img.size}")
        labels = np.asarray(mask, dtype=np.uint8)
        if self.label_lut is not None:
            labels = self.label_lut[labels]
        return img, labels
