"""The zero-shot segmentation benchmarks of cosmos_method.md §6.5, read from disk as mmsegmentation's
dataset classes read their standard releases, with each benchmark's class file and settings.

``root`` (``--segmentation-root``) holds the releases side by side, each under the folder name
mmsegmentation's dataset configs use (the layouts are listed in this folder's README):

* ``VOCdevkit/VOC2012``: VOC21 and VOC20;
* ``VOCdevkit/VOC2010``: PASCAL Context 60 and 59;
* ``coco_stuff164k``: COCO-Object and COCO-Stuff164k;
* ``cityscapes``; ``ade/ADEChallengeData2016``.

Label maps go through a 256-entry lookup table (``SegmentationSet.label_lut``) where the benchmark
needs one: mmseg's ``reduce_zero_label`` (0 → 255 ignore, k → k-1) for VOC20, Context59 and ADE20K,
and, when only the releases' raw maps are on disk, the id → train-id maps that the usual conversion
scripts would have written (Cityscapes ``*_labelIds.png``, COCO-Stuff's raw ``<id>.png``)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .datasets import AnnotationError, MissingAnnotationError
from .seg_types import IGNORE_INDEX, SegmentationSet, SegSettings, class_names

SEG_SETS = ("voc21", "voc20", "context60", "context59", "coco_object", "cityscapes", "ade20k", "coco_stuff164k")
#: the sets whose class 0 is a background class (``--seg-w-background``), and the others
SEG_SETS_WITH_BACKGROUND = ("voc21", "context60", "coco_object")
SEG_SETS_WITHOUT_BACKGROUND = ("voc20", "context59", "cityscapes", "ade20k", "coco_stuff164k")

#: number of classes (lines of the class file) per benchmark
NUM_CLASSES = {"voc21": 21, "voc20": 20, "context60": 60, "context59": 59, "coco_object": 81, "cityscapes": 19,
               "ade20k": 150, "coco_stuff164k": 171}

# §6.5's tables; short sides from the benchmarks' test pipelines (Resize to (2048, short), keep ratio):
# COCO-Object reads coco_stuff164k's images but its pipeline uses 336, so only COCO-Stuff164k gets 448.
SEG_SETTINGS = {
    "voc21": SegSettings(logit_scale=65.0, prob_thd=0.1, area_thd=0.1),
    "context60": SegSettings(logit_scale=50.0, prob_thd=0.1),
    "coco_object": SegSettings(logit_scale=50.0, prob_thd=0.1),
    "voc20": SegSettings(),
    "context59": SegSettings(),
    "cityscapes": SegSettings(short_side=560),
    "ade20k": SegSettings(),
    "coco_stuff164k": SegSettings(short_side=448),
}

CLASS_DIR = Path(__file__).resolve().parent / "seg_classes"

VOC2012 = Path("VOCdevkit/VOC2012")
VOC2010 = Path("VOCdevkit/VOC2010")
COCO_STUFF = Path("coco_stuff164k")
CITYSCAPES = Path("cityscapes")
ADE20K = Path("ade/ADEChallengeData2016")


def class_file(name: str) -> Path:
    """The class file shipped for benchmark ``name`` (package data, ``seg_classes/<name>.txt``)."""
    if name not in SEG_SETS:
        raise ValueError(f"unknown segmentation set {name!r}; choose from {', '.join(SEG_SETS)}")
    return CLASS_DIR / f"{name}.txt"


def _lut(mapping: dict[int, int], default: int = IGNORE_INDEX) -> np.ndarray:
    lut = np.full(256, default, dtype=np.uint8)
    for k, v in mapping.items():
        lut[k] = v
    return lut


def reduce_zero_label_lut() -> np.ndarray:
    """mmseg's ``reduce_zero_label``: 0 (background) → 255, k → k-1, 255 stays 255."""
    lut = (np.arange(256) - 1).astype(np.uint8)
    lut[0] = lut[255] = IGNORE_INDEX
    return lut


# Cityscapes label ids of the 19 evaluated classes, in train-id order (cityscapesscripts' labels.py);
# every other id is ignored. createTrainIdLabelImgs rasterises the same polygons in the same order,
# so mapping a *_labelIds.png through this table gives its *_labelTrainIds.png.
CITYSCAPES_EVAL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
CITYSCAPES_LABEL_ID_LUT = _lut({label_id: train_id for train_id, label_id in enumerate(CITYSCAPES_EVAL_IDS)})

# COCO-Stuff's raw val2017/<id>.png hold 0-based ids: things 0-90 (11 of them unused), stuff 91-181,
# 255 unlabeled. The 171 used ids in order are the train ids 0-170 (mmseg's coco_stuff164k converter).
COCO_UNUSED_THING_IDS = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
COCO_STUFF_IDS = tuple(i for i in range(182) if i not in COCO_UNUSED_THING_IDS)
COCO_STUFF_RAW_LUT = _lut({raw: train for train, raw in enumerate(COCO_STUFF_IDS)})
# COCO-Object (GroupViT's conversion, used by SCLIP): the 80 things → 1-80, stuff → 0 (background);
# unlabeled (255) also ends as 0 there (256 written to a uint8 map under NumPy 1.x wraps to 0).
COCO_OBJECT_RAW_LUT = _lut({**{raw: train + 1 for train, raw in enumerate(COCO_STUFF_IDS[:80])},
                            **{raw: 0 for raw in COCO_STUFF_IDS[80:]}, 255: 0})


def _root_folder(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise MissingAnnotationError(path, f"{what}: folder {path} not found")
    return path


def _split_ids(split_file: Path, what: str) -> list[str]:
    if not split_file.is_file():
        raise MissingAnnotationError(split_file, f"{what}: split list {split_file} not found")
    ids = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise AnnotationError(split_file, "split list is empty")
    return ids


def _check_label_map(mask: Path) -> None:
    """The first label map of a set must be a PNG of indices (palette or grayscale): a colour
    rendering or a JPEG in its place is a wrong folder, said before any image is segmented."""
    try:
        with Image.open(mask) as m:
            fmt, mode = m.format, m.mode
    except OSError as err:
        raise AnnotationError(mask, f"cannot read the label map ({err})") from err
    if fmt != "PNG" or mode not in ("P", "L"):
        raise AnnotationError(mask, f"label map must be a palette or grayscale PNG of class indices, "
                                    f"got a {fmt} in mode {mode}")


def _make_set(name, images, masks, cls_file, settings, lut) -> SegmentationSet:
    _check_label_map(masks[0])
    return SegmentationSet(name=name, images=images, masks=masks, class_file=Path(cls_file), settings=settings,
                           label_lut=lut)


def voc_layout_set(voc_root, name: str, class_file, settings: SegSettings, split: str = "val", *,
                   mask_dir: str = "SegmentationClass", split_dir: str = "Segmentation",
                   label_lut: np.ndarray | None = None) -> SegmentationSet:
    """A VOC-style folder: ids from ``ImageSets/<split_dir>/<split>.txt``, images
    ``JPEGImages/<id>.jpg``, label maps ``<mask_dir>/<id>.png``."""
    voc_root = _root_folder(Path(voc_root), name)
    split_file = voc_root / "ImageSets" / split_dir / f"{split}.txt"
    ids = _split_ids(split_file, name)
    images = [voc_root / "JPEGImages" / f"{i}.jpg" for i in ids]
    masks = [voc_root / mask_dir / f"{i}.png" for i in ids]
    for i, img, mask in zip(ids, images, masks):
        for path in (img, mask):
            if not path.is_file():
                raise AnnotationError(split_file, f"lists {i!r} but {path} does not exist")
    return _make_set(name, images, masks, class_file, settings, label_lut)


def _scanned_set(name: str, img_dir: Path, img_suffix: str, mask_dir: Path,
                 mask_kinds: Sequence[tuple[str, np.ndarray | None]], hint: str) -> SegmentationSet:
    """mmseg's folder scan (no split list): every ``*<img_suffix>`` under ``img_dir`` (recursively,
    sorted), its label map the same relative path under ``mask_dir`` with the suffix replaced.
    ``mask_kinds`` are (mask suffix, label lut) in order of preference; the first kind that every
    image has is used."""
    _root_folder(mask_dir, name)
    images = sorted(p for p in _root_folder(img_dir, name).rglob(f"*{img_suffix}") if p.is_file())
    if not images:
        raise AnnotationError(img_dir, f"{name}: no *{img_suffix} images")
    stems = [str(p.relative_to(img_dir))[: -len(img_suffix)] for p in images]
    for suffix, lut in mask_kinds:
        masks = [mask_dir / f"{s}{suffix}" for s in stems]
        if all(m.is_file() for m in masks):
            return _make_set(name, images, masks, class_file(name), SEG_SETTINGS[name], lut)
    suffix = mask_kinds[0][0]
    first = next(mask_dir / f"{s}{suffix}" for s in stems if not (mask_dir / f"{s}{suffix}").is_file())
    others = " or ".join(f"*{s}" for s, _ in mask_kinds[1:])
    raise MissingAnnotationError(first, f"{name}: label map {first} not found (for {img_dir / (stems[0] + img_suffix)}"
                                        f"{' and others' if len(stems) > 1 else ''}); "
                                        f"{'no complete set of ' + others + ' either; ' if others else ''}{hint}")


def load_segmentation_set(name: str, root) -> SegmentationSet:
    """Benchmark ``name`` (one of :data:`SEG_SETS`) from ``root``, the folder holding ``VOCdevkit/``,
    ``coco_stuff164k/``, ``cityscapes/``, ``ade/``; its val split, class file and §6.5 settings. A
    with-background set names its class 0 "background" in the results (its line lists stuff words)."""
    seg_set = _load_set(name, root)
    if name in SEG_SETS_WITH_BACKGROUND:
        seg_set.class_names = ["background", *class_names(seg_set.class_file)[1:]]
    return seg_set


def _load_set(name: str, root) -> SegmentationSet:
    cls = class_file(name)
    root = _root_folder(Path(root), "segmentation root")
    settings = SEG_SETTINGS[name]
    if name in ("voc21", "voc20"):
        lut = reduce_zero_label_lut() if name == "voc20" else None
        return voc_layout_set(root / VOC2012, name, cls, settings, label_lut=lut)
    if name in ("context60", "context59"):
        lut = reduce_zero_label_lut() if name == "context59" else None
        return voc_layout_set(root / VOC2010, name, cls, settings, mask_dir="SegmentationClassContext",
                              split_dir="SegmentationContext", label_lut=lut)
    if name == "ade20k":
        base = root / ADE20K
        return _scanned_set(name, base / "images/validation", ".jpg", base / "annotations/validation",
                            [(".png", reduce_zero_label_lut())], "ADEChallengeData2016 has one <id>.png per image")
    if name == "cityscapes":
        base = root / CITYSCAPES
        return _scanned_set(name, base / "leftImg8bit/val", "_leftImg8bit.png", base / "gtFine/val",
                            [("_gtFine_labelTrainIds.png", None), ("_gtFine_labelIds.png", CITYSCAPES_LABEL_ID_LUT)],
                            "make the train-id maps with cityscapesscripts' createTrainIdLabelImgs "
                            "(or keep gtFine's *_gtFine_labelIds.png for every image)")
    if name == "coco_object":
        base = root / COCO_STUFF
        return _scanned_set(name, base / "images/val2017", ".jpg", base / "annotations/val2017",
                            [("_instanceTrainIds.png", None), (".png", COCO_OBJECT_RAW_LUT)],
                            "make them with the COCO-Object conversion of COCO-Stuff (GroupViT/SCLIP "
                            "cvt_coco_object.py), or keep COCO-Stuff's raw val2017/<id>.png maps")
    base = root / COCO_STUFF
    return _scanned_set(name, base / "images/val2017", ".jpg", base / "annotations/val2017",
                        [("_labelTrainIds.png", None), (".png", COCO_STUFF_RAW_LUT)],
                        "make them with mmsegmentation's coco_stuff164k converter, or keep COCO-Stuff's "
                        "raw val2017/<id>.png maps (stuffthingmaps_trainval2017)")
