import argparse
import collections
import logging
from pathlib import Path

import pytest
import torch

from utils import TINY_MODEL_16

from cosmos_fast import CheckpointMismatchError, create_model, load_checkpoint, save_checkpoint
from cosmos_fast.model import checkpoint as ckpt_mod


@pytest.fixture
def pair():
    torch.manual_seed(0)
    student = create_model(TINY_MODEL_16)
    torch.manual_seed(1)
    teacher = create_model(TINY_MODEL_16)
    return student, teacher


def _equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_round_trip_official_format(tmp_path, pair):
    student, teacher = pair
    path = save_checkpoint(tmp_path / "epoch_3.pt", student, teacher, epoch=3, name="run",
                           optimizer={"state": {}})
    body = torch.load(path, weights_only=True)
    assert set(body) == {"epoch", "name", "student", "teacher", "optimizer"}
    assert body["epoch"] == 3 and body["name"] == "run"
    assert all(k.startswith("module.") for k in body["student"])
    assert not any(k.startswith("module.") for k in body["teacher"])
    assert list(body["teacher"]) == list(teacher.state_dict())
    for which, ref in (("student", student), ("teacher", teacher)):
        m = create_model(TINY_MODEL_16)
        meta = load_checkpoint(path, m, which=which)
        assert _equal(m, ref)
        assert meta["epoch"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["epoch_3.pt"]   # no temporary files left


def test_state_dict_inputs_and_prefix_normalised(tmp_path, pair):
    student, teacher = pair
    prefixed = {"module." + k: v for k, v in student.state_dict().items()}
    path = save_checkpoint(tmp_path / "c.pt", prefixed, teacher.state_dict(), epoch=0)
    body = torch.load(path, weights_only=True)
    assert not any(k.startswith("module.module.") for k in body["student"])
    m = create_model(TINY_MODEL_16)
    load_checkpoint(path, m, which="student")
    assert _equal(m, student)


@pytest.mark.parametrize("prefix", ["", "module."])
def test_bare_state_dict(tmp_path, pair, prefix):
    student, _ = pair
    torch.save({prefix + k: v for k, v in student.state_dict().items()}, tmp_path / "bare.pt")
    m = create_model(TINY_MODEL_16)
    assert load_checkpoint(tmp_path / "bare.pt", m) == {}
    assert _equal(m, student)


def test_prefix_on_some_keys_only(tmp_path, pair):
    """The official loader looks only at the first key; we strip wherever the prefix is."""
    student, _ = pair
    sd = student.state_dict()
    mixed = {("module." + k if i % 2 else k): v for i, (k, v) in enumerate(sd.items())}
    torch.save({"epoch": 1, "student": mixed, "teacher": sd}, tmp_path / "mixed.pt")
    m = create_model(TINY_MODEL_16)
    load_checkpoint(tmp_path / "mixed.pt", m, which="student")
    assert _equal(m, student)


def test_two_model_file_needs_which(tmp_path, pair):
    path = save_checkpoint(tmp_path / "c.pt", *pair, epoch=1)
    with pytest.raises(ValueError, match="which='student' or which='teacher'"):
        load_checkpoint(path, create_model(TINY_MODEL_16))


def test_mismatch_is_refused_with_keys(tmp_path, pair):
    student, teacher = pair
    sd = dict(teacher.state_dict())
    del sd["visual.attn_cross_pool.ln_q.bias"]
    sd["extra.weight"] = torch.zeros(2)
    sd["text_projection"] = torch.zeros(3, 3)
    torch.save({"epoch": 1, "student": student.state_dict(), "teacher": sd}, tmp_path / "bad.pt")
    m = create_model(TINY_MODEL_16)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as e:
        load_checkpoint(tmp_path / "bad.pt", m, which="teacher")
    msg = str(e.value)
    assert "missing keys (1): visual.attn_cross_pool.ln_q.bias" in msg
    assert "unexpected keys (1): extra.weight" in msg
    assert "text_projection file (3, 3) vs model (16, 16)" in msg
    assert e.value.missing == ["visual.attn_cross_pool.ln_q.bias"]
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())   # model untouched


def test_atomic_write_keeps_old_file_on_failure(tmp_path, pair, monkeypatch):
    student, teacher = pair
    path = save_checkpoint(tmp_path / "latest.pt", student, teacher, epoch=1)
    good = path.read_bytes()

    def exploding_save(obj, fh):
        fh.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, student, teacher, epoch=2)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"]


def test_namespace_file_loads_without_full_unpickling(tmp_path, pair, caplog):
    """argparse args (older training files) are allow-listed: no fallback, no warning, no flag."""
    student, teacher = pair
    torch.save({"epoch": 1, "student": student.state_dict(), "teacher": teacher.state_dict(),
                "args": argparse.Namespace(lr=1.0)}, tmp_path / "legacy.pt")
    m = create_model(TINY_MODEL_16)
    with caplog.at_level(logging.WARNING):
        meta = load_checkpoint(tmp_path / "legacy.pt", m, which="teacher")
    assert "unpickling" not in caplog.text
    assert meta["args"].lr == 1.0 and _equal(m, teacher)


def test_unknown_object_refused_unless_trusted(tmp_path, pair, caplog):
    student, teacher = pair
    marker = tmp_path / "MARKER"
    torch.save({"epoch": 1, "student": student.state_dict(), "teacher": teacher.state_dict(),
                "extra": {"x": collections.Counter, "y": getattr(Path, "touch")}}, tmp_path / "odd.pt")
    with pytest.raises(ckpt_mod.UntrustedCheckpointError, match="--trust-checkpoint") as e:
        load_checkpoint(tmp_path / "odd.pt", create_model(TINY_MODEL_16), which="teacher")
    assert str(tmp_path / "odd.pt") in str(e.value) and "builtins.getattr" in str(e.value)
    m = create_model(TINY_MODEL_16)
    with caplog.at_level(logging.WARNING):
        meta = load_checkpoint(tmp_path / "odd.pt", m, which="teacher", trust=True)
    assert meta["extra"]["y"] is Path.touch and _equal(m, teacher) and not marker.exists()
    assert "full unpickling" in caplog.text


def test_missing_file_and_wrong_epoch(tmp_path, pair):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt", create_model(TINY_MODEL_16), which="student")
    with pytest.raises(TypeError, match="epoch"):
        save_checkpoint(tmp_path / "x.pt", *pair, epoch="1")
