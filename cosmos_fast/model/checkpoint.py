"""Checkpoint files in the official COSMOS format.

Written: ``{'epoch': int, 'name': str, 'student': {'module.'+key: tensor}, 'teacher': {key: tensor},
**extra}`` — student keys carry the ``module.`` prefix of the official (DDP) files, teacher keys are
bare, so the official ``main.py`` and the segmentation loader read our files unchanged. Writes are
atomic: the file is written to a temporary name in the same folder, fsync'ed, then renamed.

Read: official training files (either model, ``module.`` stripped wherever present), files with the
``state_dict`` / ``ema_state_dict`` layout, and bare state dicts. Unpickling an arbitrary object can
run code, so files are read with ``torch.load(weights_only=True)``: tensors, plain containers and the
few types :func:`_safe_globals` lists (numpy arrays and scalars, ``argparse.Namespace``, paths),
allowed only for the duration of the call. A file that needs anything else raises
:class:`UntrustedCheckpointError` naming it; ``trust=True`` (``--trust-checkpoint``) unpickles it in
full, for files whose origin the user vouches for.
"""
from __future__ import annotations

import contextlib
import logging
import os
import pickle
import tempfile
import warnings
import zipfile
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


class CheckpointReadError(ValueError):
    """A checkpoint file that could not be read (see the two subclasses)."""


class CorruptCheckpointError(CheckpointReadError):
    """Not a readable PyTorch checkpoint: empty, truncated, or not a ``torch.save`` file at all."""

    def __init__(self, path, reason: str):
        self.path = Path(path)
        super().__init__(f"checkpoint {path} is not a readable PyTorch checkpoint (truncated, corrupt or not a "
                         f"torch.save file): {reason}")


class UntrustedCheckpointError(CheckpointReadError):
    """A checkpoint that holds pickled objects outside the allow-list; loading it could run code."""

    def __init__(self, path, unsafe: list[str], reason: str = ""):
        self.path, self.unsafe = Path(path), list(unsafe)
        what = (f"pickled objects of types outside the allow-list ({', '.join(self.unsafe)})" if self.unsafe
                else f"pickle data the weights-only reader refuses ({reason or 'unknown reason'})")
        super().__init__(f"checkpoint {path} holds {what}; unpickling it could run arbitrary code, so it was not "
                         f"loaded. If you trust this file and its origin, pass --trust-checkpoint "
                         f"(trust=True in Python) to load it in full")


def _safe_globals() -> list:
    """What our own and the official files may hold beyond tensors and plain containers: numpy
    arrays, scalars and dtypes (RNG states, older files; numpy 1 and 2 module names),
    ``argparse.Namespace`` (training args) and paths. Constructing any of these runs no code."""
    import argparse
    import pathlib

    import numpy as np

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    out = [argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath, pathlib.PureWindowsPath,
           np.ndarray, np.dtype]
    out += [getattr(np.dtypes, name) for name in getattr(getattr(np, "dtypes", None), "__all__", ())]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out += [(multiarray._reconstruct, f"{module}._reconstruct"), (multiarray.scalar, f"{module}.scalar")]
    return out


def _unsafe_globals(path) -> list[str] | None:
    """Globals a zip-format ``torch.save`` file names outside the allow-list, found by reading its
    pickle without executing it; None when the file cannot be scanned (legacy format, protocol > 2)."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:      # noqa: BLE001 — a scan is best effort; the caller has the loader's reason
        return None


def _weights_only_reason(e: BaseException) -> str:
    """The loader's own reason from torch's long weights-only error message, on one short line."""
    text = str(e).split("WeightsUnpickler error:")[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = lines[0].split(" Please use ")[0].split(" This is an internal ")[0] if lines else ""
    return (reason if len(reason) <= 200 else reason[:200] + " …") or type(e).__name__


def _describe(e: BaseException) -> str:
    reason = _weights_only_reason(e)
    return reason if reason == type(e).__name__ else f"{type(e).__name__}: {reason}"


def _looks_like_pickle(path: Path) -> bool:
    """A zip archive (``torch.save``) or a pickle stream (legacy ``torch.save``, plain pickle)."""
    with open(path, "rb") as fh:
        head = fh.read(2)
    return zipfile.is_zipfile(path) or (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


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


def torch_load(path, map_location="cpu", *, trust: bool = False):
    """``torch.load`` that never unpickles arbitrary objects unless ``trust=True``.

    The file is read with ``weights_only=True`` and the allow-list :func:`_safe_globals`, scoped to
    this call. When that fails because the file holds other objects, :class:`UntrustedCheckpointError`
    names the file and the offending types (found without executing anything) — or, with
    ``trust=True``, the file is unpickled in full (it can run arbitrary code). Anything that is not a
    readable checkpoint raises :class:`CorruptCheckpointError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CorruptCheckpointError(path, "the file is empty")
    try:
        with torch.serialization.safe_globals(_safe_globals()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")   # our error says more
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if not _looks_like_pickle(path):
            raise CorruptCheckpointError(path, _weights_only_reason(e)) from None
        reason = _weights_only_reason(e)
        unsafe = _unsafe_globals(path) or []
        if not trust:
            raise UntrustedCheckpointError(path, unsafe, reason) from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 — EOFError, zip reader RuntimeError, KeyError, decode errors, ...
        raise CorruptCheckpointError(path, _describe(e)) from e
    log.warning("checkpoint %s: loading it with full unpickling (--trust-checkpoint); it holds %s", path,
                ", ".join(unsafe) if unsafe else reason)
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CorruptCheckpointError(path, _describe(e)) from e


def check_unpickle_safe(path, allowed=(), *, trust: bool = False) -> None:
    """Refuse a ``torch.save`` file that a third-party loader will unpickle in full (DeepSpeed reads
    its own model and optimizer files with ``weights_only=False``) unless every global it names is
    allow-listed: :func:`_safe_globals` plus ``allowed`` (``"module.qualname"`` strings of types
    that run no code when rebuilt). The scan reads the pickle without executing it and refuses
    anything it cannot read (legacy format, pickle instructions the weights-only reader lacks).
    ``trust=True`` skips the check."""
    path = Path(path)
    if trust:
        return
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except pickle.UnpicklingError as e:
        raise UntrustedCheckpointError(path, [], f"{e}".splitlines()[0]) from None
    except ValueError as e:       # not a zip-format torch.save file (legacy, plain pickle, TorchScript)
        if not _looks_like_pickle(path):
            raise CorruptCheckpointError(path, str(e)) from None
        raise UntrustedCheckpointError(path, [], "a legacy, plain-pickle or TorchScript file, which cannot be "
                                                 "checked without executing it") from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CorruptCheckpointError(path, _describe(e)) from e
    unsafe = sorted(set(names) - set(allowed))
    if unsafe:
        raise UntrustedCheckpointError(path, unsafe)


# Types DeepSpeed 0.19 pickles into its own model and optimizer files: measured on our ZeRO-0..3 fp32
# runs (CPU); DynamicLossScaler (fp16) and the bf16 optimizer's records read from its source. An enum,
# loss-scaler records and a dataclass: rebuilding them runs no code.
DEEPSPEED_GLOBALS = ("deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                     "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                     "deepspeed.utils.tensor_fragment.fragment_address")


def check_deepspeed_files(tag_dir, *, trust: bool = False) -> None:
    """:func:`check_unpickle_safe` on every ``*.pt`` file of a DeepSpeed tag folder, before
    DeepSpeed (or ``zero_to_fp32``) unpickles them in full."""
    for path in sorted(Path(tag_dir).glob("*.pt")):
        check_unpickle_safe(path, DEEPSPEED_GLOBALS, trust=trust)


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


def load_checkpoint(path, model: nn.Module, which: str | None = None, *, trust: bool = False) -> dict:
    """Load ``which`` model ("student" | "teacher"; required for two-model files) into ``model``.

    Returns the file's metadata (every top-level entry except the model state dicts). ``trust=True``
    allows full unpickling (the file can run arbitrary code); see :func:`torch_load`.
    """
    obj = torch_load(path, trust=trust)
    sd = strip_prefix(select_state_dict(obj, which, path))
    check_state_dict(model, sd, path)
    model.load_state_dict(sd, strict=True)
    if isinstance(obj, Mapping) and not all(torch.is_tensor(v) for v in obj.values()):
        return {k: v for k, v in obj.items()
                if k not in ("student", "teacher", "state_dict", "ema_state_dict")}
    return {}
