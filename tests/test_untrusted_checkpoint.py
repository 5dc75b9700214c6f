"""No code runs from a checkpoint file unless the user says --trust-checkpoint.

A hostile ``.pt`` file looks like one of ours but also holds an object whose ``__reduce__`` calls
``Path.touch(marker)`` (the harmless stand-in for ``os.system``). Every load path must refuse it
without creating the marker, with an error naming the file, the offending types and the flag; the
CLIs print that as one line and exit 2. Our own files, the official layout (with the numpy and
``argparse.Namespace`` entries older files carry) and DeepSpeed's own records load without the flag.
"""
import argparse
import dataclasses
import json
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cosmos_fast
from cosmos_fast import create_model, load_checkpoint, save_checkpoint
from cosmos_fast.cli import main as cli_main
from cosmos_fast.config import load_config
from cosmos_fast.data.synthetic import write_demo_data
from cosmos_fast.eval import cli as eval_cli
from cosmos_fast.export import export_checkpoint
from cosmos_fast.model.checkpoint import (CorruptCheckpointError, UntrustedCheckpointError, check_deepspeed_files,
                                          torch_load)
from cosmos_fast.train import add_train_args
from cosmos_fast.train import main as train_main
from cosmos_fast.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this calls ``Path.touch(marker)``: code chosen by whoever wrote the file."""

    def __init__(self, marker):
        self.marker = Path(marker)

    def __reduce__(self):
        return Path.touch, (self.marker,)


@dataclasses.dataclass
class RunNote:
    """A legitimately unusual entry: a user's own class, loadable only with --trust-checkpoint."""
    text: str


@pytest.fixture(scope="module")
def tiny_weights():
    torch.manual_seed(0)
    return create_model("tiny").state_dict()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_demo_data(tmp_path_factory.mktemp("data"), n_train=16, n_val=8, samples_per_shard=8, seed=3)


@pytest.fixture
def hostile(tmp_path, tiny_weights):
    """(write(path) -> path, marker): a two-model checkpoint of the tiny model plus the payload."""
    marker = tmp_path / "MARKER"

    def write(path, **extra):
        path = Path(path)
        save_checkpoint(path, tiny_weights, tiny_weights, epoch=1, name="run", payload=Payload(marker), **extra)
        return path

    return write, marker


def assert_refused(message: str, path, marker):
    assert not marker.exists(), "code from the checkpoint ran"
    assert str(path) in message and "--trust-checkpoint" in message
    assert "builtins.getattr" in message and "pathlib.Path" in message      # what it would have called


def refused(call, path, marker) -> UntrustedCheckpointError:
    """Run ``call``; the marker is checked first (did the file's code run?), then the error."""
    try:
        call()
        error = None
    except Exception as e:  # noqa: BLE001 — anything else is reported below
        error = e
    assert not marker.exists(), "code from the checkpoint ran"
    assert isinstance(error, UntrustedCheckpointError), f"not refused: {error!r}"
    assert_refused(str(error), path, marker)
    assert "\n" not in str(error)
    return error


def one_error_line(capsys, prefix: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, err
    return lines[0]


def cli_refused(rc: int, capsys, prefix: str, path, marker) -> None:
    """A CLI refusal: no marker, exit status 2, one line ``prefix ...`` naming file, types and flag."""
    assert not marker.exists(), "code from the checkpoint ran"
    assert rc == 2
    assert_refused(one_error_line(capsys, prefix), path, marker)


def overrides(data):
    return [f"data.train_shards={data['train']}", "data.val_shards=", "data.global_size=32", "data.local_size=16",
            "data.batch_size=8", "data.train_num_samples=16", "data.num_workers=0", "train.max_steps=1",
            "train.progress=false", "train.tensorboard=false"]


def train_args(data, out, *extra):
    return ["--config", "tiny-cpu", "--output-dir", str(out), *overrides(data), *extra]


def small_imagenet(root: Path) -> list[str]:
    rng = np.random.default_rng(0)
    for wnid in ("n01440764", "n01443537"):
        (root / wnid).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / wnid / "a.JPEG")
    (root / "classnames.txt").write_text("tench\ngoldfish\n")
    return ["--imagenet-val", str(root), "--imagenet-classnames", str(root / "classnames.txt"),
            "--model-config", "tiny", "--device", "cpu", "--num-workers", "0", "--batch-size", "2", "--no-progress"]


# ------------------------------------------------------------------------- the library paths
def test_load_checkpoint_refuses_pickled_code(hostile, tmp_path):
    write, marker = hostile
    path = write(tmp_path / "epoch_1.pt")
    error = refused(lambda: cosmos_fast.load_checkpoint(path, create_model("tiny"), which="teacher"), path, marker)
    assert isinstance(error, ValueError) and error.path == path
    assert {"builtins.getattr", "pathlib.Path"} <= set(error.unsafe)


@pytest.mark.parametrize("fmt", ["zip", "legacy", "protocol4", "plain_pickle"])
def test_every_file_format_is_refused(tmp_path, fmt):
    """torch.save's zip and legacy formats, pickle protocols the weights-only reader lacks, a bare pickle."""
    marker, path = tmp_path / "MARKER", tmp_path / f"{fmt}.pt"
    body = {"epoch": 1, "teacher": {"w": torch.ones(2)}, "payload": Payload(marker)}
    if fmt == "plain_pickle":
        path.write_bytes(pickle.dumps(body, protocol=4))
    else:
        torch.save(body, path, _use_new_zipfile_serialization=fmt != "legacy",
                   pickle_protocol=4 if fmt == "protocol4" else 2)
    try:
        torch_load(path)
        error = None
    except Exception as e:  # noqa: BLE001
        error = e
    assert not marker.exists(), "code from the checkpoint ran"
    assert isinstance(error, UntrustedCheckpointError), f"not refused: {error!r}"
    assert str(path) in str(error) and "--trust-checkpoint" in str(error)


def test_trust_loads_an_unusual_file_and_only_then(tmp_path, tiny_weights, caplog):
    path = save_checkpoint(tmp_path / "noted.pt", tiny_weights, tiny_weights, epoch=2, note=RunNote("lr sweep 3"))
    with pytest.raises(UntrustedCheckpointError, match=r"test_untrusted_checkpoint\.RunNote"):
        load_checkpoint(path, create_model("tiny"), which="student")
    model = create_model("tiny")
    meta = load_checkpoint(path, model, which="student", trust=True)
    assert meta["note"] == RunNote("lr sweep 3") and meta["epoch"] == 2
    assert all(torch.equal(v, tiny_weights[k]) for k, v in model.state_dict().items())
    assert "full unpickling" in caplog.text and "RunNote" in caplog.text


def test_known_types_load_without_trust(tmp_path, tiny_weights, caplog):
    """What older and official files carry: argparse args, numpy RNG state, scalars and dtypes
    (written under numpy 2; numpy 1 names are aliased), paths."""
    body = {"epoch": 3, "name": "old", "student": tiny_weights, "teacher": tiny_weights,
            "args": argparse.Namespace(lr=5e-4, model="tiny"), "numpy_rng": np.random.get_state(),
            "best": np.float64(0.25), "count": np.int64(7), "dtype": np.dtype("float16"),
            "array": np.arange(4, dtype=np.uint8), "logs": Path("/runs/old")}
    torch.save(body, tmp_path / "legacy.pt")
    model = create_model("tiny")
    meta = load_checkpoint(tmp_path / "legacy.pt", model, which="teacher")
    assert meta["args"].lr == 5e-4 and meta["numpy_rng"][0] == "MT19937" and meta["best"] == 0.25
    assert meta["dtype"] == np.float16 and meta["array"].tolist() == [0, 1, 2, 3] and meta["logs"] == Path("/runs/old")
    assert "unpickling" not in caplog.text
    # the allow-list is scoped to our loads, never added globally
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "legacy.pt", weights_only=True)


def test_official_checkpoint_loads_without_trust(official, tmp_path):
    path = tmp_path / "official.pt"
    torch.save(official["official_checkpoint"], path)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    model = create_model(official["config"])
    assert load_checkpoint(path, model, which="teacher")["epoch"] == official["official_checkpoint"]["epoch"]


@pytest.mark.parametrize("content", ["empty", "truncated", "text", "random"])
def test_corrupt_files_name_the_file(tmp_path, tiny_weights, content):
    good = save_checkpoint(tmp_path / "good.pt", tiny_weights, tiny_weights, epoch=1).read_bytes()
    path = tmp_path / f"{content}.pt"
    path.write_bytes({"empty": b"", "truncated": good[:len(good) // 2], "text": b"not a checkpoint\n",
                      "random": np.random.default_rng(0).bytes(4096)}[content])
    with pytest.raises(CorruptCheckpointError, match="not a readable PyTorch checkpoint") as e:
        torch_load(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert cli_main(["export", "--checkpoint", str(path), "--output", str(tmp_path / "out.pt")]) == 2


# ---------------------------------------------------------------------------------- the CLIs
def test_train_resume_file_refused(hostile, data, tmp_path, capsys):
    write, marker = hostile
    path = write(tmp_path / "downloaded.pt")
    rc = train_main(train_args(data, tmp_path / "run", "--resume", str(path)))
    cli_refused(rc, capsys, "cosmos-fast train:", path, marker)


def test_train_auto_resume_refused(hostile, data, tmp_path, capsys):
    """No flag at all: a file planted at OUTPUT/checkpoints/epoch_latest.pt is picked up by auto-resume."""
    write, marker = hostile
    path = write(tmp_path / "run" / "checkpoints" / "epoch_latest.pt")
    rc = cli_main(["train", *train_args(data, tmp_path / "run")])
    cli_refused(rc, capsys, "cosmos-fast train:", path, marker)


def test_train_trust_flag_reaches_the_loader(data, tmp_path, tiny_weights, monkeypatch, capsys):
    path = save_checkpoint(tmp_path / "noted.pt", tiny_weights, tiny_weights, epoch=0, note=RunNote("x"))
    assert train_main(train_args(data, tmp_path / "a", "--resume", str(path))) == 2
    assert "RunNote" in one_error_line(capsys, "cosmos-fast train:")
    seen = {}
    monkeypatch.setattr(Trainer, "train", lambda self: seen.setdefault("weights", self.teacher.state_dict()))
    monkeypatch.setattr(Trainer, "zero_shot_eval", lambda self: None)
    assert train_main(train_args(data, tmp_path / "b", "--resume", str(path), "--trust-checkpoint")) == 0
    assert all(torch.equal(v, tiny_weights[k]) for k, v in seen["weights"].items())


def test_eval_refused(hostile, tmp_path, capsys):
    write, marker = hostile
    path = write(tmp_path / "cosmos_release.pt")
    common = small_imagenet(tmp_path / "imagenet")
    rc = eval_cli.main(["--checkpoint", str(path), *common])
    cli_refused(rc, capsys, "cosmos-fast eval:", path, marker)
    rc = cli_main(["eval", "--checkpoint", str(path), *common])
    cli_refused(rc, capsys, "cosmos-fast eval:", path, marker)


def test_eval_trust_flag(tmp_path, tiny_weights, capsys):
    path = save_checkpoint(tmp_path / "noted.pt", tiny_weights, tiny_weights, epoch=4, note=RunNote("x"))
    common = small_imagenet(tmp_path / "imagenet")
    assert eval_cli.main(["--checkpoint", str(path), *common]) == 2
    assert "RunNote" in one_error_line(capsys, "cosmos-fast eval:")
    out = tmp_path / "r.json"
    assert eval_cli.main(["--checkpoint", str(path), *common, "--trust-checkpoint", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["epoch"] == 4


def test_export_refused(hostile, tmp_path, capsys):
    write, marker = hostile
    path = write(tmp_path / "epoch_1.pt")
    out = tmp_path / "exported.pt"
    rc = cli_main(["export", "--checkpoint", str(path), "--output", str(out)])
    cli_refused(rc, capsys, "cosmos-fast export:", path, marker)
    assert not out.exists()


def test_export_trust_flag(tmp_path, tiny_weights, capsys):
    path = save_checkpoint(tmp_path / "noted.pt", tiny_weights, tiny_weights, epoch=4, note=RunNote("x"))
    out = tmp_path / "exported.pt"
    assert cli_main(["export", "--checkpoint", str(path), "--output", str(out), "--model-name", "tiny"]) == 2
    assert "RunNote" in one_error_line(capsys, "cosmos-fast export:")
    assert cli_main(["export", "--checkpoint", str(path), "--output", str(out), "--model-name", "tiny",
                     "--trust-checkpoint"]) == 0
    body = torch_load(out)                       # the export holds weights only: no flag needed any more
    assert body["epoch"] == 4 and "note" not in body


def test_export_cli_subprocess_one_line(hostile, tmp_path):
    """The installed entry point end to end: exit 2, one line on stderr, no traceback."""
    write, marker = hostile
    path = write(tmp_path / "epoch_1.pt")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "cosmos_fast.cli", "export", "--checkpoint", str(path),
                        "--output", str(tmp_path / "x.pt")], capture_output=True, text=True, env=env, timeout=300)
    assert not marker.exists(), "code from the checkpoint ran"
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cosmos-fast export:"), r.stderr
    assert_refused(lines[0], path, marker)


@pytest.mark.parametrize("cmd", ["train", "eval", "export"])
def test_trust_flag_help_says_what_it_means(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main([cmd, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--trust-checkpoint" in text and "can run arbitrary code" in text and "files you trust" in text
    if cmd == "train":
        parser = add_train_args(argparse.ArgumentParser())
        assert parser.parse_args(["--trust-checkpoint"]).trust_checkpoint and not parser.parse_args([]).trust_checkpoint


# ------------------------------------------------------------------------------- DeepSpeed folders
def ds_tag_folder(run: Path, tiny_weights, *, teacher_extra=None, rank_extra=None, model_states=None) -> Path:
    """A complete-looking DeepSpeed tag folder: checkpoints/latest -> step_00000002/ with COMPLETE."""
    tag = run / "checkpoints" / "step_00000002"
    tag.mkdir(parents=True)
    (tag / "COMPLETE").write_text(json.dumps({"step": 2, "epoch": 0, "world": 1, "zero_stage": 2}))
    (run / "checkpoints" / "latest").write_text(tag.name)
    cfg = load_config("tiny-cpu").to_dict()
    torch.save({"teacher": tiny_weights, "epoch": 0, "step": 2, "name": "ds", "config": cfg, **(teacher_extra or {})},
               tag / "teacher.pt")
    torch.save({"trainer": {"step": 2}, "world": 1, **(rank_extra or {})}, tag / "trainer_rank00000.pt")
    torch.save(model_states or {"module": {}, "ds_version": "0.19"}, tag / "mp_rank_00_model_states.pt")
    return tag


@pytest.mark.parametrize("where", ["teacher", "trainer_rank", "model_states"])
def test_deepspeed_folder_refused_by_export_and_resume(tmp_path, tiny_weights, monkeypatch, capsys, where):
    """teacher.pt and trainer_rank*.pt are ours; DeepSpeed (and zero_to_fp32) unpickle their own
    model/optimizer files in full, so every *.pt in the tag folder is scanned before anyone loads it."""
    pytest.importorskip("deepspeed")
    import cosmos_fast.engine as engine_mod

    marker = tmp_path / "MARKER"
    evil = {"payload": Payload(marker)}
    tag = ds_tag_folder(tmp_path / "run", tiny_weights, teacher_extra=evil if where == "teacher" else None,
                        rank_extra=evil if where == "trainer_rank" else None,
                        model_states={"module": {}, **evil} if where == "model_states" else None)
    bad = {"teacher": tag / "teacher.pt", "trainer_rank": tag / "trainer_rank00000.pt",
           "model_states": tag / "mp_rank_00_model_states.pt"}[where]
    refused(lambda: export_checkpoint(tmp_path / "run", tmp_path / "out.pt"), bad, marker)
    rc = cli_main(["export", "--checkpoint", str(tmp_path / "run"), "--output", str(tmp_path / "out.pt")])
    cli_refused(rc, capsys, "cosmos-fast export:", bad, marker)

    # DeepSpeedEngine.load_tag on a stand-in engine (a real one needs DeepSpeed ranks): every
    # other step succeeds, so only the refusal stands between the file and its code
    monkeypatch.setattr(engine_mod, "load_full_state_dict", lambda *a, **k: None)
    stub = types.SimpleNamespace(
        ds=types.SimpleNamespace(load_checkpoint=lambda *a, **k: torch.load(
            tag / "mp_rank_00_model_states.pt", weights_only=False)),
        world=1, rank=0, stage=0, teacher=None)
    refused(lambda: engine_mod.DeepSpeedEngine.load_tag(stub, tag, trust=False, check_config=lambda *a: None),
            bad, marker)


def test_deepspeed_records_allowed(tmp_path):
    """The types DeepSpeed pickles into its optimizer files (measured: ZeRO-1/2/3) pass the scan."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    tag = tmp_path / "step_00000001"
    tag.mkdir()
    torch.save({"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
                "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}]},
               tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    check_deepspeed_files(tag)
    torch.save({"payload": Payload(tmp_path / "MARKER")}, tag / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(UntrustedCheckpointError, match="bf16_zero_pp_rank_0"):
        check_deepspeed_files(tag)
    check_deepspeed_files(tag, trust=True)
    assert not (tmp_path / "MARKER").exists()


# ---------------------------------------------------------------------------------- our own files
def test_own_training_checkpoint_needs_no_trust(data, tmp_path):
    """What Trainer.save writes (weights, AdamW, RNG incl. numpy as tensors, loader state, config)."""
    cfg = load_config("tiny-cpu", overrides(data))
    t = Trainer(cfg, tmp_path / "a")
    path = t.save()
    t.close()
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []      # not even the allow-list
    r = Trainer(cfg, tmp_path / "b", resume=path)
    assert r.step == t.step
    r.close()
