"""Run folders and checkpoints: claim the output folder, find the checkpoint a path names (one lookup
for ``--resume``, auto-resume, ``export`` and ``eval``), retention, the resume checks (config
changes that break exact resume) and the RNG state a checkpoint carries.

The two checkpoint formats are written by the engines (:mod:`cosmos_fast.engine`): one process
writes ``checkpoints/epoch_latest.pt`` (and ``epoch_{n}.pt`` at epoch ends) in the official file
format plus the resume state; DeepSpeed writes tag folders ``checkpoints/step_NNNNNNNN/`` named by
``checkpoints/latest``, each complete once it holds ``COMPLETE``.
"""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("cosmos_fast.checkpointing")

# What a run writes into its folder: a new run refuses to start over these without --overwrite.
RUN_OUTPUTS = ("metrics.jsonl", "eval.jsonl", "zero_shot.jsonl", "checkpoints", "tb")
# Config keys whose change breaks exact resume (data order, batch composition, schedule lengths, seeds).
EXACT_RESUME_KEYS = (
    "model.name", "data.backend", "data.train_shards", "data.train_num_samples", "data.batch_size",
    "data.num_workers", "data.resampled", "data.shuffle_buffer", "data.shuffle_initial", "data.caption_mode",
    "data.num_captions", "data.local_crops", "data.crop_scale", "data.global_size", "data.local_size",
    "data.string_fields", "train.seed", "optim.epochs", "optim.warmup", "ema.schedule")


class RunFolderError(ValueError):
    """The output folder cannot take this run (another run's outputs, not a folder, not writable)."""


class ConfigChangeError(ValueError):
    """Resuming with a config whose changes break exact resume."""


# ------------------------------------------------------------------ run folder
def make_output_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--output-dir {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunFolderError(f"--output-dir {out} cannot be created: {e.strerror or e}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise RunFolderError(f"--output-dir {out} is not writable")


def previous_outputs(out: Path) -> list[str]:
    """What another run left in the output folder (an empty metrics.jsonl does not count)."""
    found = []
    for name in RUN_OUTPUTS:
        p = out / name
        if p.is_dir() and any(p.iterdir()) or p.is_file() and p.stat().st_size > 0:
            found.append(name + ("/" if p.is_dir() else ""))
    return found


def claim_output_dir(out: Path, resume, overwrite: bool, is_main: bool) -> None:
    """Refuse to start a new run over another run's outputs unless told to (--overwrite), then
    remove stale temporary files of our own naming (a crash during a checkpoint write)."""
    continuing = resume is not None and _inside(resume, out)
    previous = previous_outputs(out)
    if continuing and overwrite:
        raise RunFolderError(f"--overwrite would delete {resume}, which this run resumes from")
    if previous and not continuing:
        if not overwrite:
            what = f"starting from {resume}" if resume is not None else "a new run"
            raise RunFolderError(
                f"--output-dir {out} holds another run's outputs ({', '.join(previous)}); refusing to "
                f"write {what} over them. Continue that run with --resume {out} (or "
                f"train.auto_resume=true), pick a new --output-dir, or pass --overwrite to delete them")
        if is_main:
            log.warning("--overwrite: deleting the previous run's %s in %s", ", ".join(previous), out)
            for name in previous:
                p = out / name.rstrip("/")
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            for p in out.glob("config.resumed-*.yaml"):
                p.unlink()
    ckpt_dir = out / "checkpoints"
    if is_main and ckpt_dir.is_dir():
        for tmp in [*ckpt_dir.glob(".*.tmp"), *ckpt_dir.glob("step_*/.*.tmp")]:
            log.warning("removing %s, a partial checkpoint write of an interrupted run", tmp)
            tmp.unlink(missing_ok=True)


def _inside(path, folder) -> bool:
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
        return True
    except ValueError:
        return False


# ------------------------------------------------------------------ lookup
def resolve_ds_checkpoint(path: Path) -> Path | None:
    """The complete DeepSpeed tag folder for a run folder, a checkpoints folder or a tag folder."""
    path = Path(path)
    if (path / "COMPLETE").is_file():
        return path
    for ckdir in (path / "checkpoints", path):
        latest = ckdir / "latest"
        if latest.is_file():
            tag_dir = ckdir / latest.read_text().strip()
            if (tag_dir / "COMPLETE").is_file():
                return tag_dir
            raise FileNotFoundError(f"{latest} names {tag_dir.name}, which is incomplete")
    return None


def find_checkpoint(source) -> Path:
    """The checkpoint ``source`` names: a file as is, a DeepSpeed tag folder, or for a run folder (or
    its ``checkpoints/``) the newest complete checkpoint: DeepSpeed's ``latest`` tag, else
    ``epoch_latest.pt``, else the highest ``epoch_N.pt``. FileNotFoundError says what was looked for.
    ``--resume``, ``export`` and ``eval`` all read a folder through this."""
    source = Path(source)
    if source.is_file():
        return source
    if not source.is_dir():
        raise FileNotFoundError(f"checkpoint {source} does not exist")
    tag_dir = resolve_ds_checkpoint(source)
    if tag_dir is not None:
        return tag_dir
    for ckdir in (source / "checkpoints", source):
        if (ckdir / "epoch_latest.pt").is_file():        # rewritten atomically at every save: the newest
            return ckdir / "epoch_latest.pt"
        epochs = [(int(m.group(1)), p) for p in ckdir.glob("epoch_*.pt")
                  if (m := re.fullmatch(r"epoch_(\d+)\.pt", p.name))]
        if epochs:
            return max(epochs)[1]
    raise FileNotFoundError(f"{source} holds no checkpoint: expected a checkpoint file, a run folder with "
                            f"checkpoints/epoch_latest.pt (or epoch_N.pt), or a DeepSpeed folder with a 'latest' tag")


def newest_checkpoint(ckpt_dir: Path, deepspeed: bool) -> Path | None:
    """Auto-resume: this run's newest complete checkpoint of its own format, or None (quietly: an
    incomplete ``latest`` or a file a DeepSpeed run cannot continue exactly is not resumed)."""
    latest = ckpt_dir / "latest"
    if latest.is_file() and (ckpt_dir / latest.read_text().strip() / "COMPLETE").is_file():
        return ckpt_dir / latest.read_text().strip()
    if (ckpt_dir / "epoch_latest.pt").is_file() and not deepspeed:
        return ckpt_dir / "epoch_latest.pt"
    return None


def retention(ckpt_dir: Path, keep_last: int) -> None:
    """Delete all but the ``keep_last`` newest complete DeepSpeed tag folders."""
    tags = sorted(p for p in ckpt_dir.glob("step_*") if (p / "COMPLETE").is_file())
    for old in tags[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------ resume checks
def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_config_change(old: dict | None, new: dict, old_world: int, world: int, source, *,
                        allow: bool, config_path) -> None:
    """Compare the checkpoint's config with this run's: changes that break exact resume are refused
    unless ``allow`` (--allow-config-change); the others are logged."""
    if not old:
        return
    before, now = _flat(old), _flat(new)
    changed = {k: (before[k], now[k]) for k in now if k in before and before[k] != now[k]}
    if old_world != world:
        changed["world size"] = (old_world, world)
    breaking = {k: v for k, v in changed.items() if k in EXACT_RESUME_KEYS or k == "world size"}
    text = lambda items: "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in items.items())   # noqa: E731
    if breaking and not allow:
        raise ConfigChangeError(
            f"--resume {source}: this config changes what exact resume depends on ({text(breaking)}); "
            f"resume with the checkpoint's config ({config_path}), or pass "
            f"--allow-config-change to continue anyway (data order and schedules will differ from an "
            f"uninterrupted run)")
    if changed:
        log.warning("--resume %s with a changed config: %s", source, text(changed))


# ------------------------------------------------------------------ RNG state
def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
