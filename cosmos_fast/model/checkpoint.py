"""Checkpoint files in the official COSMOS format.

Written: ``{'epoch': int, 'name': str, 'student': {'module.'+key: tensor}, 'teacher': {key: tensor},
**extra}`` — student keys carry the ``module.`` prefix of the official (DDP) files, teacher keys are
bare, so the official ``main.py`` and the segmentation loader read our files unchanged. Writes are
atomic: the file is written to a temporary name in the same folder, fsync'ed, then renamed.

Read: official training files (either model, ``module.`` stripped wherever present), files with the
``state_dict`` / ``ema_state_dict`` layout, and bare state dicts. ``torch.load(weights_only=True)``
is used whenever the file allows it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

PREFIX = "module."
_TWO_MODEL_KEYS = ("student", "teacher")


class CheckpointMismatchError(RuntimeError):
    """A checkpoint whose keys or shapes do not match the model."""

    def __init__(self, path, missing, unexpected, mismatched):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched

        def fmt(items, limit=20):
            items = list(items)
            more = f" … and {len(items) - limit} more" if len(items) > limit else ""
            return ", ".join(map(str, items[:limit])) + more

        lines = [f"checkpoint {path} does not match the model:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {fmt(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {fmt(unexpected)}")
        if mismatched:
            lines.append(f"  wrongly shaped keys ({len(mismatched)}): "
                         + fmt(f"{k} file {tuple(a)} vs model {tuple(b)}" for k, a, b in mismatched))
        super().__init__("\n".join(lines))


def _state_dict(obj) -> dict:
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a module or a state dict, got {type(obj).__name__}")
    return dict(obj)


def strip_prefix(sd: Mapping, prefix: str = PREFIX) -> dict:
    """Remove ``prefix`` from every key that has it (not only when the first key has it)."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}


def _plain(sd: Mapping, prefix: str = "") -> dict:
    return {prefix + k: v.detach().to("cpu") for k, v in strip_prefix(sd).items()}


def atomic_torch_save(obj, path) -> None:
    """``torch.save`` to a temporary file next to ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def save_checkpoint(path, student, teacher, epoch: int, name: str = "cosmos_fast", **extra) -> Path:
    """Write an official-format two-model checkpoint atomically; returns the path.

    ``student`` / ``teacher`` are modules or state dicts (a ``module.`` prefix on input is
    normalised). ``extra`` entries (``optimizer``, ``scaler``, ...) are stored alongside.
    """
    if not isinstance(epoch, int) or isinstance(epoch, bool):
        raise TypeError(f"epoch must be an int, got {epoch!r}")
    body = {"epoch": epoch, "name": name,
            "student": _plain(_state_dict(student), PREFIX),
            "teacher": _plain(_state_dict(teacher)), **extra}
    atomic_torch_save(body, path)
    return Path(path)


def torch_load(path, map_location="cpu"):
    """``torch.load`` with ``weights_only=True``, falling back (with a warning) for files that hold
    arbitrary pickled objects, such as an argparse namespace."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        log.warning("checkpoint %s is not loadable with weights_only=True (%s); loading it with "
                    "weights_only=False — only do this for files you trust", path,
                    str(e).splitlines()[0])
        return torch.load(path, map_location=map_location, weights_only=False)


def select_state_dict(obj, which: str | None, path="<checkpoint>") -> dict:
    """Pick the model state dict out of a loaded checkpoint body."""
    if not isinstance(obj, Mapping):
        raise TypeError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict")
    if any(k in obj for k in _TWO_MODEL_KEYS):
        if which not in _TWO_MODEL_KEYS:
            raise ValueError(f"checkpoint {path} holds two models {[k for k in _TWO_MODEL_KEYS if k in obj]}; "
                             f"pass which='student' or which='teacher' (got {which!r})")
        if which not in obj:
            raise KeyError(f"checkpoint {path} has no {which!r} entry; entries: {sorted(obj)}")
        return dict(obj[which])
    if "state_dict" in obj or "ema_state_dict" in obj:
        key = "ema_state_dict" if which == "teacher" and "ema_state_dict" in obj else "state_dict"
        return dict(obj[key])
    if not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"checkpoint {path} is neither a COSMOS training file "
                         f"('student'/'teacher'), nor a bare state dict; top-level keys: {sorted(obj)[:20]}")
    return dict(obj)


def check_state_dict(model: nn.Module, sd: Mapping, path="<checkpoint>") -> None:
    """Raise CheckpointMismatchError listing missing, unexpected and wrongly shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [(k, sd[k].shape, own[k].shape) for k in own
                  if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(path, missing, unexpected, mismatched)


def load_checkpoint(path, model: nn.Module, which: str | None = None) -> dict:
    """Load ``which`` model ("student" | "teacher"; required for two-model files) into ``model``.

    Returns the file's metadata (every top-level entry except the model state dicts).
    """
    obj = torch_load(path)
    sd = strip_prefix(select_state_dict(obj, which, path))
    check_state_dict(model, sd, path)
    model.load_state_dict(sd, strict=True)
    if isinstance(obj, Mapping) and not all(torch.is_tensor(v) for v in obj.values()):
        return {k: v for k, v in obj.items()
                if k not in ("student", "teacher", "state_dict", "ema_state_dict")}
    return {}
