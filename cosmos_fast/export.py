"""``cosmos-fast export --checkpoint RUN_OR_CHECKPOINT --output FILE``: the official single file.

Reads a DeepSpeed checkpoint folder (a run folder, its ``checkpoints/`` folder or one
``step_*`` tag) — the student's fp32 weights are consolidated from the ZeRO partitions with
DeepSpeed's ``zero_to_fp32`` on CPU, in one process, whatever the stage and number of ranks — or a
single-process checkpoint file, and writes ``{'epoch', 'name', 'student' ('module.' keys),
'teacher'}`` in fp32, which the official COSMOS code and :func:`cosmos_fast.load_checkpoint` load.
The weights are checked against a model built from the run's config before anything is written.
The file also records ``cosmos_fast_position`` (step, epoch): ``--resume`` of an exported file on
any number of ranks continues the LR/momentum schedules from there, with fresh AdamW moments and
the interrupted epoch's data order restarted (the way to change the number of ranks mid-run).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from .model import create_model
from .model.checkpoint import (check_deepspeed_files, check_state_dict, save_checkpoint, select_state_dict,
                               strip_prefix, torch_load)

log = logging.getLogger("cosmos_fast.export")


def export_checkpoint(source, output, model_name: str | None = None, *, trust: bool = False) -> Path:
    """Write ``source`` (a DeepSpeed run/tag folder or a checkpoint file) as one official-format file.

    Nothing is unpickled beyond tensors, plain containers and a short allow-list unless
    ``trust=True`` (``--trust-checkpoint``): a file that holds other objects raises
    :class:`~cosmos_fast.model.checkpoint.UntrustedCheckpointError` (DeepSpeed's own files, which
    ``zero_to_fp32`` unpickles in full, are scanned first without executing them).
    """
    from .trainer import resolve_ds_checkpoint

    source = Path(source)
    tag_dir = resolve_ds_checkpoint(source) if source.is_dir() else None
    if tag_dir is not None:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        check_deepspeed_files(tag_dir, trust=trust)
        meta = torch_load(tag_dir / "teacher.pt", trust=trust)
        if not isinstance(meta, Mapping) or not {"teacher", "epoch", "step", "name", "config"} <= set(meta):
            raise ValueError(f"export: {tag_dir / 'teacher.pt'} is not a cosmos_fast DeepSpeed teacher file "
                             f"(expected teacher, epoch, step, name and config entries)")
        student = {k: v.float() for k, v in get_fp32_state_dict_from_zero_checkpoint(
            str(tag_dir.parent), tag=tag_dir.name).items()}
        teacher, epoch, name = meta["teacher"], int(meta["epoch"]), meta["name"]
        position = {"step": int(meta["step"]), "epoch": epoch}
        model_name = model_name or meta["config"]["model"]["name"]
    else:
        if not source.is_file():
            raise FileNotFoundError(f"export: {source} is neither a checkpoint file nor a DeepSpeed checkpoint folder")
        body = torch_load(source, trust=trust)
        if not isinstance(body, Mapping):
            raise ValueError(f"export: checkpoint {source} holds a {type(body).__name__}, not a dict")
        student = select_state_dict(body, "student", source)
        teacher = select_state_dict(body, "teacher", source) if "teacher" in body else student
        epoch, name = int(body.get("epoch", 0)), body.get("name", "cosmos_fast")
        trainer = body.get("trainer") or {}
        position = {"step": int(trainer["step"]), "epoch": int(trainer["epoch"])} if "step" in trainer else None
        model_name = model_name or (body.get("config") or {}).get("model", {}).get("name")
        if model_name is None:
            raise ValueError(f"export: {source} does not record its model; pass --model-name")
    model = create_model(model_name, device="meta")
    checked = {}
    for which, sd in (("student", student), ("teacher", teacher)):
        sd = strip_prefix(sd)
        sd = {k: (v.reshape(()) if k.endswith("logit_scale") and v.numel() == 1 else v.float())
              for k, v in sd.items()}
        check_state_dict(model, sd, f"{source} ({which})")
        checked[which] = sd
    extra = {"cosmos_fast_position": position} if position else {}
    path = save_checkpoint(output, checked["student"], checked["teacher"], epoch=epoch, name=name, **extra)
    log.info("exported %s (%s, epoch %d) to %s", source, model_name, epoch, path)
    return path
