"""``cosmos-fast eval`` and ``export`` on the project's own runs: the model read from the checkpoint's
config, run folders resolved to their newest checkpoint, absent default retrieval sets skipped,
held-out shards evaluated as training does, and errors that name the flag to pass."""
import json
import os

import numpy as np
import pytest
import torch

from cosmos_fast import cli, create_model, save_checkpoint
from cosmos_fast.config import load_config
from cosmos_fast.data.captions import Tokenizer
from cosmos_fast.data.synthetic import write_demo_data
from cosmos_fast.data.transforms import eval_transform
from cosmos_fast.eval import cli as eval_cli
from cosmos_fast.checkpointing import find_checkpoint
from cosmos_fast.eval import load_retrieval_shards
from cosmos_fast.export import export_checkpoint
from cosmos_fast.model.checkpoint import torch_load
from test_eval import TINY, brute_retrieval, write_coco, write_flickr


def run_config(**data):
    """The resolved config a tiny-cpu run stores in its checkpoints."""
    return load_config("tiny-cpu", [f"data.{k}={v}" for k, v in data.items()]).to_dict()


def tiny(seed):
    torch.manual_seed(seed)
    return create_model("tiny").eval()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A single-process run folder: epoch_1.pt, then epoch_latest.pt = epoch_2.pt (newer weights)."""
    out = tmp_path_factory.mktemp("runs") / "t1"
    ck = out / "checkpoints"
    cfg = run_config(global_size=32)
    old, new = (tiny(0), tiny(1)), (tiny(2), tiny(3))
    save_checkpoint(ck / "epoch_1.pt", *old, epoch=1, name="t1", config=cfg)
    save_checkpoint(ck / "epoch_2.pt", *new, epoch=2, name="t1", config=cfg)
    save_checkpoint(ck / "epoch_latest.pt", *new, epoch=2, name="t1", config=cfg)
    return {"dir": out, "student": new[0], "teacher": new[1]}


@pytest.fixture(scope="module")
def coco_only(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco_only")
    write_coco(root, np.random.default_rng(0))
    return root


def _eval(*argv):
    return eval_cli.main([*map(str, argv), "--device", "cpu", "--num-workers", "0", "--no-progress"])


def _err_lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


# ------------------------------------------------------------------------------ checkpoint location
def test_find_checkpoint_in_run_folders(run, tmp_path):
    latest = run["dir"] / "checkpoints" / "epoch_latest.pt"
    assert find_checkpoint(run["dir"]) == latest
    assert find_checkpoint(run["dir"] / "checkpoints") == latest
    assert find_checkpoint(latest) == latest
    ck = tmp_path / "old" / "checkpoints"            # no epoch_latest.pt: the highest epoch, numerically
    ck.mkdir(parents=True)
    for n in (2, 10, 9):
        (ck / f"epoch_{n}.pt").write_bytes(b"x")
    assert find_checkpoint(tmp_path / "old") == ck / "epoch_10.pt"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        find_checkpoint(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nope does not exist"):
        find_checkpoint(tmp_path / "nope")


# ------------------------------------------------------------------------------ eval
def test_eval_reads_the_model_and_resolution_from_a_run_folder(run, coco_only, tmp_path):
    out = tmp_path / "r.json"
    assert _eval("--checkpoint", run["dir"], "--retrieval-root", coco_only, "--batch-size", 8,
                 "--output", out) == 0
    report = json.loads(out.read_text())
    assert report["model_config"] == "tiny" and report["epoch"] == 2
    assert report["checkpoint"] == str((run["dir"] / "checkpoints" / "epoch_latest.pt").resolve())
    assert report["image_size"] == 32                # the run's data.global_size, not tiny's 64
    assert set(report["datasets"]) == {"coco"}


def test_eval_mismatch_names_the_flag(run, coco_only, tmp_path, capsys):
    cfg_json = tmp_path / "other.json"
    cfg_json.write_text(json.dumps(TINY))
    assert _eval("--checkpoint", run["dir"], "--model-config", cfg_json, "--retrieval-root", coco_only) == 2
    err = capsys.readouterr().err
    assert "does not match the model" in err and "the checkpoint records model 'tiny'; pass --model-config tiny" in err
    bare = tmp_path / "bare.pt"                       # records no model: the file-name default, then the hint
    torch.save(run["teacher"].state_dict(), bare)
    assert _eval("--checkpoint", bare, "--retrieval-root", coco_only) == 2
    assert "the file records no model; pass --model-config NAME" in capsys.readouterr().err
    assert _eval("--checkpoint", bare, "--model-config", "tiny", "--retrieval-root", coco_only,
                 "--output", tmp_path / "bare.json") == 0


def test_eval_deepspeed_tag_folder_teacher(run, coco_only, tmp_path):
    """A DeepSpeed run's `latest` tag: the teacher comes from teacher.pt, with the recorded model."""
    ck = tmp_path / "ds" / "checkpoints"
    tag = ck / "step_00000008"
    tag.mkdir(parents=True)
    torch.save({"teacher": run["teacher"].state_dict(), "epoch": 2, "step": 8, "name": "ds",
                "config": run_config()}, tag / "teacher.pt")
    (tag / "COMPLETE").write_text("{}")
    (ck / "latest").write_text("step_00000008")
    out, ref = tmp_path / "ds.json", tmp_path / "ref.json"
    assert _eval("--checkpoint", tmp_path / "ds", "--retrieval-root", coco_only, "--output", out) == 0
    assert _eval("--checkpoint", run["dir"], "--retrieval-root", coco_only, "--image-size", 64, "--output", ref) == 0
    got, want = json.loads(out.read_text()), json.loads(ref.read_text())
    assert got["model_config"] == "tiny" and got["checkpoint"] == str(tag.resolve())
    assert got["datasets"]["coco"]["t2i_r1"] == want["datasets"]["coco"]["t2i_r1"]
    assert got["datasets"]["coco"]["i2t_r5"] == want["datasets"]["coco"]["i2t_r5"]


def test_eval_skips_absent_default_sets(run, coco_only, tmp_path, capsys, caplog):
    flickr = coco_only / "flickr30k-images" / "flickr30k_val.json"
    with caplog.at_level("WARNING", logger="cosmos_fast"):
        assert _eval("--checkpoint", run["dir"], "--retrieval-root", coco_only, "--output", tmp_path / "a.json") == 0
    assert "skipping retrieval set flickr30k" in caplog.text and str(flickr) in caplog.text
    assert set(json.loads((tmp_path / "a.json").read_text())["datasets"]) == {"coco"}
    capsys.readouterr()
    # asked for by name: the missing file is the error
    assert _eval("--checkpoint", run["dir"], "--retrieval-root", coco_only, "--retrieval-sets", "coco,flickr30k") == 2
    lines = _err_lines(capsys)
    assert len(lines) == 1 and str(flickr) in lines[0]
    # none of the sets there: an error naming every missing file
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _eval("--checkpoint", run["dir"], "--retrieval-root", empty) == 2
    err = capsys.readouterr().err
    assert str(empty / "coco" / "annotations" / "captions_val2017.json") in err
    assert str(empty / "flickr30k-images" / "flickr30k_val.json") in err


def test_eval_skipping_keeps_existing_flickr(run, tmp_path):
    root = tmp_path / "flickr_only"
    write_flickr(root, np.random.default_rng(1), "flickr30k_val.json", 4, 1000)
    out = tmp_path / "f.json"
    assert _eval("--checkpoint", run["dir"], "--retrieval-root", root, "--output", out) == 0
    assert set(json.loads(out.read_text())["datasets"]) == {"flickr30k"}


def test_eval_val_shards_equal_training_evaluation(run, tmp_path, capsys):
    patterns = write_demo_data(tmp_path / "data", n_train=8, n_val=24, samples_per_shard=8, image_size=48)
    out = tmp_path / "v.json"
    assert _eval("--checkpoint", run["dir"], "--model", "both", "--val-shards", patterns["val"],
                 "--batch-size", 7, "--output", out) == 0
    report = json.loads(out.read_text())
    images, captions, owner = load_retrieval_shards(sorted(str(p) for p in (tmp_path / "data").glob("val-*.tar")))
    tf = eval_transform(32)                                   # data.global_size of the run
    x = torch.stack([tf(im) for im in images])
    tokens = Tokenizer("ViT-B-16", 77)(captions)
    for name in ("student", "teacher"):
        with torch.no_grad():
            img, txt = run[name].encode_image(x).double().numpy(), run[name].encode_text(tokens).double().numpy()
        want = brute_retrieval(img, txt, owner.tolist())
        got = report["models"][name]["datasets"]["val_shards"]
        assert (got["n_images"], got["n_texts"]) == (24, len(captions))
        for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "t2i_r10", "i2t_mean_rank", "t2i_mean_rank"):
            assert got[k] == pytest.approx(want[k], abs=1e-9), (name, k)
    # a pattern naming files that do not exist: one line naming the pattern and the count
    capsys.readouterr()
    bad = str(tmp_path / "data" / "val-{000000..000005}.tar")
    assert _eval("--checkpoint", run["dir"], "--val-shards", bad) == 2
    lines = _err_lines(capsys)
    assert len(lines) == 1 and bad in lines[0] and "3 of 6 shard files exist" in lines[0]


def test_num_workers_default_follows_the_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert eval_cli.default_num_workers() == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert eval_cli.default_num_workers() == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5}, raising=False)
    parser = eval_cli._add_eval_args(__import__("argparse").ArgumentParser())
    assert parser.parse_args([]).num_workers == 1


# ------------------------------------------------------------------------------ export
def test_export_run_folder(run, tmp_path, capsys):
    for source in (run["dir"], run["dir"] / "checkpoints"):
        out = tmp_path / f"{source.name}.pt"
        assert cli.main(["export", "--checkpoint", str(source), "--output", str(out)]) == 0
        body = torch_load(out)
        assert body["epoch"] == 2                      # epoch_latest.pt, not epoch_1.pt
        sd = run["teacher"].state_dict()
        assert all(torch.equal(body["teacher"][k], v.float()) for k, v in sd.items())
    assert export_checkpoint(run["dir"] / "checkpoints" / "epoch_1.pt", tmp_path / "e1.pt") == tmp_path / "e1.pt"
    assert torch_load(tmp_path / "e1.pt")["epoch"] == 1


def test_export_errors_name_the_fix_once(run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["export", "--checkpoint", str(tmp_path / "empty"), "--output", str(tmp_path / "o.pt")]) == 2
    lines = _err_lines(capsys)
    assert len(lines) == 1 and lines[0].count("export:") == 1 and "holds no checkpoint" in lines[0]
    assert cli.main(["export", "--checkpoint", str(run["dir"]), "--model-name", "ViT-B-32",
                     "--output", str(tmp_path / "o.pt")]) == 2
    assert "the checkpoint records model 'tiny'; pass --model-name tiny" in capsys.readouterr().err
    bare = tmp_path / "bare.pt"
    torch.save(run["teacher"].state_dict(), bare)
    assert cli.main(["export", "--checkpoint", str(bare), "--output", str(tmp_path / "o.pt")]) == 2
    lines = _err_lines(capsys)
    assert len(lines) == 1 and lines[0].count("export:") == 1 and "pass --model-name NAME" in lines[0]
    assert not (tmp_path / "o.pt").exists()
