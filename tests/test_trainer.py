"""Config presets and validation, the training loop, metrics.jsonl, non-finite handling, exact resume."""
import json
import logging

import pytest
import torch

from cosmos_fast.config import ConfigError, list_presets, load_config
from cosmos_fast.data.stream import expand_shards
from cosmos_fast.data.synthetic import write_demo_data
from cosmos_fast.model import create_model, save_checkpoint
from cosmos_fast.train import main as train_main
from cosmos_fast.trainer import NonFiniteLossError, Trainer, check_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_demo_data(tmp_path_factory.mktemp("demo"), n_train=128, n_val=32, samples_per_shard=32, seed=1)


def small_cfg(data, *extra):
    return load_config("tiny-cpu", [
        f"data.train_shards={data['train']}", f"data.val_shards={data['val']}", "data.global_size=32",
        "data.local_size=16", "data.batch_size=8", "data.train_num_samples=64", "data.num_workers=0",
        "data.shuffle_buffer=32", "data.shuffle_initial=8", "train.progress=false", "train.tensorboard=false",
        "optim.warmup=4", "optim.epochs=3", "train.save_every_steps=4", *extra])


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("preset", [p for p in list_presets() if p != "tiny-cpu"])
def test_official_presets_pass_startup_validation(preset):
    cfg = load_config(preset)
    world = cfg.data.expected_global_batch // cfg.data.batch_size
    notes = check_config(cfg, world_size=world, cuda=True)
    assert f"global batch {cfg.data.expected_global_batch}" in notes[0]
    assert cfg.optim.lr == 5e-4 and cfg.optim.weight_decay == 0.5 and cfg.optim.warmup == 2000
    assert cfg.ema.momentum == (0.999 if preset.startswith("cc3m") else 0.99)
    assert len(expand_shards(cfg.data.train_shards)) >= cfg.data.num_workers * world


def test_merged30m_shard_count():
    cfg = load_config("merged30m-vitb16")
    assert len(expand_shards(cfg.data.train_shards)) == 6388


def test_unofficial_world_size_is_a_contradiction():
    cfg = load_config("cc3m-vitb16")
    with pytest.raises(ConfigError, match="expected_global_batch = 1024"):
        check_config(cfg, world_size=8, cuda=True)
    cfg = load_config("pixelprose-vitb16", ["data.num_workers=16"])
    with pytest.raises(ConfigError, match="1700 shards"):
        check_config(cfg, world_size=128, cuda=True)


@pytest.mark.parametrize("override,match", [
    ("data.batch_sise=4", "unknown config field 'data.batch_sise' \\(did you mean 'batch_size'\\?\\)"),
    ("optm.lr=1", "unknown config section 'optm'"),
    ("optim.lr=fast", "optim.lr expects float"),
    ("train.progress=3", "train.progress expects bool"),
    ("nodots=1", "section.key"),
])
def test_config_typos_rejected_by_name(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("tiny-cpu", [override])


def test_yaml_file_typo_rejected(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("data:\n  batch_size: 4\n  num_wrkers: 2\n")
    with pytest.raises(ConfigError, match="data.num_wrkers.*num_workers"):
        load_config(str(p))


@pytest.mark.parametrize("override,match", [
    ("data.crop_scale=1.5", "crop_scale"), ("ema.order=sometimes", "ema.order"),
    ("train.precision=amp_fp16", "needs CUDA"), ("data.local_size=20", "multiple of the patch size"),
    ("data.batch_size=0", "data.batch_size = 0 must be >= 1"), ("data.num_workers=9", "every worker needs a shard"),
    ("data.worker_start=thread", "data.worker_start"), ("model.pool_impl=fast", "model.pool_impl"),
    ("model.loss_impl=tiled", "model.loss_impl"), ("data.augment=simd", "data.augment"),
    ("model.loss_operands=fp16", "model.loss_operands"), ("model.loss_workspace_mb=0", "model.loss_workspace_mb = 0 must be >= 1"),
    ("data.augment=pil", "data.augment = 'pil' was renamed to 'torchvision'"),       # the old name
])
def test_bad_values_rejected_at_start(data, override, match):
    with pytest.raises(ConfigError, match=match):
        check_config(small_cfg(data, override), cuda=False)


# ----------------------------------------------------------------- training
def test_twenty_steps_loss_falls(data, tmp_path):
    cfg = small_cfg(data, "optim.epochs=3", "train.max_steps=20", "data.train_num_samples=64")
    t = Trainer(cfg, tmp_path)
    t.train()
    t.close()
    r = rows(tmp_path / "metrics.jsonl")
    assert [x["step"] for x in r] == list(range(1, 21))
    assert sum(x["loss"] for x in r[-4:]) / 4 < sum(x["loss"] for x in r[:4]) / 4 - 0.1
    keys = {"step", "epoch", "time", "loss", "clip_loss", "distill_loss", "lr", "momentum", "logit_scale", "distill_logit_scale",
            "samples_per_s", "skipped_samples", "nonfinite_steps"}
    assert set(r[0]) == keys
    assert r[0]["lr"] == pytest.approx(cfg.optim.lr / 4) and r[0]["momentum"] == cfg.ema.momentum
    assert (tmp_path / "checkpoints" / "epoch_1.pt").is_file()   # 8 steps per epoch
    body = torch.load(tmp_path / "checkpoints" / "epoch_latest.pt", weights_only=True)
    assert body["epoch"] == 2 and body["trainer"]["step"] == 20
    assert all(k.startswith("module.") for k in body["student"])


def test_resume_reproduces_uninterrupted_run(data, tmp_path):
    extra = ("data.num_workers=2", "train.max_steps=14")
    full = Trainer(small_cfg(data, *extra), tmp_path / "full")
    full.train()
    full.close()
    part = Trainer(small_cfg(data, "data.num_workers=2", "train.max_steps=6"), tmp_path / "part")
    part.train()
    part.close()
    # extra garbage after the resumed step must be dropped
    with open(tmp_path / "part" / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": 7, "loss": 0.0}) + "\n")
    resumed = Trainer(small_cfg(data, *extra), tmp_path / "part", resume=tmp_path / "part")
    assert resumed.step == 6
    resumed.train()
    resumed.close()
    a, b = rows(tmp_path / "full" / "metrics.jsonl"), rows(tmp_path / "part" / "metrics.jsonl")
    assert [x["step"] for x in b] == list(range(1, 15))
    for x, y in zip(a, b):
        for k in ("loss", "clip_loss", "distill_loss", "lr", "momentum", "logit_scale"):
            assert x[k] == y[k], (x["step"], k)
    sa = full.teacher.state_dict()
    assert all(torch.equal(v, sa[k]) for k, v in resumed.teacher.state_dict().items())


def test_nonfinite_loss_skips_then_stops(data, tmp_path, monkeypatch, caplog):
    cfg = small_cfg(data, "train.max_nonfinite=3", "train.save_every_steps=2")
    t = Trainer(cfg, tmp_path)
    real = t.loss_fn.forward
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        if calls["n"] in (3,) or calls["n"] >= 6:     # one isolated NaN, then NaN forever
            out["clip_loss"] = out["clip_loss"] * float("nan")
        return out

    monkeypatch.setattr(t.loss_fn, "forward", flaky)
    with caplog.at_level(logging.WARNING, logger="cosmos_fast"), pytest.raises(NonFiniteLossError, match="3 non-finite"):
        t.train()
    t.close()
    r = rows(tmp_path / "metrics.jsonl")
    assert [x["step"] for x in r] == [1, 2, 3, 4]        # calls 1,2,4,5 completed; 3 was skipped
    assert [x["nonfinite_steps"] for x in r] == [0, 0, 1, 1]
    assert "non-finite loss" in caplog.text
    body = torch.load(tmp_path / "checkpoints" / "epoch_latest.pt", weights_only=True)
    assert body["trainer"]["step"] == 4                   # the last good checkpoint is intact


def test_resume_from_official_weights_only_file(data, tmp_path, caplog):
    torch.manual_seed(3)
    src = create_model("tiny")
    save_checkpoint(tmp_path / "official.pt", src, src, epoch=5, name="released")
    body = torch.load(tmp_path / "official.pt", weights_only=True)
    del body["name"]
    torch.save(body, tmp_path / "official.pt")
    with caplog.at_level(logging.WARNING, logger="cosmos_fast"):
        t = Trainer(small_cfg(data), tmp_path / "run", resume=tmp_path / "official.pt")
    assert "weights only" in caplog.text and t.step == 0
    assert torch.equal(t.student.text_projection, src.text_projection)
    t.close()


def test_train_cli(data, tmp_path, capsys):
    args = ["--config", "tiny-cpu", "--output-dir", str(tmp_path), f"data.train_shards={data['train']}",
            f"data.val_shards={data['val']}", "data.global_size=32", "data.local_size=16", "data.batch_size=8",
            "data.train_num_samples=16", "data.num_workers=0", "train.max_steps=2", "train.progress=false"]
    assert train_main(args) == 0
    assert len(rows(tmp_path / "metrics.jsonl")) == 2
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "eval.jsonl").is_file()
    assert train_main(["--config", "tiny-cpu", "--output-dir", str(tmp_path), "data.batchsize=3"]) == 2
    assert "data.batchsize" in capsys.readouterr().err
    assert train_main(["--help-config"]) == 0
    assert "data.train_shards" in capsys.readouterr().out


def test_epoch_log_reports_skip_counts(data, tmp_path):
    t = Trainer(small_cfg(data, "train.max_steps=8"), tmp_path)
    t.train()
    t.close()
    log_text = (tmp_path / "train.log").read_text()
    assert "epoch 1 done at step 8; skipped samples so far: none" in log_text


def test_synthetic_data_is_deterministic(tmp_path):
    import tarfile

    def members(root):
        p = write_demo_data(root, n_train=8, n_val=4, samples_per_shard=8, seed=7)
        with tarfile.open(expand_shards(p["train"])[0]) as tf:
            return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]

    a, b = members(tmp_path / "a"), members(tmp_path / "b")
    assert a == b and len(a) == 16
    record = json.loads(dict(a)["train0000000.json"])
    assert all(isinstance(record[f], list) and record[f] for f in ("raw_caption", "shortIB_captions", "longSV_captions"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="AMP training needs CUDA")
@pytest.mark.parametrize("precision", ["amp_bf16", "amp_fp16"])
def test_amp_training_on_cuda(data, tmp_path, precision):
    t = Trainer(small_cfg(data, f"train.precision={precision}", "train.max_steps=3"), tmp_path)
    t.train()
    t.close()
    r = rows(tmp_path / "metrics.jsonl")
    assert len(r) == 3 and all(torch.isfinite(torch.tensor(x["loss"])) for x in r)
    assert all(p.dtype == torch.float32 for p in t.teacher.parameters())


def test_zero_shot_eval_inside_training(data, tmp_path):
    from PIL import Image

    root = tmp_path / "imagenet"
    for i, wnid in enumerate(["n01", "n02", "n03"]):
        (root / wnid).mkdir(parents=True)
        for j in range(2):
            Image.new("RGB", (40, 40), (80 * i, 30 * j, 200 - 60 * i)).save(root / wnid / f"{j}.JPEG")
    names = tmp_path / "names.txt"
    names.write_text("red square\ngreen circle\nblue triangle\n")
    cfg = small_cfg(data, "train.max_steps=2", f"eval.imagenet_val={root}", f"eval.imagenet_classnames={names}",
                    "eval.every_steps=1", "eval.num_workers=0", "eval.batch_size=4")
    t = Trainer(cfg, tmp_path / "run")
    t.train()
    t.close()
    rows_ = rows(tmp_path / "run" / "zero_shot.jsonl")
    assert [r["step"] for r in rows_] == [1, 2]
    for model in ("student", "teacher"):
        res = rows_[-1][model]["imagenet"]
        assert res["n_images"] == 6 and 0.0 <= res["top1"] <= res["top5"] == 1.0   # 3 classes: top-5 is all
    with pytest.raises(ConfigError, match="eval.imagenet_val"):
        check_config(small_cfg(data, "eval.imagenet_val=/nonexistent"), cuda=False)


def test_dali_backend_in_the_trainer(data, tmp_path):
    pytest.importorskip("nvidia.dali")
    t = Trainer(small_cfg(data, "data.backend=dali", "train.max_steps=2", "data.num_workers=1"), tmp_path)
    assert type(t.loader).__name__ == "DaliWebDatasetLoader"
    t.train()
    t.close()
    r = rows(tmp_path / "metrics.jsonl")
    assert [x["step"] for x in r] == [1, 2] and all(x["loss"] > 0 for x in r)
