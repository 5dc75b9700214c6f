"""Evaluation data sets in the layouts of the official ``datasets/README.md`` (cosmos_method.md §6.6).

Retrieval (``root`` = the folder given as ``--retrieval-root``, the official ``--data-root-dir``):

* coco, official: ``coco/annotations/captions_val2017.json`` (COCO API: ``images`` with ``id`` /
  ``file_name``, ``annotations`` with ``image_id`` / ``caption``); images
  ``coco/images/val2017/<file_name>``.
* coco, karpathy: ``coco/annotations/coco_karpathy_test.json`` (a list of ``{image, caption}``,
  images ``coco/images/<image>``) or else Karpathy's ``coco/annotations/dataset_coco.json`` (entries
  with ``split == "test"``, images ``coco/images/<filepath>/<filename>``).
* flickr30k, official: ``flickr30k-images/flickr30k_val.json``; karpathy: ``flickr30k_test.json``
  (FLAIR format: a list of ``{image: "flickr30k-images/<id>.jpg", caption: [5 strings]}``); image
  paths are ``<root>/<image>``.

"official" reproduces the published numbers: COCO val2017 (5,000 images, 25,014 captions) and the
1,014-image Flickr30k *val* file (§7 item 17); "karpathy" gives the usual 5k / 1k test splits.
Captions keep file order (``cap_id`` = running index); images are numbered in order of first
appearance among the captions, so an image without captions is not part of the set (§6.2 step 1).

Classification:

* ImageNet: an ImageFolder ``<wnid>/*.JPEG`` (``imagenet/data/val_images``; ``imagenet/`` or
  ``imagenet/data/`` are accepted too). Classes are the sorted folder names; with exactly 1,000
  folders the names are open_clip's ``IMAGENET_CLASSNAMES`` (same sorted-wnid order), otherwise they must be
  given (a list, or a file: one name per line, a JSON list, or a JSON ``{folder: name}`` map).
* SUN397 in torchvision's layout: ``SUN397/ClassName.txt`` (``/a/abbey`` …) and
  ``SUN397/<letter>/<class>[/<sub>]/*.jpg``. The official code evaluates on a random 19,850-image
  subset whose seed includes Python's salted ``hash("sun397")``, so that split cannot be rebuilt
  (§7 item 18). Here the subset is ``torch.randperm(n, generator=manual_seed(seed))[:19850]``
  (sorted; seed 0 by default), which is reproducible but not the official subset. Class prompt
  names are the ClassName.txt entries without the letter, with ``_`` and ``/`` as spaces
  (``/a/apartment_building/outdoor`` → ``apartment building outdoor``); the templates are CLIP's two
  SUN397 templates. Both differ possibly from the official ``label.json`` / ``templates.json``.

Held-out webdataset shards (``data.val_shards``, what training evaluates) are read by
:func:`load_shard_retrieval_set` (through :func:`load_retrieval_shards`).

Every reader fails with :class:`AnnotationError` (a ``ValueError``) naming the file and the field
that is malformed, or ``FileNotFoundError`` naming the missing file (:class:`MissingAnnotationError`
when the annotation file itself is absent).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from ..data.captions import SampleError
from ..data.stream import decode_image, expand_shards, missing_local_shards, parse_json

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLITS = ("official", "karpathy")
SUN397_TEST_SIZE = 19850
#: CLIP's prompt templates for SUN397 (two, as in the official templates.json).
SUN397_TEMPLATES = ("a photo of a {}.", "a photo of the {}.")


class AnnotationError(ValueError):
    """An annotation or class-name file that exists but cannot be used as it is."""

    def __init__(self, path, message: str):
        self.path = Path(path)
        super().__init__(f"{path}: {message}")


@dataclass
class RetrievalSet:
    """Captions in file order, unique images in order of first appearance."""

    name: str
    split: str
    annotation: Path
    image_paths: list[Path]
    captions: list[str]
    text_to_image: torch.Tensor          # (n_texts,) int64, index into image_paths

    @property
    def n_images(self) -> int:
        return len(self.image_paths)

    @property
    def n_texts(self) -> int:
        return len(self.captions)

    def info(self) -> dict:
        return {"split": self.split, "annotation": str(self.annotation), "n_images": self.n_images,
                "n_texts": self.n_texts}


@dataclass
class ClassificationSet:
    name: str
    split: str
    root: Path
    image_paths: list[Path]
    labels: torch.Tensor                 # (n_images,) int64
    classnames: list[str]
    templates: Sequence = field(default_factory=tuple)   # callables or "{}" format strings

    @property
    def n_images(self) -> int:
        return len(self.image_paths)

    def info(self) -> dict:
        return {"split": self.split, "root": str(self.root), "n_images": self.n_images,
                "n_classes": len(self.classnames), "n_templates": len(self.templates)}


class MissingAnnotationError(FileNotFoundError):
    """A data set's annotation file is absent: the set is not there (a default set is then skipped)."""

    def __init__(self, path, message: str):
        self.path = Path(path)
        super().__init__(message)


class ImageListDataset(Dataset):
    """Images read from paths with PIL (converted to RGB), or already decoded PIL images (held-out
    shards), passed through ``transform``."""

    def __init__(self, paths: Sequence, transform: Callable):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        if isinstance(self.paths[i], Image.Image):
            return self.transform(self.paths[i].convert("RGB"))
        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB"))


# --------------------------------------------------------------------------- helpers
def load_present(names: Sequence[str], load: Callable, kind: str, none_found: str,
                 missing: type[Exception] = MissingAnnotationError) -> list:
    """``load(name)`` for each of ``names``, skipping (with a log line) the sets whose files are
    missing (``missing`` raised); none present → FileNotFoundError ``none_found`` + why each was skipped."""
    found, skipped = [], []
    for name in names:
        try:
            found.append(load(name))
        except missing as e:
            skipped.append(f"{name} ({e})")
    for why in skipped:
        log.warning("skipping %s set %s", kind, why)
    if not found:
        raise FileNotFoundError(none_found + "; ".join(skipped))
    return found


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise MissingAnnotationError(path, f"{what} annotation file {path} not found")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as e:
        raise AnnotationError(path, f"not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise AnnotationError(path, f"not UTF-8 text ({e})") from None


def _field(path: Path, record, key: str, where: str, kind: type | tuple):
    if not isinstance(record, dict):
        raise AnnotationError(path, f"{where} must be an object, got {type(record).__name__}")
    if key not in record:
        raise AnnotationError(path, f"{where} has no field {key!r}")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise AnnotationError(path, f"{where} field {key!r} must be a {names}, got {type(value).__name__}")
    return value


def _caption_list(path: Path, value, where: str) -> list[str]:
    caps = [value] if isinstance(value, str) else value
    if not isinstance(caps, list) or not caps or not all(isinstance(c, str) for c in caps):
        raise AnnotationError(path, f"{where} field 'caption' must be a string or a non-empty list of "
                                    f"strings")
    return caps


def _check_images_exist(paths: Sequence[Path], annotation: Path) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} images listed in {annotation} are "
                                f"missing: {shown}{more}")


def _grouped(name: str, split: str, annotation: Path, pairs) -> RetrievalSet:
    """(image path, caption) pairs in caption order → a RetrievalSet (images by first appearance)."""
    index: dict[Path, int] = {}
    captions, owner = [], []
    for img, cap in pairs:
        owner.append(index.setdefault(img, len(index)))
        captions.append(cap)
    if not captions:
        raise AnnotationError(annotation, "holds no captions")
    images = list(index)
    _check_images_exist(images, annotation)
    return RetrievalSet(name, split, annotation, images, captions, torch.tensor(owner, dtype=torch.long))


def _image_caption_list(path: Path, data, base: Path, only_split: str | None = None):
    """FLAIR / BLIP format: a list of ``{image, caption: str | [str]}``."""
    if not isinstance(data, list):
        raise AnnotationError(path, f"expected a list of {{image, caption}} entries, got {type(data).__name__}")
    for i, entry in enumerate(data):
        where = f"entry #{i}"
        image = _field(path, entry, "image", where, str)
        if "caption" not in entry:
            raise AnnotationError(path, f"{where} has no field 'caption'")
        for cap in _caption_list(path, entry["caption"], where):
            yield base / image, cap


# --------------------------------------------------------------------------- retrieval
def _coco_official(root: Path) -> RetrievalSet:
    path = root / "coco" / "annotations" / "captions_val2017.json"
    data = _read_json(path, "COCO")
    if not isinstance(data, dict):
        raise AnnotationError(path, f"expected a COCO captions object, got {type(data).__name__}")
    images = _field(path, data, "images", "the top level", list)
    annotations = _field(path, data, "annotations", "the top level", list)
    file_of = {}
    for i, rec in enumerate(images):
        where = f"images[{i}]"
        file_of[_field(path, rec, "id", where, (int, str))] = _field(path, rec, "file_name", where, str)
    image_dir = root / "coco" / "images" / "val2017"

    def pairs():
        for i, rec in enumerate(annotations):
            where = f"annotations[{i}]"
            image_id = _field(path, rec, "image_id", where, (int, str))
            caption = _field(path, rec, "caption", where, str)
            if image_id not in file_of:
                raise AnnotationError(path, f"{where} refers to image_id {image_id!r}, which is not in 'images'")
            yield image_dir / file_of[image_id], caption

    return _grouped("coco", "official", path, pairs())


def _coco_karpathy(root: Path) -> RetrievalSet:
    ann = root / "coco" / "annotations"
    blip, karpathy = ann / "coco_karpathy_test.json", ann / "dataset_coco.json"
    image_dir = root / "coco" / "images"
    if blip.is_file():
        return _grouped("coco", "karpathy", blip, _image_caption_list(blip, _read_json(blip, "COCO"), image_dir))
    if not karpathy.is_file():
        raise MissingAnnotationError(karpathy, f"COCO Karpathy test split: neither {blip} nor {karpathy} exists")
    data = _read_json(karpathy, "COCO")
    entries = _field(karpathy, data, "images", "the top level", list)

    def pairs():
        for i, rec in enumerate(entries):
            where = f"images[{i}]"
            if _field(karpathy, rec, "split", where, str) != "test":
                continue
            folder = _field(karpathy, rec, "filepath", where, str)
            name = _field(karpathy, rec, "filename", where, str)
            for j, sent in enumerate(_field(karpathy, rec, "sentences", where, list)):
                yield image_dir / folder / name, _field(karpathy, sent, "raw", f"{where}.sentences[{j}]", str)

    return _grouped("coco", "karpathy", karpathy, pairs())


def _flickr30k(root: Path, split: str) -> RetrievalSet:
    path = root / "flickr30k-images" / ("flickr30k_val.json" if split == "official" else "flickr30k_test.json")
    # the entries name "flickr30k-images/<id>.jpg": paths are relative to the retrieval root
    return _grouped("flickr30k", split, path, _image_caption_list(path, _read_json(path, "Flickr30k"), root))


RETRIEVAL_SETS = ("coco", "flickr30k")


def load_retrieval_set(name: str, root, split: str = "official") -> RetrievalSet:
    """``name`` in {"coco", "flickr30k"}; ``split`` "official" (published numbers) or "karpathy"."""
    if split not in SPLITS:
        raise ValueError(f"unknown retrieval split {split!r}; choose one of {SPLITS}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"retrieval root {root} is not a directory")
    if name == "coco":
        return _coco_official(root) if split == "official" else _coco_karpathy(root)
    if name == "flickr30k":
        return _flickr30k(root, split)
    raise ValueError(f"unknown retrieval set {name!r}; choose from {RETRIEVAL_SETS}")


def load_retrieval_shards(urls, caption_key: str = "retrieval_captions"):
    """(list of PIL images, list of captions, text→image index) from webdataset shards.

    A sample whose json or image cannot be decoded (the training loader's rules: ``bad_json``,
    ``corrupt_image``, ``unsupported_image_format``) is skipped with a log line naming shard and key; a
    record without the jpg/json members or the caption list is an error naming the sample."""
    from webdataset import tariterators

    images, captions, owner = [], [], []
    for url in urls:
        files = tariterators.tar_file_expander(tariterators.url_opener([{"url": url}]))
        for sample in tariterators.group_by_keys(files):
            key = sample.get("__key__")
            if "json" not in sample or "jpg" not in sample:
                raise ValueError(f"retrieval sample {key!r} in {url} lacks a jpg or json member")
            try:
                record = parse_json(sample["json"])
                image = decode_image(sample["jpg"]).convert("RGB")
            except SampleError as e:
                log.warning("skipping retrieval sample %r in %s: %s (%s)", key, url, e.reason, e)
                continue
            caps = record.get(caption_key) if isinstance(record, dict) else None
            if not isinstance(caps, list) or not caps:
                raise ValueError(f"retrieval sample {key!r} in {url}: field {caption_key!r} must be a "
                                 f"non-empty list of captions")
            images.append(image)
            captions += caps
            owner += [len(images) - 1] * len(caps)
    return images, captions, torch.tensor(owner)


def load_shard_retrieval_set(pattern: str) -> RetrievalSet:
    """The held-out webdataset shards training evaluates (``data.val_shards``: a brace pattern, ``::``
    joins sources; json field ``retrieval_captions``), decoded into memory as a set named
    ``val_shards``. Local shards are checked to exist first: one error naming the pattern and how many
    of its files exist."""
    urls = expand_shards(pattern)
    missing = missing_local_shards(urls)
    if missing:
        raise FileNotFoundError(f"--val-shards {pattern!r}: {len(urls) - len(missing)} of {len(urls)} shard files "
                                f"exist (first missing: {missing[0]})")
    images, captions, owner = load_retrieval_shards(urls)
    if not captions:
        raise ValueError(f"--val-shards {pattern!r}: the shards hold no readable sample")
    return RetrievalSet("val_shards", "held-out", Path(pattern), images, captions, owner.long())


# --------------------------------------------------------------------------- classification
def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def read_classnames(source, folders: Sequence[str], path_hint="classnames") -> list[str]:
    """Class names for ``folders`` (sorted order) from a list or a file (lines / JSON list / JSON map)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"class-name file {path} not found")
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            try:
                source = json.loads(text)
            except json.JSONDecodeError as e:
                raise AnnotationError(path, f"not valid JSON ({e})") from None
        else:
            source = [line.strip() for line in text.splitlines() if line.strip()]
        path_hint = path
    if isinstance(source, dict):
        missing = [f for f in folders if f not in source]
        if missing:
            raise AnnotationError(path_hint, f"no class name for folder(s) {missing[:5]}")
        source = [source[f] for f in folders]
    if not isinstance(source, (list, tuple)) or not all(isinstance(s, str) for s in source):
        raise AnnotationError(path_hint, "class names must be a list of strings or a {folder: name} map")
    if len(source) != len(folders):
        raise AnnotationError(path_hint, f"{len(source)} class names for {len(folders)} class folders")
    return list(source)


def load_imagenet(root, classnames=None) -> ClassificationSet:
    """ImageFolder of ``<wnid>/*.JPEG`` with open_clip's class names and 80 OpenAI templates."""
    from open_clip import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"ImageNet folder {root} is not a directory")
    for sub in ("val_images", "data/val_images"):            # imagenet/data/val_images (§6.6)
        if (root / sub).is_dir():
            root = root / sub
            break
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not folders:
        raise FileNotFoundError(f"ImageNet folder {root} has no class sub-folders (expected <wnid>/*.JPEG)")
    if classnames is None:
        if len(folders) != len(IMAGENET_CLASSNAMES):
            raise ValueError(f"ImageNet folder {root} has {len(folders)} class folders; the ImageNet class "
                             f"names cover exactly {len(IMAGENET_CLASSNAMES)}. For a subset pass class names "
                             f"(CLI: --imagenet-classnames FILE)")
        classnames = list(IMAGENET_CLASSNAMES)
    else:
        classnames = read_classnames(classnames, folders)
    paths, labels = [], []
    for c, folder in enumerate(folders):
        files = _images_in(root / folder)
        if not files:
            raise FileNotFoundError(f"class folder {root / folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        paths += files
        labels += [c] * len(files)
    return ClassificationSet("imagenet", "val", root, paths, torch.tensor(labels, dtype=torch.long),
                             classnames, tuple(OPENAI_IMAGENET_TEMPLATES))


def sun397_subset(n_total: int, seed: int = 0, n_test: int = SUN397_TEST_SIZE) -> list[int]:
    """The documented seeded replacement of the official (irreproducible) SUN397 test subset."""
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n_total, generator=g)[:n_test].tolist())


def load_sun397(root, seed: int = 0, n_test: int = SUN397_TEST_SIZE) -> ClassificationSet:
    root = Path(root)
    if (root / "SUN397").is_dir():
        root = root / "SUN397"
    listing = root / "ClassName.txt"
    if not listing.is_file():
        raise FileNotFoundError(f"SUN397 class list {listing} not found (torchvision layout: "
                                f"SUN397/ClassName.txt and SUN397/<letter>/<class>/*.jpg)")
    entries = [line.strip() for line in listing.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not entries:
        raise AnnotationError(listing, "lists no classes")
    classnames, all_paths, all_labels = [], [], []
    for c, entry in enumerate(entries):
        parts = [p for p in entry.split("/") if p]
        if len(parts) < 2 or len(parts[0]) != 1:
            raise AnnotationError(listing, f"line {c + 1} {entry!r} is not of the form /<letter>/<class>[/<sub>]")
        classnames.append(" ".join(parts[1:]).replace("_", " "))
        folder = root.joinpath(*parts)
        if not folder.is_dir():
            raise FileNotFoundError(f"SUN397 class folder {folder} (line {c + 1} of {listing}) not found")
        files = _images_in(folder)
        all_paths += files
        all_labels += [c] * len(files)
    if not all_paths:
        raise FileNotFoundError(f"SUN397 folder {root} holds no images")
    keep = sun397_subset(len(all_paths), seed, n_test)
    return ClassificationSet("sun397", f"seeded subset (seed {seed}, {len(keep)} of {len(all_paths)} images)",
                             root, [all_paths[i] for i in keep],
                             torch.tensor([all_labels[i] for i in keep], dtype=torch.long),
                             classnames, SUN397_TEMPLATES)
