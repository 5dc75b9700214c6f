"""A run's outputs are never lost and bad values fail at start with one line: folder reuse, weights-only
resume markers, non-finite weights, torn metrics lines, config changes on resume, impossible batch sizes,
stale temporary files, the command line's error paths and exit codes (issue 13)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from cosmos_fast.config import Config, ConfigError, load_config
from cosmos_fast.data.synthetic import write_demo_data
from cosmos_fast.model import create_model, save_checkpoint
from cosmos_fast.train import main as train_main
from cosmos_fast.checkpointing import ConfigChangeError, RunFolderError
from cosmos_fast.metrics import strict_json
from cosmos_fast.trainer import NonFiniteLossError, Trainer, check_config
from test_trainer import rows, small_cfg


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_demo_data(tmp_path_factory.mktemp("demo"), n_train=128, n_val=32, samples_per_shard=32, seed=1)


def run(cfg, out, **kw):
    t = Trainer(cfg, out, **kw)
    try:
        t.train()
    finally:
        t.close()
    return t


def cli_args(data, out, *extra):
    return ["--config", "tiny-cpu", "--output-dir", str(out), f"data.train_shards={data['train']}", "data.val_shards=",
            "data.global_size=32", "data.local_size=16", "data.batch_size=8", "data.train_num_samples=64",
            "data.num_workers=0", "data.shuffle_buffer=32", "data.shuffle_initial=8", "train.progress=false",
            "train.tensorboard=false", "optim.warmup=4", *extra]


# ------------------------------------------------------------ run folder
def test_new_run_refuses_another_runs_folder(data, tmp_path):
    run(small_cfg(data, "train.max_steps=4"), tmp_path)
    before = (tmp_path / "metrics.jsonl").read_text()
    ckpt = (tmp_path / "checkpoints" / "epoch_latest.pt").read_bytes()
    with pytest.raises(RunFolderError, match="another run's outputs.*metrics.jsonl.*--overwrite"):
        Trainer(small_cfg(data, "train.auto_resume=false", "train.max_steps=2"), tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert (tmp_path / "checkpoints" / "epoch_latest.pt").read_bytes() == ckpt
    with pytest.raises(RunFolderError, match="--overwrite would delete"):
        Trainer(small_cfg(data), tmp_path, resume=tmp_path / "checkpoints" / "epoch_latest.pt",
                overwrite=True)
    # a checkpoint from elsewhere does not make this folder's run its own
    other = tmp_path / "other"
    run(small_cfg(data, "train.max_steps=2"), other)
    with pytest.raises(RunFolderError, match="starting from"):
        Trainer(small_cfg(data), other, resume=tmp_path)
    # --overwrite: the old outputs go, the new run starts at step 0 (no auto-resume of what it deletes)
    t = run(small_cfg(data, "train.max_steps=2"), tmp_path, overwrite=True)
    assert t.step == 2 and [r["step"] for r in rows(tmp_path / "metrics.jsonl")] == [1, 2]
    assert not (tmp_path / "checkpoints" / "epoch_1.pt").exists()


def test_weights_only_resume_appends_after_a_marker(data, tmp_path):
    run(small_cfg(data, "train.max_steps=6"), tmp_path)
    body = torch.load(tmp_path / "checkpoints" / "epoch_latest.pt", weights_only=True)
    weights = tmp_path / "weights.pt"
    torch.save({k: body[k] for k in ("epoch", "student", "teacher")}, weights)
    t = run(small_cfg(data, "train.max_steps=3"), tmp_path, resume=weights)
    lines = rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in lines[:6]] == [1, 2, 3, 4, 5, 6]            # the earlier run's rows are kept
    assert "marker" in lines[6] and str(weights) in lines[6]["marker"]
    assert [r["step"] for r in lines[7:]] == [1, 2, 3] and t.step == 3
    # an exact resume of the new run truncates only after the marker
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": 9, "loss": 0.0}) + "\n")              # rows after the checkpoint step
    t = Trainer(small_cfg(data, "train.max_steps=3"), tmp_path)
    t.close()
    again = rows(tmp_path / "metrics.jsonl")
    assert t.step == 3 and again == lines


def test_stale_temp_files_are_removed(data, tmp_path):
    run(small_cfg(data, "train.max_steps=2"), tmp_path)
    stale = tmp_path / "checkpoints" / ".epoch_latest.pt.k2j3x9.tmp"
    stale.write_bytes(b"\0" * 1000)
    mine = tmp_path / "checkpoints" / "notes.tmp"                           # not our naming: kept
    mine.write_text("x")
    Trainer(small_cfg(data, "train.max_steps=2"), tmp_path).close()
    assert not stale.exists() and mine.exists()


# ---------------------------------------------------- non-finite values
@pytest.mark.parametrize("override", ["optim.lr=.inf", "optim.lr=.nan", "optim.lr=nan", "ema.momentum=-.inf",
                                      "optim.grad_clip_norm=inf"])
def test_non_finite_config_values_rejected(override):
    with pytest.raises(ConfigError, match="finite"):
        load_config("tiny-cpu", [override])


def test_non_finite_value_in_code_built_config_rejected(data):
    cfg = small_cfg(data)
    cfg.optim.lr = float("inf")
    with pytest.raises(ConfigError, match="optim.lr = inf must be a finite number"):
        check_config(cfg, cuda=False)


def test_non_finite_weights_are_never_saved(data, tmp_path):
    t = Trainer(small_cfg(data, "train.max_steps=3", "train.save_every_steps=2"), tmp_path)
    real_step = t.optimizer.step
    calls = {"n": 0}

    def poisoned_step(*a, **k):
        out = real_step(*a, **k)
        calls["n"] += 1
        if calls["n"] == 3:                            # the update of step 3 makes the weights NaN
            with torch.no_grad():
                for p in t.student.parameters():
                    p.fill_(float("nan"))
        return out

    t.optimizer.step = poisoned_step
    with pytest.raises(NonFiniteLossError, match=r"non-finite at step 3.*newest checkpoint with finite weights is "
                                                 r".*epoch_latest.pt"):
        t.train()
    t.close()
    body = torch.load(tmp_path / "checkpoints" / "epoch_latest.pt", weights_only=True)
    assert body["trainer"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in body["student"].values())
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():    # strict JSON
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


def test_max_steps_one_with_nan_weights_exits_nonzero(data, tmp_path, monkeypatch):
    import cosmos_fast.trainer as trainer_mod

    real = trainer_mod.train_step

    def nan_step(engine, *a, **k):
        out = real(engine, *a, **k)
        with torch.no_grad():
            next(engine.student.parameters()).fill_(float("inf"))
        return out

    monkeypatch.setattr(trainer_mod, "train_step", nan_step)
    assert train_main(cli_args(data, tmp_path, "train.max_steps=1")) == 3
    assert not (tmp_path / "checkpoints" / "epoch_latest.pt").exists()


def test_metrics_lines_are_strict_json():
    line = strict_json({"lr": float("inf"), "loss": float("nan"), "skipped": {"x": 1}, "ok": 1.5})
    assert json.loads(line) == {"lr": None, "loss": None, "skipped": {"x": 1}, "ok": 1.5}


# ------------------------------------------------------------- resume
def test_torn_last_metrics_line_is_dropped(data, tmp_path, caplog):
    run(small_cfg(data, "train.max_steps=4"), tmp_path)
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "loss": 1.2')                                  # power loss mid-append
    with caplog.at_level("WARNING", logger="cosmos_fast"):
        t = run(small_cfg(data, "train.max_steps=6"), tmp_path)
    assert "torn last line" in caplog.text and t.step == 6
    assert [r["step"] for r in rows(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("change", ["data.batch_size=4", "train.seed=7", "optim.epochs=5",
                                    "data.train_num_samples=32"])
def test_config_change_that_breaks_exact_resume_is_refused(data, tmp_path, change):
    run(small_cfg(data, "train.max_steps=4"), tmp_path)
    key = change.split("=")[0]
    with pytest.raises(ConfigChangeError, match=f"{key}.*--allow-config-change"):
        Trainer(small_cfg(data, change), tmp_path)
    t = Trainer(small_cfg(data, change), tmp_path, allow_config_change=True)
    t.close()
    assert t.step == 4


def test_other_config_change_warns_and_every_config_is_kept(data, tmp_path, caplog):
    run(small_cfg(data, "train.max_steps=4"), tmp_path)
    original = (tmp_path / "config.yaml").read_text()
    with caplog.at_level("WARNING", logger="cosmos_fast"):
        t = Trainer(small_cfg(data, "optim.lr=0.001", "train.max_steps=4"), tmp_path)
    t.close()
    assert f"changed config: optim.lr: {small_cfg(data).optim.lr!r} -> 0.001" in caplog.text
    assert (tmp_path / "config.yaml").read_text() == original
    assert "lr: 0.001" in (tmp_path / "config.resumed-4.yaml").read_text()


# ------------------------------------------------------------- sizes
def test_batch_larger_than_the_epoch_rejected(data):
    with pytest.raises(ConfigError, match="larger than data.train_num_samples = 64"):
        check_config(small_cfg(data, "data.batch_size=128"), cuda=False)
    with pytest.raises(ConfigError, match="larger than"):
        check_config(small_cfg(data, "data.batch_size=40"), world_size=2, cuda=False)


def test_batch_that_cannot_fit_memory_rejected_at_start(data, tmp_path):
    cfg = small_cfg(data, "data.batch_size=100000", "data.train_num_samples=1000000")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"data.batch_size = 100000 needs an estimated [\d.]+ GiB"):
        Trainer(cfg, tmp_path)
    assert time.perf_counter() - t0 < 60                    # refused before building any batch
    t = Trainer(small_cfg(data, "data.batch_size=100000", "data.train_num_samples=1000000",
                          "train.memory_check=false"), tmp_path / "b")
    t.close()


def test_activation_estimate_grows_with_the_batch_and_shrinks_with_checkpointing():
    from cosmos_fast.engine import activation_bytes
    from cosmos_fast.model.config import resolve_model_config

    m = resolve_model_config("ViT-B-16")
    full = activation_bytes(m, 64, 224, 96, 6, 8, "amp_bf16", False)
    assert activation_bytes(m, 128, 224, 96, 6, 8, "amp_bf16", False) == pytest.approx(2 * full, rel=1e-6)
    assert activation_bytes(m, 64, 224, 96, 6, 8, "amp_bf16", True) < full / 4
    assert 2 * 2 ** 30 < full < 80 * 2 ** 30                  # a B/16 step at B = 64 fits an 80 GB GPU


# ------------------------------------------------------- command line
@pytest.mark.parametrize("extra,match", [
    (["optim.lr=[1"], "is not valid YAML"),
    (["train.seed=1e23"], "train.seed = 99999999999999991611392 must lie in"),
    (["optim.lr=.nan"], "optim.lr = nan must be a finite number"),
    (["data.batch_size=100"], "larger than data.train_num_samples"),
])
def test_cli_errors_are_one_line_exit_2(data, tmp_path, capsys, extra, match):
    assert train_main(cli_args(data, tmp_path / "run", *extra)) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_yaml_file_syntax_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  batch_size: [4\n")
    assert train_main(["--config", str(bad), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"config file {bad} is not valid YAML" in err and "Traceback" not in err


def test_cli_output_dir_that_is_a_file(data, tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert train_main(cli_args(data, target, "train.max_steps=1")) == 2
    assert f"--output-dir {target} exists and is not a folder" in capsys.readouterr().err
    assert train_main(cli_args(data, target / "sub", "train.max_steps=1")) == 2
    assert "cannot be created" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_cli_read_only_output_dir(data, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    assert train_main(cli_args(data, ro, "train.max_steps=1")) == 2
    assert "is not writable" in capsys.readouterr().err


def test_cli_checkpoint_mismatch_on_resume(data, tmp_path, capsys):
    m = create_model("tiny")
    sd = m.state_dict()
    del sd["text_projection"]
    save_checkpoint(tmp_path / "bad.pt", sd, sd, epoch=1)
    assert train_main(cli_args(data, tmp_path / "run", "--resume", str(tmp_path / "bad.pt"))) == 2
    err = capsys.readouterr().err
    assert "does not match the model" in err and "missing keys (1): text_projection" in err
    assert "Traceback" not in err


def test_cli_disk_full_is_logged_and_exits_2(data, tmp_path, monkeypatch):
    import cosmos_fast.engine as engine_mod

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(engine_mod, "save_checkpoint", full_disk)
    assert train_main(cli_args(data, tmp_path, "train.max_steps=2")) == 2
    assert "No space left on device" in (tmp_path / "train.log").read_text()


def test_cli_overrides_anywhere_and_numbers_as_written(data, tmp_path):
    args = ["--config", "tiny-cpu", f"data.train_shards={data['train']}", "optim.lr=5e-4", "optim.eps=1E-8",
            "--output-dir", str(tmp_path), *cli_args(data, tmp_path)[4:], "train.max_steps=1"]
    assert train_main(args) == 0
    cfg = load_config(str(tmp_path / "config.yaml"))
    assert cfg.optim.lr == 5e-4 and cfg.optim.eps == 1e-8 and cfg.train.max_steps == 1
    assert isinstance(Config().optim.lr, float)
    with pytest.raises(SystemExit):
        train_main([*cli_args(data, tmp_path / "x"), "--no-such-flag"])


def test_cli_ctrl_c_saves_and_exits_130_quietly(data, tmp_path):
    """Ctrl-C reaches the whole process group (trainer and loader workers): the run stops at the step
    boundary with a checkpoint, no worker prints a KeyboardInterrupt traceback, exit 130."""
    out = tmp_path / "run"
    args = cli_args(data, out, "data.num_workers=2", "optim.epochs=50", "train.save_every_steps=0")
    proc = subprocess.Popen([sys.executable, "-m", "cosmos_fast.train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        metrics, deadline = out / "metrics.jsonl", time.time() + 120
        while not (metrics.is_file() and metrics.read_text().strip()):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "SIGINT received: saving a checkpoint" in err
    body = torch.load(out / "checkpoints" / "epoch_latest.pt", weights_only=True)
    assert body["trainer"]["step"] == rows(out / "metrics.jsonl")[-1]["step"]
