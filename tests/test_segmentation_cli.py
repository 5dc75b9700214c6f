"""Zero-shot segmentation around the core (issue 18): the demo's synthetic ground-truth masks in a
VOC layout, ``cosmos-fast eval --segmentation-root`` end to end on a generated tiny VOC2012 tree,
its set selection and errors, and 2-rank gloo segmentation equal to one process. (The demo's
mIoU before / after training is checked in tests/test_package.py's demo test.)"""
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cosmos_fast import create_model, save_checkpoint
from cosmos_fast.data.synthetic import (COLOURS, SEG_CLASSES, make_scene, make_scene_with_mask, seg_class_lines,
                                        write_demo_data)
from cosmos_fast.eval import cli as eval_cli
from cosmos_fast.eval.seg_datasets import (SEG_SETS_WITH_BACKGROUND, SEG_SETS_WITHOUT_BACKGROUND,
                                           load_segmentation_set, voc_layout_set)
from cosmos_fast.eval.seg_types import SegSettings
from cosmos_fast.eval.segmentation import evaluate_segmentation, read_class_queries

TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 32, "layers": 1, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
VOC_SIZES = ((75, 50), (60, 90), (64, 64))          # (w, h): not multiples of anything


def tiny_model(seed: int):
    torch.manual_seed(seed)
    return create_model(TINY).eval()


# ------------------------------------------------------------------------------ synthetic masks
def test_synthetic_held_out_masks(tmp_path):
    """val_seg/ holds the shards' very JPEG bytes, label maps that mark exactly the painted pixels
    of each shape with its colour class, val.txt and the class file; drawing the masks changes no
    random draw, so the scenes (and the shards) are those of make_scene."""
    paths = write_demo_data(tmp_path, n_train=3, n_val=5, samples_per_shard=4, seed=4, image_size=48)
    seg = Path(paths["val_seg"])
    assert seg == tmp_path / "val_seg"
    assert json.loads((tmp_path / "DONE").read_text())["val_seg"] == str(seg)
    ids = (seg / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    assert ids == [f"val{i:07d}" for i in range(5)]
    shard_jpegs = {}
    for shard in sorted(tmp_path.glob("val-*.tar")):                  # two shards of 4 and 1
        with tarfile.open(shard) as tar:
            shard_jpegs.update({m.name[:-4]: tar.extractfile(m).read() for m in tar.getmembers()
                                if m.name.endswith(".jpg")})
    assert sorted(shard_jpegs) == ids
    lines = (seg / "classes.txt").read_text().splitlines()
    assert lines == seg_class_lines() and len(lines) == len(SEG_CLASSES) == 1 + len(COLOURS)
    queries, index = read_class_queries(seg / "classes.txt")
    assert set(index) == set(range(len(SEG_CLASSES))) and "red circle" in queries

    rng = np.random.default_rng(4)
    for _ in range(3):                                   # the training scenes come first
        make_scene_with_mask(rng, 48)
    for key in ids:
        img, record, labels = make_scene_with_mask(rng, 48)
        assert (seg / "JPEGImages" / f"{key}.jpg").read_bytes() == shard_jpegs[key]
        png = Image.open(seg / "SegmentationClass" / f"{key}.png")
        assert png.mode == "P" and png.size == (48, 48)
        stored = np.asarray(png)
        np.testing.assert_array_equal(stored, labels)
        pixels = np.asarray(img)
        present = set(np.unique(stored).tolist()) - {0}
        assert present, "every scene has shapes"
        for k in range(1, len(SEG_CLASSES)):
            painted = (pixels == COLOURS[SEG_CLASSES[k]]).all(-1)
            np.testing.assert_array_equal(painted, stored == k)          # exact: no anti-aliasing
        named = {o.split()[1] for o in record["shortIB_captions"]}        # "a red circle" -> red
        assert {SEG_CLASSES[k] for k in present} == named

    a, b = np.random.default_rng(9), np.random.default_rng(9)
    for _ in range(3):
        img_a, rec_a = make_scene(a, 40)
        img_b, rec_b, _ = make_scene_with_mask(b, 40)
        assert rec_a == rec_b and np.array_equal(np.asarray(img_a), np.asarray(img_b))


# ------------------------------------------------------------------------------ eval CLI
@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    """A tiny VOC2012 tree in the standard layout: JPEG images, palette label maps with classes
    0..20 and a 255 (ignore) border, ImageSets/Segmentation/val.txt."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("seg")
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    ids = []
    for i, (w, h) in enumerate(VOC_SIZES):
        key = f"2007_{i:06d}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(voc / "JPEGImages" / f"{key}.jpg")
        labels = np.zeros((h, w), np.uint8)
        labels[h // 4:3 * h // 4, w // 4:3 * w // 4] = rng.integers(1, 21)
        labels[:h // 5, :w // 5] = rng.integers(1, 21)
        labels[0, :] = 255
        png = Image.fromarray(labels).convert("P")
        png.putpalette([c for k in range(256) for c in ((k * 37) % 256, (k * 91) % 256, (k * 53) % 256)])
        png.save(voc / "SegmentationClass" / f"{key}.png")
        ids.append(key)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
    cfg_json = root / "tiny.json"
    cfg_json.write_text(json.dumps(TINY))
    ckpt = save_checkpoint(root / "epoch_1.pt", tiny_model(0), tiny_model(1), epoch=1)
    return {"root": root, "voc": voc, "cfg_json": cfg_json, "ckpt": ckpt}


def _cli(*argv):
    return eval_cli.main([*map(str, argv), "--device", "cpu", "--num-workers", "0", "--no-progress"])


def _close(a: dict, b: dict):
    assert a["mIoU"] == pytest.approx(b["mIoU"], abs=1e-6)
    assert a["per_class_iou"].keys() == b["per_class_iou"].keys()
    for k, v in a["per_class_iou"].items():
        assert (v is None) == (b["per_class_iou"][k] is None), k
        if v is not None:
            assert v == pytest.approx(b["per_class_iou"][k], abs=1e-6), k


def test_eval_cli_segmentation_end_to_end(voc_root, tmp_path, capsys):
    """``cosmos-fast eval --segmentation-root --segmentation-sets voc21`` on the teacher: per-set
    mIoU and per-class IoU in the results JSON, equal to evaluate_segmentation on the same set;
    ``--no-csa`` runs the plain last block."""
    out = tmp_path / "seg.json"
    common = ["--checkpoint", voc_root["ckpt"], "--model-config", voc_root["cfg_json"],
              "--segmentation-root", voc_root["root"]]
    assert _cli(*common, "--segmentation-sets", "voc21", "--output", out) == 0
    assert "voc21" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["model"] == "teacher" and set(report["datasets"]) == {"voc21"}
    got = report["datasets"]["voc21"]
    assert got["n_images"] == len(VOC_SIZES) and got["csa"] is True
    assert 0.0 <= got["mIoU"] <= 1.0 and len(got["per_class_iou"]) == 21
    present = [v for v in got["per_class_iou"].values() if v is not None]
    assert present and all(0.0 <= v <= 1.0 for v in present)
    want = evaluate_segmentation(tiny_model(1), load_segmentation_set("voc21", voc_root["root"]), csa=True)
    _close(got, want)

    assert _cli(*common, "--segmentation-sets", "voc21", "--no-csa", "--output", out) == 0
    plain = json.loads(out.read_text())["datasets"]["voc21"]
    assert plain["csa"] is False
    _close(plain, evaluate_segmentation(tiny_model(1), load_segmentation_set("voc21", voc_root["root"]), csa=False))


def test_eval_cli_segmentation_set_selection(voc_root, tmp_path, caplog):
    """Without --segmentation-sets: the without-background sets, or the with-background ones under
    --seg-w-background; those absent under the root are skipped (here all but VOC's)."""
    common = ["--checkpoint", voc_root["ckpt"], "--model-config", voc_root["cfg_json"],
              "--segmentation-root", voc_root["root"]]
    out = tmp_path / "r.json"
    assert _cli(*common, "--seg-w-background", "--output", out) == 0
    with_bg = set(json.loads(out.read_text())["datasets"])
    assert with_bg == {"voc21"} and with_bg <= set(SEG_SETS_WITH_BACKGROUND)
    assert "skipping segmentation set context60" in caplog.text
    assert _cli(*common, "--output", out) == 0
    assert set(json.loads(out.read_text())["datasets"]) == {"voc20"} and "voc20" in SEG_SETS_WITHOUT_BACKGROUND
    # segmentation beside retrieval on the held-out shards: one report
    shards = write_demo_data(tmp_path / "demo", n_train=1, n_val=4, samples_per_shard=4, image_size=40)
    assert _cli(*common, "--segmentation-sets", "voc21", "--val-shards", shards["val"], "--output", out) == 0
    both = json.loads(out.read_text())["datasets"]
    assert set(both) == {"voc21", "val_shards"} and "i2t_r1" in both["val_shards"] and "mIoU" in both["voc21"]


def test_eval_cli_segmentation_errors(voc_root, tmp_path, capsys):
    ck = ["--checkpoint", voc_root["ckpt"], "--model-config", voc_root["cfg_json"]]
    root = ["--segmentation-root", voc_root["root"]]
    assert _cli(*ck, *root, "--segmentation-sets", "voc21,pascal") == 2
    assert "pascal" in capsys.readouterr().err
    assert _cli(*ck, *root, "--segmentation-sets", "voc21", "--seg-w-background") == 2
    assert "not both" in capsys.readouterr().err
    assert _cli(*ck, "--retrieval-root", tmp_path, "--segmentation-sets", "voc21") == 2
    assert "--segmentation-root" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _cli(*ck, "--segmentation-root", empty, "--segmentation-sets", "voc21") == 2   # named: must exist
    assert str(empty) in capsys.readouterr().err
    assert _cli(*ck, "--segmentation-root", empty) == 2                                   # defaults: none found
    assert "none of the without-background sets" in capsys.readouterr().err


# ------------------------------------------------------------------------------ distributed
def _rank_worker(rank, world, init_file, voc, class_file, out_dir):
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        seg_set = voc_layout_set(voc, "voc21", class_file, SegSettings(short_side=64, slide_crop=32, slide_stride=16))
        calls = {"windows": 0}
        model = tiny_model(1)
        model.visual.conv1.register_forward_hook(          # the patch embedding: every window passes it
            lambda m, i, o: calls.__setitem__("windows", calls["windows"] + i[0].shape[0]))
        res = eval_cli.evaluate_segmentation_sets({"teacher": model}, [seg_set])      # distributed=None: auto
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"results": res, **calls}))
    finally:
        dist.destroy_process_group()


def test_two_rank_gloo_segmentation_equals_single_process(voc_root, tmp_path):
    """Every rank segments its shard of the images and the confusion matrices are summed: both ranks
    return the single-process results."""
    import torch.multiprocessing as mp

    from cosmos_fast.eval.seg_datasets import class_file

    voc, cls = str(voc_root["voc"]), str(class_file("voc21"))
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), voc, cls, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["results"] == ranks[1]["results"]
    seg_set = voc_layout_set(voc, "voc21", cls, SegSettings(short_side=64, slide_crop=32, slide_stride=16))
    single = eval_cli.evaluate_segmentation_sets({"teacher": tiny_model(1)}, [seg_set], distributed=False)
    _close(ranks[0]["results"]["teacher"]["voc21"], single["teacher"]["voc21"])
    assert ranks[0]["windows"] > 0 and ranks[1]["windows"] > 0          # both ranks did part of the work
