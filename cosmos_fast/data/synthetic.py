"""Procedural scenes for the CPU demo and the tests (``cosmos-fast make-demo-data``).

Each image shows 2–3 coloured shapes (circle, square, triangle, diamond; small or large) in distinct
cells of a 3×3 layout over a textured background (stripes, dots, checks or noise). Its json record
has the DreamLIP fields, each a list of sentences, and every sentence describes one object, one
relation between two objects, or the background — so a local text crop matches a local image
region:

* ``raw_caption``        one alt-text-like sentence naming the shapes
* ``shortIB_captions``   "a red circle" per object
* ``shortSV_captions``   "a large red circle at the top left" per object
* ``shortLLA_captions``  the background
* ``longIB_captions``    "there is a large red circle in the top left of the image" per object
* ``longSV_captions``    pairwise relations ("the red circle is to the left of the blue square")
* ``longLLA_captions``   a scene summary and the background

The held-out split (``val-*.tar``) adds ``retrieval_captions``, the captions used for retrieval,
and is also written as a VOC-like segmentation set (``val_seg/``: the same JPEG files, a palette PNG
label map per image, ``ImageSets/Segmentation/val.txt`` and ``classes.txt``) for the demo's zero-shot
segmentation. The classes are the shape colours (class k = ``SEG_CLASSES[k]``, background 0): the
captions name colour and shape, but a colour can be read from any patch of an object while its shape
cannot, so colour is what dense patch features can learn; each class's queries are the colour and
the caption phrases that name it ("red", "red circle", "red square", ...). The label map rasterises the same shapes at
the same coordinates, and ``ImageDraw`` does not anti-alias, so it labels exactly the pixels that
were painted (no ignore band at the edges). Everything is deterministic from the seed; the masks draw
no random numbers, so the shards are the same as without them.
"""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (40, 80, 225), "yellow": (240, 215, 40),
           "purple": (145, 55, 175), "orange": (245, 135, 25), "white": (245, 245, 245), "black": (25, 25, 25)}
SHAPES = ("circle", "square", "triangle", "diamond")
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
BACKGROUNDS = {"gray": (128, 128, 128), "beige": (220, 205, 170), "teal": (60, 130, 130), "pink": (230, 170, 185)}
TEXTURES = ("striped", "dotted", "checkered", "noisy")
SEG_CLASSES = ("background", *COLOURS)
# label-map palette: each colour class in its own colour, background dark gray, ignore (255) VOC's cream
SEG_PALETTE = [(90, 90, 90), *COLOURS.values()]


def _where(r: int, c: int) -> str:
    if (r, c) == (1, 1):
        return "the center"
    if r == 1:
        return f"the {COLS[c]}"
    if c == 1:
        return f"the {ROWS[r]}"
    return f"the {ROWS[r]} {COLS[c]}"


def _background(rng, size: int, colour, texture: str) -> Image.Image:
    base = np.asarray(colour, dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    period = int(rng.integers(6, 14))
    if texture == "striped":
        mask = ((xx + yy) // period) % 2 == 0
    elif texture == "dotted":
        mask = ((xx % period - period / 2) ** 2 + (yy % period - period / 2) ** 2) < (period / 4) ** 2
    elif texture == "checkered":
        mask = ((xx // period) + (yy // period)) % 2 == 0
    else:
        mask = rng.random((size, size)) < 0.5
    img = np.where(mask[..., None], base * 0.75, np.minimum(base * 1.15, 255))
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, colour):
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=colour)
    else:
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=colour)


def make_scene(rng: np.random.Generator, size: int = 128):
    """(PIL image, DreamLIP record) for one random scene."""
    img, record, _ = make_scene_with_mask(rng, size)
    return img, record


def make_scene_with_mask(rng: np.random.Generator, size: int = 128):
    """(PIL image, DreamLIP record, size×size uint8 label map: index in ``SEG_CLASSES``) for one
    random scene; the same random draws, image and record as :func:`make_scene`."""
    bg_name = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    img = _background(rng, size, BACKGROUNDS[bg_name], texture)
    draw = ImageDraw.Draw(img)
    labels = Image.new("L", (size, size), 0)
    label_draw = ImageDraw.Draw(labels)
    n_obj = int(rng.integers(2, 4))
    cells = rng.choice(9, size=n_obj, replace=False)
    colour_names = rng.choice(list(COLOURS), size=n_obj, replace=False)
    objects = []
    cell = size / 3
    for k in range(n_obj):
        r, c = divmod(int(cells[k]), 3)
        shape = SHAPES[rng.integers(len(SHAPES))]
        large = bool(rng.integers(2))
        extent = cell * (0.95 if large else 0.55)
        jitter = (cell - extent) / 2
        x0 = c * cell + jitter + rng.uniform(-jitter, jitter) * 0.5
        y0 = r * cell + jitter + rng.uniform(-jitter, jitter) * 0.5
        box = (x0, y0, x0 + extent, y0 + extent)
        _draw_shape(draw, shape, box, COLOURS[colour_names[k]])
        _draw_shape(label_draw, shape, box, SEG_CLASSES.index(str(colour_names[k])))
        objects.append({"colour": str(colour_names[k]), "shape": shape, "size": "large" if large else "small",
                        "row": r, "col": c})
    names = [f"{o['colour']} {o['shape']}" for o in objects]
    relations = []
    for i in range(n_obj):
        for j in range(i + 1, n_obj):
            a, b = objects[i], objects[j]
            if a["col"] != b["col"]:
                side = "left of" if a["col"] < b["col"] else "right of"
                relations.append(f"the {names[i]} is to the {side} the {names[j]}")
            if a["row"] != b["row"]:
                relations.append(f"the {names[i]} is {'above' if a['row'] < b['row'] else 'below'} the {names[j]}")
    bg = f"the background is {bg_name} and {texture}"
    record = {
        "raw_caption": ["a picture of " + " and ".join(f"a {n}" for n in names)],
        "shortIB_captions": [f"a {n}" for n in names],
        "shortSV_captions": [f"a {o['size']} {n} at {_where(o['row'], o['col'])}" for o, n in zip(objects, names)],
        "shortLLA_captions": [bg],
        "longIB_captions": [f"there is a {o['size']} {n} in {_where(o['row'], o['col'])} of the image"
                            for o, n in zip(objects, names)],
        "longSV_captions": relations or [f"the {names[0]} and the {names[1]} are in the same place"],
        "longLLA_captions": [f"the scene shows {n_obj} shapes on a {texture} {bg_name} background", bg],
    }
    return img, record, np.asarray(labels)


def seg_class_lines() -> list[str]:
    """The class file's lines: the words the captions use for each class, comma-separated, the class's
    name first ("red, red circle, red square, ...")."""
    bg = ["background", *(f"{c} background" for c in BACKGROUNDS), *(f"{t} background" for t in TEXTURES)]
    return [", ".join(bg)] + [", ".join([c, *(f"{c} {s}" for s in SHAPES)]) for c in COLOURS]


def label_png(labels: np.ndarray) -> Image.Image:
    """A label map as a palette ('P') PNG image, VOC's format (255 = ignore)."""
    img = Image.fromarray(np.asarray(labels, dtype=np.uint8)).convert("P")
    palette = [0] * 768
    for k, rgb in enumerate(SEG_PALETTE):
        palette[3 * k:3 * k + 3] = rgb
    palette[765:768] = (224, 224, 192)
    img.putpalette(palette)
    return img


def retrieval_caption(record: dict) -> str:
    """The evaluation caption: the per-object short sentences joined as a global caption."""
    return ". ".join(record["shortIB_captions"])


def write_demo_data(out_dir, n_train: int = 2048, n_val: int = 128, samples_per_shard: int = 256,
                    seed: int = 0, image_size: int = 128) -> dict:
    """Write ``train-NNNNNN.tar`` and ``val-NNNNNN.tar`` shards and the held-out segmentation set
    ``val_seg/``; returns ``{"train": pattern, "val": pattern, "val_seg": folder}``."""
    import webdataset as wds

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seg = out / "val_seg"
    if seg.exists():
        shutil.rmtree(seg)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (seg / sub).mkdir(parents=True)
    seg_ids = []
    rng = np.random.default_rng(seed)
    patterns = {}
    for split, n in (("train", n_train), ("val", n_val)):
        n_shards = max(1, -(-n // samples_per_shard))
        for s in range(n_shards):
            path = out / f"{split}-{s:06d}.tar"
            tmp = path.with_suffix(".tar.tmp")
            with wds.TarWriter(str(tmp)) as sink:
                for i in range(s * samples_per_shard, min(n, (s + 1) * samples_per_shard)):
                    img, record, labels = make_scene_with_mask(rng, image_size)
                    if split == "val":
                        record["retrieval_captions"] = [retrieval_caption(record)]
                    buf = io.BytesIO()
                    img.save(buf, format="JPEG", quality=90)
                    key = f"{split}{i:07d}"
                    sink.write({"__key__": key, "jpg": buf.getvalue(), "json": json.dumps(record).encode()})
                    if split == "val":                  # the very JPEG bytes the retrieval eval decodes
                        (seg / "JPEGImages" / f"{key}.jpg").write_bytes(buf.getvalue())
                        label_png(labels).save(seg / "SegmentationClass" / f"{key}.png")
                        seg_ids.append(key)
            tmp.replace(path)
        patterns[split] = str(out / (f"{split}-{{000000..{n_shards - 1:06d}}}.tar" if n_shards > 1
                                     else f"{split}-000000.tar"))
    (seg / "ImageSets" / "Segmentation" / "val.txt").write_text("".join(f"{k}\n" for k in seg_ids))
    (seg / "classes.txt").write_text("".join(f"{line}\n" for line in seg_class_lines()))
    patterns["val_seg"] = str(seg)
    (out / "DONE").write_text(json.dumps({"seed": seed, "n_train": n_train, "n_val": n_val, **patterns}))
    return patterns
