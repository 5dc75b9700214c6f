"""What the segmentation pieces share: a benchmark's post-processing settings (cosmos_method.md §6.5)
and one data set of images with ground-truth label maps."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

IGNORE_INDEX = 255


def read_class_queries(path) -> tuple[list[str], list[int]]:
    """Queries of a class file and each query's class (its line number, from 0). Synonyms are
    stripped of surrounding spaces (the tokenizer collapses them anyway); trailing blank lines are
    ignored; a class line without a name is an error naming the file and line."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ValueError(f"class file {path} lists no class")
    queries, owner = [], []
    for k, line in enumerate(lines):
        names = [s.strip() for s in line.split(",") if s.strip()]
        if not names:
            raise ValueError(f"class file {path}, line {k + 1}: no class name")
        queries += names
        owner += [k] * len(names)
    return queries, owner


def class_names(path) -> list[str]:
    """One name per class of a class file: the first synonym of its line (``name#k`` when an
    earlier line already starts with that name, so the names are unique keys)."""
    queries, owner = read_class_queries(path)
    names = []
    for q, k in zip(queries, owner):
        if k == len(names):
            names.append(q if q not in names else f"{q}#{k}")
    return names


@dataclass(frozen=True)
class SegSettings:
    """One benchmark's inference settings (§6.5's table and preprocessing).

    ``logit_scale`` multiplies the cosine logits before the softmax over queries; a pixel whose
    largest class probability is below ``prob_thd`` becomes class 0 (background); ``area_thd``
    (None = off) drops classes covering less than that fraction of the predicted non-background
    area, as SCLIP applies it (their pixels go to their next-best class). The image is resized
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
    (255) for pixels the metric skips; None keeps the stored values. ``class_names``: the result keys
    (default: each line's first synonym; a with-background set names its class 0 "background")."""
    name: str
    images: Sequence[Path]
    masks: Sequence[Path]
    class_file: Path
    settings: SegSettings = field(default_factory=SegSettings)
    label_lut: np.ndarray | None = None
    class_names: Sequence[str] | None = None

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
