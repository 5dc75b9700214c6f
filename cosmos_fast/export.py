"""``cosmos-fast export --checkpoint RUN_OR_CHECKPOINT --output FILE``: the official single file.

Reads a run folder or its ``checkpoints/`` folder (the newest complete checkpoint: DeepSpeed's
``latest`` tag, else ``epoch_latest.pt``, else the highest ``epoch_N.pt``), one DeepSpeed ``step_*``
tag folder or a single-process checkpoint file. A DeepSpeed student's fp32 weights are consolidated
from the ZeRO partitions with DeepSpeed's ``zero_to_fp32`` on CPU, in one process, whatever the
stage and number of ranks. Writes ``{'epoch', 'name', 'student' ('module.' keys), 'teacher'}`` in
fp32, which the official COSMOS code and :func:`cosmos_fast.load_checkpoint` load. The weights are
checked against a model built from the run's config before anything is written. The file also
records ``cosmos_fast_position`` (step, epoch): ``--resume`` of an exported file on any number of
ranks continues the LR/momentum schedules from there, with fresh AdamW moments and the interrupted
epoch's data order restarted (the way to change the number of ranks mid-run).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from .checkpointing import find_checkpoint
from .model import create_model
from .model.checkpoint import (CheckpointMismatchError, check_deepspeed_files, check_state_dict, save_checkpoint,
                               select_state_dict, strip_prefix, torch_load)

log = logging.getLogger("cosmos_fast.export")


def recorded_model(body) -> str | None:
    """The model name a checkpoint body records (``config.model.name``), or None."""
    cfg = body.get("config") if isinstance(body, Mapping) else None
    name = cfg.get("model", {}).get("name") if isinstance(cfg, Mapping) and isinstance(cfg.get("model"), Mapping) \
        else None
    return name if isinstance(name, str) and name else None


def mismatch_hint(recorded: str | None, used, flag: str) -> str:
    """What to pass when the weights do not fit the model built from ``used``."""
    if recorded is None:
        return f"the file records no model; pass {flag} NAME (ViT-B-16, ViT-B-32, tiny, ...)"
    if recorded != used:
        return f"the checkpoint records model {recorded!r}; pass {flag} {recorded}"
    return f"the checkpoint records model {recorded!r}, which was used"


def check_against(model, sd, path, recorded: str | None, used, flag: str) -> None:
    """:func:`check_state_dict`, with the flag to use appended to a mismatch error."""
    try:
        check_state_dict(model, sd, path)
    except CheckpointMismatchError as e:
        e.args = (f"{e}\n  {mismatch_hint(recorded, used, flag)}",)
        raise


def read_deepspeed(tag_dir, *, trust: bool = False, student: bool = True) -> dict:
    """A DeepSpeed tag folder as a checkpoint body: ``teacher``, ``epoch``, ``step``, ``name``,
    ``config`` from ``teacher.pt`` and, with ``student=True``, the fp32 ``student`` consolidated by
    ``zero_to_fp32`` (DeepSpeed's files are scanned for unsafe objects first)."""
    tag_dir = Path(tag_dir)
    if student:
        check_deepspeed_files(tag_dir, trust=trust)
    meta = torch_load(tag_dir / "teacher.pt", trust=trust)
    if not isinstance(meta, Mapping) or not {"teacher", "epoch", "step", "name", "config"} <= set(meta):
        raise ValueError(f"{tag_dir / 'teacher.pt'} is not a cosmos_fast DeepSpeed teacher file "
                         f"(expected teacher, epoch, step, name and config entries)")
    body = dict(meta)
    if student:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        body["student"] = {k: v.float() for k, v in get_fp32_state_dict_from_zero_checkpoint(
            str(tag_dir.parent), tag=tag_dir.name).items()}
    return body


def export_checkpoint(source, output, model_name: str | None = None, *, trust: bool = False) -> Path:
    """Write ``source`` (a run folder, its checkpoints/ folder, a DeepSpeed tag folder or a checkpoint
    file) as one official-format file.

    Nothing is unpickled beyond tensors, plain containers and a short allow-list unless
    ``trust=True`` (``--trust-checkpoint``): a file that holds other objects raises
    :class:`~cosmos_fast.model.checkpoint.UntrustedCheckpointError` (DeepSpeed's own files, which
    ``zero_to_fp32`` unpickles in full, are scanned first without executing them).
    """
    path = find_checkpoint(source)
    if path.is_dir():
        body = read_deepspeed(path, trust=trust)
        position = {"step": int(body["step"]), "epoch": int(body["epoch"])}
    else:
        body = torch_load(path, trust=trust)
        if not isinstance(body, Mapping):
            raise ValueError(f"checkpoint {path} holds a {type(body).__name__}, not a dict")
        trainer = body.get("trainer") or {}
        position = {"step": int(trainer["step"]), "epoch": int(trainer["epoch"])} if "step" in trainer else None
    student = select_state_dict(body, "student", path)
    teacher = select_state_dict(body, "teacher", path) if "teacher" in body else student
    epoch, name = int(body.get("epoch", 0)), body.get("name", "cosmos_fast")
    recorded = recorded_model(body)
    model_name = model_name or recorded
    if model_name is None:
        raise ValueError(f"{path} does not record its model; pass --model-name NAME (ViT-B-16, ViT-B-32, tiny, ...)")
    model = create_model(model_name, device="meta")
    checked = {}
    for which, sd in (("student", student), ("teacher", teacher)):
        sd = strip_prefix(sd)
        sd = {k: (v.reshape(()) if k.endswith("logit_scale") and v.numel() == 1 else v.float())
              for k, v in sd.items()}
        check_against(model, sd, f"{path} ({which})", recorded, model_name, "--model-name")
        checked[which] = sd
    extra = {"cosmos_fast_position": position} if position else {}
    out = save_checkpoint(output, checked["student"], checked["teacher"], epoch=epoch, name=name, **extra)
    log.info("exported %s (%s, epoch %d) to %s", path, model_name, epoch, out)
    return out
