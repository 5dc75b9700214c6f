"""Zero-shot evaluation (cosmos_method.md §6): data-set readers in the official layouts, retrieval
and classification metrics against brute-force numpy loops, the multiple-captions rule, checkpoint
and Hugging Face cache loading, the CLI, and 2-rank gloo evaluation equal to one process."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cosmos_fast import create_model, save_checkpoint
from cosmos_fast.data.captions import Tokenizer
from cosmos_fast.data.transforms import eval_transform
from cosmos_fast.eval import (AnnotationError, dense_features, evaluate_model, evaluate_models, load_imagenet,
                              load_retrieval_set, load_retrieval_shards, load_sun397, log_to_tensorboard,
                              retrieval_metrics)
from cosmos_fast.eval import cli as eval_cli
from cosmos_fast.eval.datasets import SUN397_TEMPLATES
from cosmos_fast.eval.sharding import Shards
from cosmos_fast.eval.zeroshot import build_zero_shot_classifier, class_prompts

REPO = Path(__file__).resolve().parents[1]
TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 32, "layers": 1, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331", "n01498041"]
NAMES = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead shark", "electric ray", "stingray"]
WORDS = "a photo of the red blue green dog cat car tree house on grass with near small big old".split()


def tiny_model(seed: int):
    torch.manual_seed(seed)
    return create_model(TINY).eval()


def _jpeg(path: Path, rng, size=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = size or (int(rng.integers(32, 60)), int(rng.integers(32, 60)))
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=95)


def _captions(rng, n):
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 9)))) for _ in range(n)]


def write_coco(root: Path, rng, caps_per_image=(7, 5, 1, 5, 6, 5, 3)):
    """val2017 layout; one listed image has no caption; annotations interleave images."""
    ids = [101 + i for i in range(len(caps_per_image) + 1)]
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "height": 1, "width": 1} for i in ids]
    anns = [{"image_id": ids[k], "id": 0, "caption": c}
            for k, n in enumerate(caps_per_image) for c in _captions(rng, n)]
    anns = [anns[i] for i in rng.permutation(len(anns))]
    for n, a in enumerate(anns):
        a["id"] = 1000 + n
    for rec in images:
        _jpeg(root / "coco" / "images" / "val2017" / rec["file_name"], rng)
    (root / "coco" / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "coco" / "annotations" / "captions_val2017.json").write_text(
        json.dumps({"info": {}, "images": images, "annotations": anns}))
    return anns, {rec["id"]: rec["file_name"] for rec in images}


def write_flickr(root: Path, rng, name: str, n_images: int, first_id: int):
    entries = []
    for i in range(n_images):
        image = f"flickr30k-images/{first_id + i}.jpg"
        _jpeg(root / image, rng)
        entries.append({"image": image, "caption": _captions(rng, 5)})
    (root / "flickr30k-images" / name).write_text(json.dumps(entries))
    return entries


def write_imagenet(root: Path, rng, per_class=2):
    for k, wnid in enumerate(WNIDS):
        for j in range(per_class):
            _jpeg(root / "val_images" / wnid / f"ILSVRC2012_val_{k:04d}{j}.JPEG", rng)
    (root / "classnames.txt").write_text("\n".join(NAMES) + "\n")
    return root / "classnames.txt"


def write_sun397(root: Path, rng):
    classes = ["/a/abbey", "/a/apartment_building/outdoor", "/b/bedroom"]
    base = root / "SUN397"
    for k, c in enumerate(classes):
        for j in range(2 + k):
            _jpeg(base.joinpath(*c.strip("/").split("/")) / f"sun_{k}{j}.jpg", rng)
    base.mkdir(parents=True, exist_ok=True)
    (base / "ClassName.txt").write_text("\n".join(classes) + "\n")
    return classes


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("eval_data")
    ret = root / "retrieval"
    coco_anns, coco_files = write_coco(ret, rng)
    karpathy = []
    for i in range(3):
        image = f"val2014/COCO_val2014_{i:012d}.jpg"
        _jpeg(ret / "coco" / "images" / image, rng)
        karpathy.append({"image": image, "caption": _captions(rng, 5)})
    (ret / "coco" / "annotations" / "coco_karpathy_test.json").write_text(json.dumps(karpathy))
    flickr_val = write_flickr(ret, rng, "flickr30k_val.json", 5, 1000)
    flickr_test = write_flickr(ret, rng, "flickr30k_test.json", 4, 2000)
    classnames = write_imagenet(root / "imagenet", rng)
    sun_classes = write_sun397(root / "sun", rng)
    cfg_json = root / "tiny.json"
    cfg_json.write_text(json.dumps(TINY))
    return {"root": root, "retrieval": ret, "coco_anns": coco_anns, "coco_files": coco_files,
            "karpathy": karpathy, "flickr_val": flickr_val, "flickr_test": flickr_test,
            "imagenet": root / "imagenet", "classnames": classnames, "sun": root / "sun",
            "sun_classes": sun_classes, "cfg_json": cfg_json}


@pytest.fixture(scope="module")
def student():
    return tiny_model(0)


@pytest.fixture(scope="module")
def teacher():
    return tiny_model(1)


# ------------------------------------------------------------------------------ brute force
@torch.no_grad()
def encode_files(model, paths, size=32):
    tf = eval_transform(size)
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])
    return model.encode_image(x).double().numpy()


@torch.no_grad()
def encode_captions(model, captions):
    return model.encode_text(Tokenizer("ViT-B-16")(captions)).double().numpy()


def brute_retrieval(img, txt, owner):
    """Sort every row / column; i2t rank = best position among the image's captions."""
    s = img @ txt.T
    i2t = []
    for i in range(s.shape[0]):
        order = list(np.argsort(-s[i], kind="stable"))
        i2t.append(min(order.index(j) for j in range(s.shape[1]) if owner[j] == i))
    t2i = []
    for j in range(s.shape[1]):
        order = list(np.argsort(-s[:, j], kind="stable"))
        t2i.append(order.index(owner[j]))
    out = {}
    for k in (1, 5, 10):
        out[f"i2t_r{k}"] = sum(r < k for r in i2t) / len(i2t)
        out[f"t2i_r{k}"] = sum(r < k for r in t2i) / len(t2i)
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        out[f"{name}_mean_rank"] = float(np.mean(ranks)) + 1
        out[f"{name}_median_rank"] = float(np.floor(np.median(ranks))) + 1
    out["n_images"], out["n_texts"] = s.shape[0], s.shape[1]
    return out


def brute_classifier(model, classnames, templates):
    """(C, D): per class, normalise each prompt embedding, average, normalise."""
    w = []
    for c in classnames:
        prompts = [t(c) if callable(t) else t.format(c) for t in templates]
        e = encode_captions(model, prompts)
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        m = e.mean(axis=0)
        w.append(m / np.linalg.norm(m))
    return np.stack(w)


def brute_classification(model, img, labels, classnames, templates):
    logits = 100.0 * img @ brute_classifier(model, classnames, templates).T
    top1 = top5 = 0
    for n, y in enumerate(labels):
        rank = sum(logits[n, c] > logits[n, y] for c in range(len(classnames)))
        top1 += rank < 1
        top5 += rank < 5
    return {"top1": top1 / len(labels), "top5": top5 / len(labels), "n_images": len(labels),
            "n_classes": len(classnames)}


def coco_truth(data):
    """(image paths sorted by name, captions, owner) read straight from the generated JSON."""
    files = data["coco_files"]
    used = sorted({files[a["image_id"]] for a in data["coco_anns"]})
    paths = [data["retrieval"] / "coco" / "images" / "val2017" / f for f in used]
    owner = [used.index(files[a["image_id"]]) for a in data["coco_anns"]]
    return paths, [a["caption"] for a in data["coco_anns"]], owner


def flat_truth(root, entries):
    paths = [root / e["image"] for e in entries]
    caps = [c for e in entries for c in e["caption"]]
    owner = [i for i, e in enumerate(entries) for _ in e["caption"]]
    return paths, caps, owner


def assert_metrics(got: dict, want: dict):
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-9), (k, got[k], v)


# ------------------------------------------------------------------------------ metrics
def test_retrieval_metrics_equal_brute_force():
    g = torch.Generator().manual_seed(3)
    n_caps = [5, 1, 7, 3, 5, 2, 6, 5, 4]
    owner = torch.tensor([i for i, n in enumerate(n_caps) for _ in range(n)])
    owner = owner[torch.randperm(len(owner), generator=g)]
    img = torch.nn.functional.normalize(torch.randn(len(n_caps), 16, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(len(owner), 16, generator=g), dim=-1)
    want = brute_retrieval(img.double().numpy(), txt.double().numpy(), owner.tolist())
    assert 0 < want["i2t_r1"] < 1 and 0 < want["t2i_r1"] < 1         # a non-trivial case
    for chunk in (1024, 4):                                              # one block and several
        assert_metrics(retrieval_metrics(img, txt, owner, chunk=chunk), want)


def test_multiple_captions_rule():
    """Image 0's first caption ranks last but its second is the top hit: i2t counts the best one."""
    img = torch.eye(3)
    txt = torch.nn.functional.normalize(torch.tensor(
        [[0., 0., 1.], [1., 0., 0.], [0., 1., 0.], [0.6, 0., 0.8]]), dim=-1)
    owner = torch.tensor([0, 0, 1, 2])
    m = retrieval_metrics(img, txt, owner)
    # i2t ranks: image 0 -> caption 1 at 0; image 1 -> 0; image 2 -> caption 3 behind caption 0: 1
    assert m["i2t_r1"] == pytest.approx(2 / 3) and m["i2t_r5"] == 1.0
    assert m["i2t_mean_rank"] == pytest.approx(4 / 3)
    # t2i ranks: caption 0 -> image 0 behind image 2: 1; the others 0
    assert m["t2i_r1"] == pytest.approx(3 / 4) and m["t2i_mean_rank"] == pytest.approx(1.25)
    assert (m["n_images"], m["n_texts"]) == (3, 4)
    with pytest.raises(ValueError, match="at least one caption"):
        retrieval_metrics(img, txt[:3], owner[:3] * 0)


# ------------------------------------------------------------------------------ readers
def test_coco_official_reader(data):
    ds = load_retrieval_set("coco", data["retrieval"], "official")
    anns, files = data["coco_anns"], data["coco_files"]
    first_seen = list(dict.fromkeys(files[a["image_id"]] for a in anns))
    assert [p.name for p in ds.image_paths] == first_seen                 # order of first appearance
    assert ds.n_images == 7 and ds.n_texts == len(anns) == 32            # the captionless image is out
    assert ds.captions == [a["caption"] for a in anns]                   # file order
    assert [ds.image_paths[i].name for i in ds.text_to_image] == [files[a["image_id"]] for a in anns]
    assert ds.annotation == data["retrieval"] / "coco" / "annotations" / "captions_val2017.json"


def test_karpathy_and_flickr_readers(data, tmp_path):
    ret = data["retrieval"]
    kp = load_retrieval_set("coco", ret, "karpathy")
    assert kp.n_images == 3 and kp.n_texts == 15 and kp.split == "karpathy"
    assert kp.image_paths[0] == ret / "coco" / "images" / data["karpathy"][0]["image"]
    for split, entries in (("official", data["flickr_val"]), ("karpathy", data["flickr_test"])):
        ds = load_retrieval_set("flickr30k", ret, split)
        paths, caps, owner = flat_truth(ret, entries)
        assert ds.image_paths == paths and ds.captions == caps and ds.text_to_image.tolist() == owner
        assert ds.annotation.name == ("flickr30k_val.json" if split == "official" else "flickr30k_test.json")
    # Karpathy's own dataset_coco.json (only split == "test" entries)
    rng = np.random.default_rng(1)
    images = []
    for i, split in enumerate(["test", "val", "test"]):
        _jpeg(tmp_path / "coco" / "images" / "val2014" / f"x{i}.jpg", rng)
        images.append({"filepath": "val2014", "filename": f"x{i}.jpg", "split": split,
                       "sentences": [{"raw": c} for c in _captions(rng, 5)]})
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    (tmp_path / "coco" / "annotations" / "dataset_coco.json").write_text(json.dumps({"images": images}))
    ds = load_retrieval_set("coco", tmp_path, "karpathy")
    assert [p.name for p in ds.image_paths] == ["x0.jpg", "x2.jpg"] and ds.n_texts == 10


def test_imagenet_and_sun397_readers(data):
    ds = load_imagenet(data["imagenet"], data["classnames"])          # the folder holding val_images/
    assert ds.classnames == NAMES and len(ds.templates) == 80 and ds.n_images == 14
    assert [p.parent.name for p in ds.image_paths] == [WNIDS[y] for y in ds.labels.tolist()]
    assert load_imagenet(data["imagenet"] / "val_images", dict(zip(WNIDS, NAMES))).classnames == NAMES
    sun = load_sun397(data["sun"])
    assert sun.classnames == ["abbey", "apartment building outdoor", "bedroom"]
    assert sun.n_images == 9 and tuple(sun.templates) == SUN397_TEMPLATES
    a, b = load_sun397(data["sun"], seed=0, n_test=4), load_sun397(data["sun"], seed=0, n_test=4)
    assert a.image_paths == b.image_paths and a.n_images == 4          # the documented seeded split
    assert set(a.image_paths) <= set(sun.image_paths) and "seed 0" in a.split
    others = {tuple(load_sun397(data["sun"], seed=s, n_test=4).image_paths) for s in range(1, 6)}
    assert others - {tuple(a.image_paths)}                              # the seed matters


def test_imagenet_1000_folders_use_open_clip_classnames(tmp_path):
    from open_clip import IMAGENET_CLASSNAMES

    png = tmp_path / "one.png"
    Image.new("RGB", (2, 2)).save(png)
    body = png.read_bytes()
    wnids = [f"n{i:08d}" for i in range(1000)][::-1]                    # created out of order
    for w in wnids:
        (tmp_path / "val_images" / w).mkdir(parents=True)
        (tmp_path / "val_images" / w / "x.png").write_bytes(body)
    ds = load_imagenet(tmp_path)
    assert ds.classnames == list(IMAGENET_CLASSNAMES) and ds.n_images == 1000
    assert [p.parent.name for p in ds.image_paths] == sorted(wnids)     # folders sort by wnid
    assert ds.labels.tolist() == list(range(1000))


def _break(root: Path, rel: str, content):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


GOOD_IMAGES = [{"id": 1, "file_name": "a.jpg"}]
ERROR_CASES = {
    "coco_missing": ("coco", None, None, FileNotFoundError, "captions_val2017.json"),
    "coco_not_json": ("coco", "coco/annotations/captions_val2017.json", "{oops", AnnotationError, "not valid JSON"),
    "coco_no_annotations": ("coco", "coco/annotations/captions_val2017.json", {"images": GOOD_IMAGES},
                            AnnotationError, "no field 'annotations'"),
    "coco_no_caption": ("coco", "coco/annotations/captions_val2017.json",
                        {"images": GOOD_IMAGES, "annotations": [{"image_id": 1, "caption": "x"}, {"image_id": 1}]},
                        AnnotationError, "annotations[1] has no field 'caption'"),
    "coco_unknown_image": ("coco", "coco/annotations/captions_val2017.json",
                           {"images": GOOD_IMAGES, "annotations": [{"image_id": 999, "caption": "x"}]},
                           AnnotationError, "image_id 999"),
    "coco_missing_image": ("coco", "coco/annotations/captions_val2017.json",
                           {"images": GOOD_IMAGES, "annotations": [{"image_id": 1, "caption": "x"}]},
                           FileNotFoundError, "val2017/a.jpg"),
    "flickr_missing": ("flickr30k", None, None, FileNotFoundError, "flickr30k_val.json"),
    "flickr_not_list": ("flickr30k", "flickr30k-images/flickr30k_val.json", {"image": "x"},
                        AnnotationError, "expected a list"),
    "flickr_no_caption": ("flickr30k", "flickr30k-images/flickr30k_val.json", [{"image": "flickr30k-images/1.jpg"}],
                          AnnotationError, "entry #0 has no field 'caption'"),
    "flickr_bad_caption": ("flickr30k", "flickr30k-images/flickr30k_val.json",
                           [{"image": "flickr30k-images/1.jpg", "caption": [1, 2]}], AnnotationError, "'caption'"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES), ids=list(ERROR_CASES))
def test_annotation_errors_are_clear(tmp_path, case):
    name, rel, content, exc, text = ERROR_CASES[case]
    (tmp_path / "coco").mkdir()
    path = _break(tmp_path, rel, content) if rel else None
    with pytest.raises(exc) as info:
        load_retrieval_set(name, tmp_path, "official")
    msg = str(info.value)
    assert text in msg
    if path is not None and exc is AnnotationError:
        assert str(path) in msg                                          # names the file


def test_classification_and_split_errors(data, tmp_path):
    with pytest.raises(ValueError, match="imagenet-classnames"):     # 7 folders, no names given
        load_imagenet(data["imagenet"])
    bad = _break(tmp_path, "names.txt", "tench\ngoldfish\n")
    with pytest.raises(AnnotationError, match="2 class names for 7 class folders") as info:
        load_imagenet(data["imagenet"], bad)
    assert str(bad) in str(info.value)
    with pytest.raises(FileNotFoundError, match="ClassName.txt"):
        load_sun397(tmp_path)
    with pytest.raises(FileNotFoundError, match="coco_karpathy_test.json.*dataset_coco.json"):
        load_retrieval_set("coco", tmp_path, "karpathy")
    with pytest.raises(ValueError, match="unknown retrieval split"):
        load_retrieval_set("coco", data["retrieval"], "test2014")


# ------------------------------------------------------------------------------ evaluation
@pytest.fixture(scope="module")
def student_results(data, student):
    return evaluate_model(student, retrieval_root=data["retrieval"], imagenet_val=data["imagenet"],
                          imagenet_classnames=data["classnames"], sun397_root=data["sun"], batch_size=3,
                          progress=False)


def test_evaluate_model_equals_brute_force(data, student, student_results):
    res = student_results
    assert set(res) == {"coco", "flickr30k", "imagenet", "sun397"}
    for name, (paths, caps, owner) in {"coco": coco_truth(data),
                                       "flickr30k": flat_truth(data["retrieval"], data["flickr_val"])}.items():
        want = brute_retrieval(encode_files(student, paths), encode_captions(student, caps), owner)
        assert_metrics(res[name], want)
        assert res[name]["split"] == "official"
    assert (res["coco"]["n_images"], res["coco"]["n_texts"]) == (7, 32)
    inet = load_imagenet(data["imagenet"], data["classnames"])
    want = brute_classification(student, encode_files(student, inet.image_paths), inet.labels.tolist(),
                                NAMES, inet.templates)
    assert_metrics(res["imagenet"], want)
    assert res["imagenet"]["n_templates"] == 80
    sun = load_sun397(data["sun"])
    want = brute_classification(student, encode_files(student, sun.image_paths), sun.labels.tolist(),
                                sun.classnames, SUN397_TEMPLATES)
    assert_metrics(res["sun397"], want)


def test_image_loading_workers_give_the_same_results(data, student, student_results):
    """Two forkserver image workers (the default start method) give exactly the in-process results."""
    res = evaluate_model(student, retrieval_root=data["retrieval"], retrieval_sets=("coco",), batch_size=3,
                         num_workers=2, progress=False)
    assert res["coco"] == student_results["coco"]


def test_zero_shot_classifier_equals_brute_force(teacher):
    from open_clip import OPENAI_IMAGENET_TEMPLATES

    w = build_zero_shot_classifier(teacher, NAMES[:4], OPENAI_IMAGENET_TEMPLATES, batch_size=100)
    assert w.shape == (32, 4)                                            # D × C, 2 classes per forward
    want = brute_classifier(teacher, NAMES[:4], OPENAI_IMAGENET_TEMPLATES)
    assert np.allclose(w.T.double().numpy(), want, atol=1e-5)
    assert class_prompts(["tench"], OPENAI_IMAGENET_TEMPLATES)[0][0] == "a bad photo of a tench."
    assert len(OPENAI_IMAGENET_TEMPLATES) == 80


def test_karpathy_split_and_two_models_share_one_pass(data, student, teacher):
    res = evaluate_models({"student": student, "teacher": teacher}, retrieval_root=data["retrieval"],
                          split="karpathy", batch_size=4, progress=False)
    for name, model in (("student", student), ("teacher", teacher)):
        for ds_name, root_entries in (("coco", (data["retrieval"] / "coco" / "images", data["karpathy"])),
                                      ("flickr30k", (data["retrieval"], data["flickr_test"]))):
            paths, caps, owner = flat_truth(*root_entries)
            want = brute_retrieval(encode_files(model, paths), encode_captions(model, caps), owner)
            assert_metrics(res[name][ds_name], want)
            assert res[name][ds_name]["split"] == "karpathy"
    assert student.training is False and teacher.training is False


def test_training_mode_is_restored(data):
    model = tiny_model(0).train()
    evaluate_model(model, retrieval_root=data["retrieval"], retrieval_sets=("flickr30k",), progress=False)
    assert model.training


def test_autocast_bf16_path(data, student):
    res = evaluate_model(student, retrieval_root=data["retrieval"], retrieval_sets=("flickr30k",),
                         autocast_dtype=torch.bfloat16, batch_size=4, progress=False)["flickr30k"]
    assert (res["n_images"], res["n_texts"]) == (5, 25)
    assert all(0.0 <= res[f"{d}_r{k}"] <= 1.0 for d in ("i2t", "t2i") for k in (1, 5, 10))


def test_tensorboard_scalars(student_results):
    calls = []

    class Writer:
        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

    log_to_tensorboard(Writer(), {"teacher": student_results}, step=7)
    tags = {t: v for t, v, s in calls}
    assert tags["eval/teacher/coco/i2t_r1"] == student_results["coco"]["i2t_r1"]
    assert tags["eval/teacher/imagenet/top5"] == student_results["imagenet"]["top5"]
    assert all(s == 7 for _, _, s in calls) and not any("/n_" in t for t in tags)


# ------------------------------------------------------------------------------ checkpoints & CLI
def _cli(*argv):
    return eval_cli.main([*map(str, argv), "--device", "cpu", "--num-workers", "0", "--no-progress"])


def test_cli_student_teacher_selection(data, student, teacher, student_results, tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "epoch_1.pt", student, teacher, epoch=1)
    models, meta = eval_cli.load_models(ckpt, TINY, ("student", "teacher"))
    for name, ref in (("student", student), ("teacher", teacher)):
        sd = models[name].state_dict()
        assert all(torch.equal(sd[k], v) for k, v in ref.state_dict().items())
    assert meta["epoch"] == 1
    common = ["--model-config", data["cfg_json"], "--retrieval-root", data["retrieval"],
              "--imagenet-val", data["imagenet"], "--imagenet-classnames", data["classnames"], "--batch-size", 4]
    out = tmp_path / "both.json"
    assert _cli("--checkpoint", ckpt, "--model", "both", *common, "--output", out) == 0
    report = json.loads(out.read_text())
    assert report["model"] == "both" and report["epoch"] == 1 and report["checkpoint"] == str(ckpt.resolve())
    want_teacher = evaluate_model(teacher, retrieval_root=data["retrieval"], imagenet_val=data["imagenet"],
                                  imagenet_classnames=data["classnames"], progress=False)
    for name, want in (("student", student_results), ("teacher", want_teacher)):
        got = report["models"][name]["datasets"]
        assert set(got) == {"coco", "flickr30k", "imagenet"}
        for ds_name in got:
            assert_metrics(got[ds_name], {k: v for k, v in want[ds_name].items() if k not in ("annotation", "root")})
    out = tmp_path / "student.json"
    assert _cli("--checkpoint", ckpt, "--model", "student", *common, "--retrieval-sets", "coco", "--output", out) == 0
    report = json.loads(out.read_text())
    assert report["model"] == "student" and set(report["datasets"]) == {"coco", "imagenet"}
    assert_metrics(report["datasets"]["coco"], {k: v for k, v in student_results["coco"].items() if k != "annotation"})
    assert "i2t R@1/5/10" in capsys.readouterr().out
    # a single-model file (bare state dict) is evaluated once, as "model"
    bare = tmp_path / "bare.pt"
    torch.save(teacher.state_dict(), bare)
    assert _cli("--checkpoint", bare, "--model", "both", *common, "--output", tmp_path / "bare.json") == 0
    bare_report = json.loads((tmp_path / "bare.json").read_text())
    assert bare_report["model"] == "model" and bare_report["epoch"] is None
    assert_metrics(bare_report["datasets"]["coco"],
                   {k: v for k, v in want_teacher["coco"].items() if k != "annotation"})


def test_cli_errors(data, student, teacher, tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "c.pt", student, teacher, epoch=2)
    assert _cli("--checkpoint", ckpt, "--model-config", data["cfg_json"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert _cli("--checkpoint", ckpt, "--model-config", "tiny", "--retrieval-root", data["retrieval"]) == 2
    assert "does not match the model" in capsys.readouterr().err        # wrong architecture
    assert _cli("--checkpoint", tmp_path / "nope.pt", "--retrieval-root", data["retrieval"]) == 2
    assert "nope.pt does not exist" in capsys.readouterr().err
    assert _cli("--checkpoint", ckpt, "--huggingface-repo-name", "sankim2/cosmos", "--huggingface-model-name",
                "x.pt", "--retrieval-root", data["retrieval"]) == 2
    assert "not both" in capsys.readouterr().err
    empty = tmp_path / "empty_root"
    empty.mkdir()
    assert _cli("--checkpoint", ckpt, "--model-config", data["cfg_json"], "--retrieval-root", empty) == 2
    assert str(empty / "coco" / "annotations" / "captions_val2017.json") in capsys.readouterr().err


def test_add_eval_parser_wires_run_eval():
    parser = argparse.ArgumentParser(prog="cosmos-fast")
    eval_cli.add_eval_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--checkpoint", "x.pt", "--imagenet-val", "d"])
    assert args.func is eval_cli.run_eval
    assert (args.model, args.retrieval_split, args.retrieval_sets, args.batch_size) == \
        ("teacher", "official", None, 256)           # None: every set whose annotation file exists
    assert eval_cli.model_config_and_label(None, "cosmos_vitb32_cc3m.pt") == ("ViT-B-32", "ViT-B-32")
    assert eval_cli.model_config_and_label(None, "cosmos_vitb16_cc3m.pt") == ("ViT-B-16", "ViT-B-16")


def build_hub_cache(cache: Path, repo: str, filename: str, source: Path, rev: str = "a" * 40) -> Path:
    """The layout hf_hub_download reads: models--org--name/{refs/main, snapshots/<rev>/<file>}."""
    base = cache / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(rev)
    target = base / "snapshots" / rev / filename
    target.parent.mkdir(parents=True)
    target.write_bytes(source.read_bytes())
    return target


def test_huggingface_offline_cache(data, student, teacher, tmp_path, monkeypatch):
    ckpt = save_checkpoint(tmp_path / "src.pt", student, teacher, epoch=3)
    cache = tmp_path / "hf" / "hub"
    target = build_hub_cache(cache, "sankim2/cosmos", "cosmos_tiny.pt", ckpt)
    # in process: the environment is read at call time
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    path, info = eval_cli.resolve_checkpoint(None, "sankim2/cosmos", "cosmos_tiny.pt")
    assert path.resolve() == target.resolve() and info["repo"] == "sankim2/cosmos"
    with pytest.raises(eval_cli.CheckpointSourceError, match="cosmos_vitb16_cc3m.pt.*sankim2/cosmos.*offline"):
        eval_cli.resolve_checkpoint(None, "sankim2/cosmos", "cosmos_vitb16_cc3m.pt")
    # end to end in a fresh interpreter, so huggingface_hub sees HF_HUB_OFFLINE at import
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "nohome"),
           "PYTHONPATH": str(REPO)}
    out = tmp_path / "hf.json"
    cmd = [sys.executable, "-m", "cosmos_fast.eval.cli", "--huggingface-repo-name", "sankim2/cosmos",
           "--huggingface-model-name", "cosmos_tiny.pt", "--model-config", str(data["cfg_json"]),
           "--retrieval-root", str(data["retrieval"]), "--retrieval-sets", "flickr30k", "--device", "cpu",
           "--num-workers", "0", "--no-progress", "--output", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["source"] == "huggingface" and report["model"] == "teacher" and report["epoch"] == 3
    assert Path(report["checkpoint"]) == target.resolve()
    want = evaluate_model(teacher, retrieval_root=data["retrieval"], retrieval_sets=("flickr30k",), progress=False)
    assert_metrics(report["datasets"]["flickr30k"],
                   {k: v for k, v in want["flickr30k"].items() if k != "annotation"})


# ------------------------------------------------------------------------------ distributed
def _rank_worker(rank, world, init_file, kwargs, out_dir, zero3):
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))       # a deadlock fails, not hangs
    try:
        model = tiny_model(0)
        counts = {"images": 0, "image_calls": 0, "text_calls": 0}

        def on_image(module, inputs, output):
            counts["images"] += inputs[0].shape[0]
            counts["image_calls"] += 1

        def on_text(module, inputs, output):
            counts["text_calls"] += 1

        model.visual.register_forward_hook(on_image)
        model.transformer.register_forward_hook(on_text)
        out = {"results": evaluate_model(model, **kwargs), "counts": counts}      # distributed=None: auto
        if zero3:
            import deepspeed

            ds = {"train_micro_batch_size_per_gpu": 1,
                  "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
            teacher = tiny_model(0)              # partitioned, no engine and so no fetch hooks (the teacher)
            deepspeed.zero.Init(module=teacher, config_dict_or_path=ds, dtype=torch.float32)
            out["zero3_partitioned"] = evaluate_model(teacher, **kwargs)
            with deepspeed.zero.GatheredParameters(list(teacher.parameters()), modifier_rank=None):
                out["zero3_outer_gather"] = evaluate_model(teacher, **kwargs)      # the trainer's own gather
            engine, *_ = deepspeed.initialize(model=tiny_model(0), config=ds)      # the student's engine
            out["zero3_engine"] = evaluate_model(engine, **kwargs)
            out["partitioned_after"] = teacher.text_projection.numel() == 0
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


def test_two_rank_gloo_equals_single_process(data, student, tmp_path):
    """2 ranks shard, encode and gather; both return the single-process metrics. With DeepSpeed,
    the same under ZeRO-3: a partitioned model without engine, inside an outer gather, and an
    engine (the first run on a machine compiles DeepSpeed's CPU shared-memory op, ~40 s)."""
    import torch.multiprocessing as mp

    try:
        import deepspeed  # noqa: F401
        zero3 = True
    except ImportError:
        zero3 = False
    kwargs = dict(retrieval_root=str(data["retrieval"]), imagenet_val=str(data["imagenet"]),
                  imagenet_classnames=str(data["classnames"]), batch_size=2, progress=False)
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), kwargs, str(tmp_path), zero3), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["results"] == ranks[1]["results"]                 # every rank returns the same
    single = evaluate_model(student, **kwargs)
    for name, want in single.items():
        assert_metrics(ranks[0]["results"][name], {k: v for k, v in want.items() if isinstance(v, (int, float))})
    # each rank encoded ceil(n / 2) images per set and ran as many forwards as the other (ZeRO-3 safe)
    n_images = [7, 5, 14]                                              # coco, flickr30k, imagenet
    assert ranks[0]["counts"] == ranks[1]["counts"]
    assert ranks[0]["counts"]["images"] == sum((n + 1) // 2 for n in n_images)
    if not zero3:
        pytest.skip("deepspeed is not installed: the ZeRO-3 part did not run")
    for key in ("zero3_partitioned", "zero3_outer_gather", "zero3_engine"):
        assert ranks[0][key] == ranks[1][key] == ranks[0]["results"], key
    assert ranks[0]["partitioned_after"] and ranks[1]["partitioned_after"]   # weights released again


def test_shards_cover_every_item_once():
    class Fake(Shards):
        def __init__(self, rank, world):
            self.rank, self.world, self.distributed, self.group = rank, world, True, None

    for n, world in ((7, 2), (5, 4), (2, 3), (12, 3)):
        slices = [Fake(r, world).indices(n) for r in range(world)]
        per = -(-n // world)
        assert all(len(s) == per for s in slices)
        real = [s[:max(0, min(per, n - r * per))] for r, s in enumerate(slices)]
        assert [i for s in real for i in s] == list(range(n))


# ------------------------------------------------------------------------------ dense
def test_dense_features(teacher):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        d = dense_features(teacher, x)
        _, tokens = teacher.encode_image(x, return_tokens=True)
    assert d.shape == (2, 2, 2, 32)
    assert torch.allclose(d.norm(dim=-1), torch.ones(2, 2, 2), atol=1e-5)
    want = torch.nn.functional.normalize(tokens @ teacher.visual.proj, dim=-1).reshape(2, 2, 2, 32)
    assert torch.allclose(d, want, atol=1e-6)


def test_retrieval_shards_skip_undecodable_samples(tmp_path, caplog):
    """A held-out shard with one good sample, a 200k-deep nested json and a corrupt jpg: the bad
    ones are skipped with a line naming shard and key, never a crash of the evaluation."""
    import io
    import tarfile

    good = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(good, format="JPEG")
    members = {"a.jpg": good.getvalue(), "a.json": json.dumps({"retrieval_captions": ["x", "y"]}).encode(),
               "b.jpg": good.getvalue(), "b.json": b"[" * 200_000 + b"]" * 200_000,
               "c.jpg": b"\xff\xd8 not a jpeg", "c.json": json.dumps({"retrieval_captions": ["z"]}).encode()}
    shard = tmp_path / "val.tar"
    with tarfile.open(shard, "w") as tf:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    with caplog.at_level("WARNING", logger="cosmos_fast"):
        images, captions, owner = load_retrieval_shards([str(shard)])
    assert len(images) == 1 and captions == ["x", "y"] and owner.tolist() == [0, 0]
    assert f"'b' in {shard}: bad_json" in caplog.text and f"'c' in {shard}: corrupt_image" in caplog.text
