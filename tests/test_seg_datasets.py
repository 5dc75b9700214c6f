"""The segmentation benchmarks' on-disk layouts (tiny fake releases written here), their label maps,
§6.5's settings, the shipped class files and the errors that name the file."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cosmos_fast
from cosmos_fast.eval.datasets import AnnotationError, MissingAnnotationError
from cosmos_fast.eval.seg_datasets import (NUM_CLASSES, SEG_SETS, SEG_SETS_WITH_BACKGROUND,
                                           SEG_SETS_WITHOUT_BACKGROUND, class_file, load_segmentation_set,
                                           voc_layout_set)
from cosmos_fast.eval.seg_types import SegSettings, class_names

REPO = Path(__file__).resolve().parents[1]
W, H = 8, 6


def _image(path: Path, seed: int = 0, fmt: str = "JPEG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, fmt)
    return path


def _mask(path: Path, values, mode: str = "P") -> np.ndarray:
    """An H×W label map cycling through ``values``, saved as a palette ('P') or grayscale PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = np.resize(np.asarray(values, dtype=np.uint8), H * W).reshape(H, W)
    img = Image.fromarray(labels)
    if mode == "P":
        img = Image.new("P", (W, H))
        img.putdata(labels.ravel().tolist())
        img.putpalette([c for i in range(256) for c in (i, 255 - i, (7 * i) % 256)])
    img.save(path, "PNG")
    return labels


def _voc(base: Path, ids_val, ids_other, mask_dir: str, split_dir: str, values) -> dict:
    truth = {}
    for k, i in enumerate(list(ids_val) + list(ids_other)):
        _image(base / "JPEGImages" / f"{i}.jpg", k)
        truth[i] = _mask(base / mask_dir / f"{i}.png", np.roll(values, k))
    (base / "ImageSets" / split_dir).mkdir(parents=True)
    (base / "ImageSets" / split_dir / "val.txt").write_text("".join(f"{i}\n" for i in ids_val))
    (base / "ImageSets" / split_dir / "train.txt").write_text("".join(f"{i}\n" for i in ids_other))
    return truth


def _reduce_zero_label(labels: np.ndarray) -> np.ndarray:
    out = labels.astype(np.int64) - 1
    out[(labels == 0) | (labels == 255)] = 255
    return out.astype(np.uint8)


def test_voc21_and_voc20(tmp_path):
    base = tmp_path / "VOCdevkit" / "VOC2012"
    truth = _voc(base, ["2007_000033", "2007_000042"], ["2007_000061"], "SegmentationClass", "Segmentation",
                 [0, 1, 5, 20, 255])
    voc21 = load_segmentation_set("voc21", tmp_path)
    assert voc21.images == [base / "JPEGImages" / "2007_000033.jpg", base / "JPEGImages" / "2007_000042.jpg"]
    assert voc21.masks == [base / "SegmentationClass" / "2007_000033.png",
                           base / "SegmentationClass" / "2007_000042.png"]
    assert voc21.class_file == class_file("voc21") and voc21.label_lut is None
    voc20 = load_segmentation_set("voc20", tmp_path)
    assert voc20.images == voc21.images and voc20.masks == voc21.masks
    # result keys: the with-background set calls class 0 "background" (its line lists stuff words)
    assert voc21.class_names[0] == "background" and voc21.class_names[1:] == class_names(class_file("voc20"))
    assert voc20.class_names is None
    for i, name in enumerate(["2007_000033", "2007_000042"]):
        img, labels = voc21.load(i)
        assert img.size == (W, H) and img.mode == "RGB"
        np.testing.assert_array_equal(labels, truth[name])          # palette indices, 0 = background
        _, labels20 = voc20.load(i)
        np.testing.assert_array_equal(labels20, _reduce_zero_label(truth[name]))
        assert set(np.unique(labels20)) == {0, 4, 19, 255}           # 1→0, 5→4, 20→19, 0 and 255 → ignore


def test_context60_and_context59(tmp_path):
    base = tmp_path / "VOCdevkit" / "VOC2010"
    truth = _voc(base, ["2008_000002", "2008_000003", "2008_000007"], [], "SegmentationClassContext",
                 "SegmentationContext", [0, 1, 30, 59])
    c60 = load_segmentation_set("context60", tmp_path)
    c59 = load_segmentation_set("context59", tmp_path)
    assert [p.name for p in c60.masks] == ["2008_000002.png", "2008_000003.png", "2008_000007.png"]
    assert all(p.parent == base / "SegmentationClassContext" for p in c59.masks)
    _, l60 = c60.load(2)
    _, l59 = c59.load(2)
    np.testing.assert_array_equal(l60, truth["2008_000007"])
    np.testing.assert_array_equal(l59, _reduce_zero_label(truth["2008_000007"]))
    assert set(np.unique(l59)) == {0, 29, 58, 255}


def _coco(tmp_path, mask_suffix: str, values):
    base = tmp_path / "coco_stuff164k"
    truth = {}
    for k, i in enumerate(["000000000285", "000000000139"]):
        _image(base / "images" / "val2017" / f"{i}.jpg", k)
        truth[i] = _mask(base / "annotations" / "val2017" / f"{i}{mask_suffix}", values, mode="L")
    return base, truth


def test_coco_stuff164k_train_ids(tmp_path):
    base, truth = _coco(tmp_path, "_labelTrainIds.png", [0, 80, 170, 255])
    s = load_segmentation_set("coco_stuff164k", tmp_path)
    assert [p.name for p in s.images] == ["000000000139.jpg", "000000000285.jpg"]     # sorted, as mmseg
    assert [p.name for p in s.masks] == ["000000000139_labelTrainIds.png", "000000000285_labelTrainIds.png"]
    assert s.label_lut is None
    np.testing.assert_array_equal(s.load(0)[1], truth["000000000139"])


def test_coco_stuff164k_raw_maps_through_the_train_id_table(tmp_path):
    # raw 0-based COCO-Stuff ids: 0 person, 12 stop sign (11 is unused), 90 unused, 91 banner, 181 wood
    _coco(tmp_path, ".png", [0, 12, 91, 181, 255, 11])
    s = load_segmentation_set("coco_stuff164k", tmp_path)
    assert s.masks[0].name == "000000000139.png"
    assert list(np.unique(s.load(0)[1])) == [0, 11, 80, 170, 255]


def test_coco_object(tmp_path):
    base, truth = _coco(tmp_path, "_instanceTrainIds.png", [0, 1, 80, 255])
    s = load_segmentation_set("coco_object", tmp_path)
    assert [p.name for p in s.masks] == ["000000000139_instanceTrainIds.png", "000000000285_instanceTrainIds.png"]
    assert s.label_lut is None
    np.testing.assert_array_equal(s.load(1)[1], truth["000000000285"])


def test_coco_object_from_raw_coco_stuff_maps(tmp_path):
    # things → 1..80, stuff and unlabeled → 0 (background), unused thing ids → ignore
    _coco(tmp_path, ".png", [0, 12, 89, 91, 181, 255, 11])
    _, labels = load_segmentation_set("coco_object", tmp_path).load(0)
    raw = np.resize(np.asarray([0, 12, 89, 91, 181, 255, 11], np.uint8), H * W).reshape(H, W)
    expect = {0: 1, 12: 12, 89: 80, 91: 0, 181: 0, 255: 0, 11: 255}
    for r, e in expect.items():
        assert (labels[raw == r] == e).all(), (r, e)


def _cityscapes(tmp_path, kind: str, values):
    base = tmp_path / "cityscapes"
    truth = {}
    for k, (city, frame) in enumerate([("frankfurt", "000000_000294"), ("lindau", "000000_000019"),
                                       ("frankfurt", "000000_000576")]):
        stem = f"{city}_{frame}"
        _image(base / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png", k, fmt="PNG")
        truth[stem] = _mask(base / "gtFine" / "val" / city / f"{stem}_gtFine_{kind}.png", np.roll(values, k),
                            mode="L")
        _mask(base / "gtFine" / "val" / city / f"{stem}_gtFine_color.png", [1], mode="L")
    return base, truth


def test_cityscapes_train_ids(tmp_path):
    base, truth = _cityscapes(tmp_path, "labelTrainIds", [0, 10, 18, 255])
    s = load_segmentation_set("cityscapes", tmp_path)
    assert [p.relative_to(base).as_posix() for p in s.images] == [
        "leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png",
        "leftImg8bit/val/frankfurt/frankfurt_000000_000576_leftImg8bit.png",
        "leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png"]
    assert s.masks[2] == base / "gtFine/val/lindau/lindau_000000_000019_gtFine_labelTrainIds.png"
    assert s.label_lut is None
    np.testing.assert_array_equal(s.load(2)[1], truth["lindau_000000_000019"])


def test_cityscapes_label_ids_map_to_train_ids(tmp_path):
    _cityscapes(tmp_path, "labelIds", [0, 7, 8, 26, 33, 4, 34])
    s = load_segmentation_set("cityscapes", tmp_path)
    assert s.masks[0].name.endswith("_gtFine_labelIds.png")
    raw = np.asarray(Image.open(s.masks[0]))
    labels = s.load(0)[1]
    for r, e in {0: 255, 7: 0, 8: 1, 26: 13, 33: 18, 4: 255, 34: 255}.items():
        assert (labels[raw == r] == e).all(), (r, e)


def test_cityscapes_without_label_maps_says_how_to_make_them(tmp_path):
    base, _ = _cityscapes(tmp_path, "labelIds", [7])
    (base / "gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(MissingAnnotationError, match="createTrainIdLabelImgs") as err:
        load_segmentation_set("cityscapes", tmp_path)
    assert "frankfurt_000000_000294_gtFine_labelTrainIds.png" in str(err.value)


def test_ade20k(tmp_path):
    base = tmp_path / "ade" / "ADEChallengeData2016"
    truth = {}
    for k, i in enumerate(["ADE_val_00000002", "ADE_val_00000001"]):
        _image(base / "images" / "validation" / f"{i}.jpg", k)
        truth[i] = _mask(base / "annotations" / "validation" / f"{i}.png", [0, 1, 150], mode="L")
    _image(base / "images" / "training" / "ADE_train_00000001.jpg")
    s = load_segmentation_set("ade20k", tmp_path)
    assert [p.name for p in s.images] == ["ADE_val_00000001.jpg", "ADE_val_00000002.jpg"]
    assert [p.name for p in s.masks] == ["ADE_val_00000001.png", "ADE_val_00000002.png"]
    labels = s.load(0)[1]
    np.testing.assert_array_equal(labels, _reduce_zero_label(truth["ADE_val_00000001"]))
    assert set(np.unique(labels)) == {0, 149, 255}


def test_settings_follow_the_tables():
    """§6.5: logit scale / prob_thd / area_thd per benchmark; short side 336, 448 for COCO-Stuff164k
    (COCO-Object's pipeline keeps 336), 560 for Cityscapes; long side ≤ 2048; windows 224 / 112."""
    from cosmos_fast.eval.seg_datasets import SEG_SETTINGS

    table = {"voc21": (65, 0.1, 0.1), "context60": (50, 0.1, None), "coco_object": (50, 0.1, None),
             "voc20": (40, 0.0, None), "cityscapes": (40, 0.0, None), "context59": (40, 0.0, None),
             "ade20k": (40, 0.0, None), "coco_stuff164k": (40, 0.0, None)}
    short = {"coco_stuff164k": 448, "cityscapes": 560}
    assert set(SEG_SETTINGS) == set(SEG_SETS) == set(table)
    for name, (scale, prob, area) in table.items():
        s = SEG_SETTINGS[name]
        assert isinstance(s, SegSettings)
        assert (s.logit_scale, s.prob_thd, s.area_thd) == (scale, prob, area), name
        assert (s.short_side, s.max_long_side, s.slide_crop, s.slide_stride) == (short.get(name, 336), 2048, 224, 112)


def test_background_split_of_the_sets():
    assert SEG_SETS_WITH_BACKGROUND == ("voc21", "context60", "coco_object")
    assert set(SEG_SETS_WITH_BACKGROUND) | set(SEG_SETS_WITHOUT_BACKGROUND) == set(SEG_SETS)
    assert not set(SEG_SETS_WITH_BACKGROUND) & set(SEG_SETS_WITHOUT_BACKGROUND)


@pytest.mark.parametrize("name", SEG_SETS)
def test_shipped_class_files(name):
    path = class_file(name)
    assert path.is_file() and path.parent == Path(cosmos_fast.__file__).resolve().parent / "eval" / "seg_classes"
    lines = path.read_text().splitlines()
    assert len(lines) == NUM_CLASSES[name] == {"voc21": 21, "voc20": 20, "context60": 60, "context59": 59,
                                               "coco_object": 81, "cityscapes": 19, "ade20k": 150,
                                               "coco_stuff164k": 171}[name]
    queries = [q.strip() for line in lines for q in line.split(",")]
    assert all(queries) and all(re.fullmatch(r"[a-z][a-z ]*[a-z]", q) for q in queries), name
    assert len(queries) == len(set(queries)), f"{name}: a query names two classes"
    if name in SEG_SETS_WITH_BACKGROUND:      # line 0 is background, then the objects of the set without it
        without = {"voc21": "voc20", "context60": "context59", "coco_object": "coco_stuff164k"}[name]
        assert lines[1:] == class_file(without).read_text().splitlines()[:len(lines) - 1]
    else:
        assert "background" not in queries


def test_class_files_are_package_data(tmp_path):
    """setup.py ships every class file: the package as it is installed has them where class_file() looks."""
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "-d", str(tmp_path)], cwd=REPO, check=True,
                   capture_output=True)
    pkg = Path(cosmos_fast.__file__).resolve().parent
    for name in SEG_SETS:
        built = tmp_path / class_file(name).relative_to(pkg.parent)
        assert built.read_text() == class_file(name).read_text(), built


def test_unknown_set():
    with pytest.raises(ValueError, match="voc21"):
        class_file("pascal")


def test_missing_root_and_release_folders(tmp_path):
    with pytest.raises(MissingAnnotationError, match=re.escape(str(tmp_path / "nope"))):
        load_segmentation_set("voc21", tmp_path / "nope")
    with pytest.raises(MissingAnnotationError, match=re.escape(str(tmp_path / "VOCdevkit" / "VOC2012"))):
        load_segmentation_set("voc21", tmp_path)
    with pytest.raises(MissingAnnotationError, match="ADEChallengeData2016"):
        load_segmentation_set("ade20k", tmp_path)


def test_missing_or_empty_split_list(tmp_path):
    base = tmp_path / "VOCdevkit" / "VOC2012"
    _voc(base, ["a"], [], "SegmentationClass", "Segmentation", [0, 1])
    split = base / "ImageSets" / "Segmentation" / "val.txt"
    split.unlink()
    with pytest.raises(MissingAnnotationError, match=re.escape(str(split))):
        load_segmentation_set("voc21", tmp_path)
    split.write_text("\n\n")
    with pytest.raises(AnnotationError, match=re.escape(str(split)) + ".*empty"):
        load_segmentation_set("voc21", tmp_path)


@pytest.mark.parametrize("missing", ["JPEGImages/b.jpg", "SegmentationClass/b.png"])
def test_listed_id_without_its_files(tmp_path, missing):
    base = tmp_path / "VOCdevkit" / "VOC2012"
    _voc(base, ["a", "b"], [], "SegmentationClass", "Segmentation", [0, 1])
    (base / missing).unlink()
    with pytest.raises(AnnotationError, match=re.escape(str(base / missing))) as err:
        load_segmentation_set("voc20", tmp_path)
    assert "val.txt" in str(err.value) and "'b'" in str(err.value)


@pytest.mark.parametrize("bad", ["rgb", "jpeg", "garbage"])
def test_label_map_that_is_not_a_png_of_indices(tmp_path, bad):
    base = tmp_path / "VOCdevkit" / "VOC2012"
    _voc(base, ["a"], [], "SegmentationClass", "Segmentation", [0, 1])
    mask = base / "SegmentationClass" / "a.png"
    if bad == "garbage":
        mask.write_bytes(b"not an image")
    else:
        _image(mask, fmt="PNG" if bad == "rgb" else "JPEG")
    with pytest.raises(AnnotationError, match=re.escape(str(mask))):
        load_segmentation_set("voc21", tmp_path)


def test_scanned_layout_without_images_or_masks(tmp_path):
    base = tmp_path / "coco_stuff164k"
    (base / "images" / "val2017").mkdir(parents=True)
    (base / "annotations" / "val2017").mkdir(parents=True)
    with pytest.raises(AnnotationError, match=re.escape(str(base / "images" / "val2017"))):
        load_segmentation_set("coco_stuff164k", tmp_path)
    _image(base / "images" / "val2017" / "000000000139.jpg")
    with pytest.raises(MissingAnnotationError, match="000000000139_instanceTrainIds.png"):
        load_segmentation_set("coco_object", tmp_path)


def test_voc_layout_set_with_its_own_class_file(tmp_path):
    """The demo's synthetic held-out split: a VOC-like folder and a class file of its own."""
    _voc(tmp_path / "heldout", ["s0", "s1"], [], "SegmentationClass", "Segmentation", [0, 2])
    cls = tmp_path / "classes.txt"
    cls.write_text("background\ncircle\nsquare\n")
    settings = SegSettings(logit_scale=50.0)
    s = voc_layout_set(tmp_path / "heldout", "synthetic", cls, settings)
    assert len(s) == 2 and s.class_file == cls and s.settings is settings and s.label_lut is None
    assert set(np.unique(s.load(1)[1])) == {0, 2}


def test_cityscapes_and_coco_tables():
    """The id → train-id tables against the datasets' definitions, written out here."""
    from cosmos_fast.eval.seg_datasets import CITYSCAPES_LABEL_ID_LUT, COCO_OBJECT_RAW_LUT, COCO_STUFF_RAW_LUT

    # cityscapesscripts labels.py: road 7, sidewalk 8, building 11, wall 12, fence 13, pole 17,
    # traffic light 19, traffic sign 20, vegetation 21, terrain 22, sky 23, person 24, rider 25, car 26,
    # truck 27, bus 28, train 31, motorcycle 32, bicycle 33; all others (parking 9, polegroup 18,
    # caravan 29, trailer 30, ...) ignored
    city = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
            26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
    assert {i: int(CITYSCAPES_LABEL_ID_LUT[i]) for i in range(256) if CITYSCAPES_LABEL_ID_LUT[i] != 255} == city
    # COCO's thing ids (1-based) 12 street sign, 26 hat, 29 shoe, 30 eye glasses, 45 plate, 66 mirror,
    # 68 window, 69 desk, 71 door, 83 blender, 91 hair brush have no masks: 0-based ids below
    unused = [11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90]
    used = [i for i in range(182) if i not in unused]
    np.testing.assert_array_equal(COCO_STUFF_RAW_LUT[used], np.arange(171))
    assert (COCO_STUFF_RAW_LUT[unused + [182, 254, 255]] == 255).all()
    np.testing.assert_array_equal(COCO_OBJECT_RAW_LUT[used[:80]], np.arange(1, 81))
    assert (COCO_OBJECT_RAW_LUT[used[80:] + [255]] == 0).all() and (COCO_OBJECT_RAW_LUT[unused] == 255).all()
    assert used[79] == 89 and used[80] == 91       # toothbrush (90 1-based) is the last thing, banner the first stuff
