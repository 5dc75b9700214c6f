"""The engines: the primitives the COSMOS step (:mod:`cosmos_fast.step`) and the trainer use, for one
process (:class:`LocalEngine`) or DeepSpeed ZeRO (:class:`DeepSpeedEngine`), behind one interface.

Both hold the student, the fp32 EMA teacher and the optimizer, and offer: ``zero_grad()``,
``forward_context()`` (autocast or none), ``inputs(crops)``, ``model`` (what the student forward
calls), ``teacher_forward`` / ``teacher_context()``, ``backward(loss)``, ``ema(momentum)``,
``optimizer_step() -> overflow``, ``clamp()``, ``set_lr(lr)``, ``gathered(module)``,
``full_state_dict(module)`` / ``load_full_state_dict(module, sd)``, ``local_values(p)`` and their
checkpoint format: ``save(...)`` / ``load_training_state(...)``.

* :class:`LocalEngine` — CPU or one GPU: autocast, the fp16 GradScaler, gradient clipping; the
  checkpoint is one file in the official format plus the resume state
  (``checkpoints/epoch_latest.pt``, ``epoch_{n}.pt`` at epoch ends).
* :class:`DeepSpeedEngine` — DeepSpeed ZeRO 0–3.

DeepSpeed. Launch: ``deepspeed [--hostfile H] [--num_gpus N] --module cosmos_fast.train --config X
...`` on a cluster, ``DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module cosmos_fast.train ...`` on
CPU (gloo), or ``torchrun``. :func:`init_distributed` reads RANK / WORLD_SIZE / LOCAL_RANK (or
``--local_rank``) and initialises the process group with a collective timeout, so a hung rank
fails with a timeout error instead of hanging silently.

* The DeepSpeed JSON is generated from the config (:func:`deepspeed_config`): micro batch × world
  = global batch, gradient accumulation 1, ZeRO stage, bf16/fp16 (fp16 with dynamic loss
  scaling), clipping. The optimizer is ours (official parameter groups), and the LR and momentum
  schedules stay client-side so they match the official ones exactly.
* Teacher. ZeRO-0/1/2: a replicated fp32 copy updated from the replicated student parameters (no
  communication; with bf16 parameters the EMA reads the bf16 student weights upcast to fp32 — the
  fp32 teacher still moves, see the test). ZeRO-3: the fp32 teacher is partitioned exactly like the
  student (``deepspeed.zero.Init(module=teacher, dtype=float32)`` on a copy made before the
  student is partitioned), so each rank's ``ds_tensor`` shard lines up with the student's and the
  EMA runs shard by shard with ``torch._foreach`` ops. The teacher's forward gathers its weights
  with ``GatheredParameters``; it is never registered with an engine, so no parameter stays
  resident (the persistence-threshold catch cannot arise) and it never has optimizer state.
* Logit scales are clamped on the engine's fp32 master copies (``safe_set_full_fp32_param``) as
  well as on the working parameters, so the clamp persists exactly as in the official code.
* Checkpoint: DeepSpeed's own files (engine, optimizer partitions) + per-rank trainer state + the
  consolidated fp32 teacher, in ``checkpoints/step_NNNNNNNN/`` (see :meth:`DeepSpeedEngine.save`).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpointing import retention
from .config import OPTIMIZERS
from .ema import SCALE_NAMES, clamp_logit_scales, ema_update
from .fused_update import FusedEmaAdamW
from .model.checkpoint import atomic_torch_save, check_deepspeed_files, save_checkpoint, torch_load
from .model.cosmos import LOGIT_SCALE_MAX
from .optim import build_adamw, param_groups

log = logging.getLogger("cosmos_fast.engine")

# train.precision → the autocast dtype (None: fp32, no autocast)
AMP_DTYPES = {"fp32": None, "amp_bf16": torch.bfloat16, "amp_fp16": torch.float16}


class LocalEngine:
    """One process on CPU or one GPU: autocast, the fp16 GradScaler, the optimizer, gradient clipping.

    ``autocast``: a context entered around the forward and the loss (None: none); ``scaler``: a
    ``torch.amp.GradScaler`` for fp16 (None: none); ``grad_clip_norm``: clip the global norm.

    With a :class:`cosmos_fast.fused_update.FusedEmaAdamW` optimizer (``fused_ema``), the official
    order's EMA runs inside the optimizer's pass (:meth:`optimizer_step` with ``ema_momentum``)."""

    name = "single process"
    stage = 0
    writes_files = True            # its checkpoint is a file: resuming one restores everything

    def __init__(self, student, teacher, optimizer, *, autocast=None, scaler=None,
                 grad_clip_norm: float | None = None):
        self.student, self.teacher, self.optimizer = student, teacher, optimizer
        self.autocast, self.scaler, self.grad_clip_norm = autocast, scaler, grad_clip_norm
        self.model = student                   # what the student forward calls
        self.teacher_forward = teacher
        self.fused_ema = isinstance(optimizer, FusedEmaAdamW)

    # -- the step's primitives
    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def forward_context(self):
        return self.autocast if self.autocast is not None else contextlib.nullcontext()

    def inputs(self, crops: list) -> list:
        return crops

    def teacher_context(self):
        return None

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def ema(self, momentum: float) -> None:
        if self.fused_ema:
            self.optimizer.ema(momentum)          # the same formula over the flat buffers
        else:
            ema_update(self.teacher, self.student, momentum)

    def optimizer_step(self, ema_momentum: float | None = None) -> bool:
        """Clip (after unscaling), step; True when the fp16 scaler found inf/nan gradients and skipped it.
        ``ema_momentum`` (fused optimizer only): the teacher EMA from the current student weights runs
        first, in the optimizer's pass — and on its own when the scaler skips the step."""
        if ema_momentum is not None:
            self.optimizer.set_ema(ema_momentum)
        if self.grad_clip_norm is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.grad_clip_norm)
        if self.scaler is None:
            self.optimizer.step()
            return False
        scale_before = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if ema_momentum is not None:
            self.optimizer.ema()                  # still queued only if the scaler skipped the step
        return self.scaler.get_scale() < scale_before

    def clamp(self) -> None:
        clamp_logit_scales(self.student, self.teacher)

    def set_lr(self, lr: float) -> None:
        """A tensor LR (the CUDA-graph step's capturable optimizer) is filled in place: the graph reads it."""
        for group in self.optimizer.param_groups:
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    # -- weights
    def gathered(self, module):
        return contextlib.nullcontext()

    def full_state_dict(self, module) -> dict:
        return full_state_dict(module, 0)

    def load_full_state_dict(self, module, sd: dict) -> None:
        load_full_state_dict(module, sd, 0)

    def local_values(self, p) -> torch.Tensor:
        return p.detach()

    # -- checkpoint format: one file in the official format plus the resume state
    def save(self, ckpt_dir: Path, *, trainer_state: dict, epoch: int, step: int, name: str, config: dict,
             epoch_file: bool = False, keep_last: int = 0) -> Path:
        """``epoch_latest.pt`` (and ``epoch_{epoch}.pt`` when ``epoch_file``); returns the latest file."""
        extra = {"optimizer": self.optimizer.state_dict(), "trainer": trainer_state, "config": config}
        if self.scaler is not None:
            extra["scaler"] = self.scaler.state_dict()
        path = save_checkpoint(ckpt_dir / "epoch_latest.pt", self.student, self.teacher, epoch=epoch, name=name,
                               **extra)
        if epoch_file:
            save_checkpoint(ckpt_dir / f"epoch_{epoch}.pt", self.student, self.teacher, epoch=epoch, name=name,
                            **extra)
        return path

    def load_tag(self, tag_dir: Path, *, trust: bool, check_config) -> dict:
        raise ValueError(f"--resume {tag_dir} is a DeepSpeed checkpoint: launch with distributed.backend="
                         f"deepspeed, or convert it with `cosmos-fast export` and resume from that file")

    def load_training_state(self, body: dict) -> None:
        """The optimizer (and fp16 scaler) state of a file this engine wrote."""
        self.optimizer.load_state_dict(body["optimizer"])
        for group in self.optimizer.param_groups:     # a CUDA-graph run's file: a plain LR, not capturable
            if torch.is_tensor(group["lr"]):
                group["lr"] = float(group["lr"])
            if group.get("capturable"):
                group["capturable"] = False
        if self.scaler is not None and "scaler" in body:
            self.scaler.load_state_dict(body["scaler"])


class DeepSpeedEngine:
    """DeepSpeed ZeRO 0–3 over the student, with the fp32 teacher replicated (ZeRO 0–2) or
    partitioned like the student (ZeRO-3); see the module docstring."""

    name = "DeepSpeed"
    writes_files = False           # its checkpoint is a tag folder; a file gives it weights only
    fused_ema = False              # its engine owns the optimizer: the EMA is a pass of its own

    def __init__(self, cfg, student, teacher, optimizer, *, rank: int, world: int, amp_dtype=None,
                 config_out: Path | None = None):
        import deepspeed                  # optional heavy dependency: only a DeepSpeed run gets here

        self.stage, self.rank, self.world, self.amp_dtype = cfg.distributed.zero_stage, rank, world, amp_dtype
        self.ds_config = deepspeed_config(cfg, world)
        if self.stage == 3:
            partition_teacher(teacher, self.ds_config)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(model=student, optimizer=optimizer,
                                                             config=self.ds_config)
        self.student, self.teacher = self.ds.module, teacher
        self.model = self.ds
        self.teacher_forward = _Fp32Inputs(teacher)
        if config_out is not None:
            config_out.write_text(json.dumps(self.ds_config, indent=2))

    # -- the step's primitives
    def zero_grad(self) -> None:
        """DeepSpeed zeroes the gradients in its own step."""

    def forward_context(self):
        return contextlib.nullcontext()

    def inputs(self, crops: list) -> list:
        if self.amp_dtype is not None:                   # DeepSpeed bf16/fp16 keeps 16-bit weights
            return [c.to(self.amp_dtype) for c in crops]
        return crops

    def teacher_context(self):
        return gathered(self.teacher, self.stage == 3)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def ema(self, momentum: float) -> None:
        ema_update_zero(self.teacher, self.student, momentum, self.stage)

    def optimizer_step(self) -> bool:
        self.ds.step()
        return not self.ds.was_step_applied()

    def clamp(self) -> None:
        clamp_scales_zero(self.ds, self.teacher, self.stage, LOGIT_SCALE_MAX)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # -- weights
    def gathered(self, module):
        return gathered(module, self.stage == 3)

    def full_state_dict(self, module) -> dict:
        return full_state_dict(module, self.stage)

    def load_full_state_dict(self, module, sd: dict) -> None:
        load_full_state_dict(module, sd, self.stage)

    def local_values(self, p) -> torch.Tensor:
        """A parameter's values held by this rank: the whole tensor, or under ZeRO-3 the valid part
        of its partition (the last partitions are padded with uninitialised memory)."""
        part = getattr(p, "ds_tensor", None)
        if part is None:
            return p.detach()
        n = part.numel()
        valid = max(0, min(n, int(p.ds_numel) - self.rank * n))
        return part.detach().reshape(-1)[:valid]

    # -- checkpoint format: a tag folder
    def save(self, ckpt_dir: Path, *, trainer_state: dict, epoch: int, step: int, name: str, config: dict,
             epoch_file: bool = False, keep_last: int = 0) -> Path:
        """DeepSpeed's own files (engine, optimizer partitions) + per-rank trainer state + the
        consolidated fp32 teacher, in ``checkpoints/step_NNNNNNNN/``. The folder counts only once
        rank 0 has written ``COMPLETE`` after every rank finished, and ``latest`` is replaced
        atomically after that, so a crash mid-save leaves the previous checkpoint the newest. The
        ``keep_last`` newest complete folders are kept."""
        tag = f"step_{step:08d}"
        tag_dir = ckpt_dir / tag
        self.ds.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False, client_state={"step": step, "epoch": epoch})
        atomic_torch_save({"trainer": trainer_state, "world": self.world}, tag_dir / f"trainer_rank{self.rank:05d}.pt")
        teacher_sd = full_state_dict(self.teacher, self.stage)        # collective under ZeRO-3
        if self.rank == 0:
            atomic_torch_save({"teacher": teacher_sd, "epoch": epoch, "step": step, "name": name, "config": config},
                              tag_dir / "teacher.pt")
        dist.barrier()
        if self.rank == 0:
            (tag_dir / "COMPLETE").write_text(json.dumps({"step": step, "epoch": epoch, "world": self.world,
                                                          "zero_stage": self.stage}))
            tmp = ckpt_dir / ".latest.tmp"
            tmp.write_text(tag)
            tmp.replace(ckpt_dir / "latest")
            retention(ckpt_dir, keep_last)
        dist.barrier()
        return tag_dir

    def load_training_state(self, body: dict) -> None:
        raise NotImplementedError("a single-process file cannot restore DeepSpeed optimizer partitions")

    def load_tag(self, tag_dir: Path, *, trust: bool, check_config) -> dict:
        """Resume from a complete tag folder this run's world wrote: the engine's own files, the
        teacher and this rank's trainer state (returned). ``check_config(old_config, old_world,
        source)`` is called before anything is loaded."""
        info = json.loads((tag_dir / "COMPLETE").read_text())
        if info["world"] != self.world:
            raise ValueError(f"checkpoint {tag_dir} was written by {info['world']} ranks, this run has "
                             f"{self.world}: export it (`cosmos-fast export`) and --resume from the "
                             f"consolidated file to continue from its weights")
        check_deepspeed_files(tag_dir, trust=trust)     # DeepSpeed unpickles its files in full
        teacher = torch_load(tag_dir / "teacher.pt", trust=trust)
        check_config(teacher.get("config"), info["world"], tag_dir)
        self.ds.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_lr_scheduler_states=False)
        load_full_state_dict(self.teacher, teacher["teacher"], self.stage)
        return torch_load(tag_dir / f"trainer_rank{self.rank:05d}.pt", trust=trust)["trainer"]


class _Fp32Inputs:
    """Calls the fp32 teacher with fp32 images even when the student runs on 16-bit inputs."""

    def __init__(self, teacher):
        self.teacher = teacher

    def __call__(self, images, captions):
        return self.teacher(images.float(), captions)


def build_engine(cfg, student, teacher, device: torch.device, *, rank: int = 0, world: int = 1,
                 deepspeed: bool = False, config_out: Path | None = None):
    """The engine the config asks for, with the configured optimizer over the student."""
    fused, why = fused_update_enabled(cfg, deepspeed)
    if fused:
        o = cfg.optim
        optimizer = FusedEmaAdamW(student, teacher, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                  weight_decay=o.weight_decay)
        log.info("optim.fused_update: teacher EMA + AdamW in one pass over flat fp32 buffers (%s)", why)
    else:
        optimizer = build_optimizer(cfg, student)
        log.info("optim.fused_update off: %s", why)
    amp_dtype = AMP_DTYPES[cfg.train.precision]
    if deepspeed:
        return DeepSpeedEngine(cfg, student, teacher, optimizer, rank=rank, world=world, amp_dtype=amp_dtype,
                               config_out=config_out)
    return LocalEngine(student, teacher, optimizer,
                       autocast=torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else None,
                       scaler=torch.amp.GradScaler("cuda") if cfg.train.precision == "amp_fp16" else None,
                       grad_clip_norm=cfg.optim.grad_clip_norm)


def fused_update_enabled(cfg, deepspeed: bool) -> tuple[bool, str]:
    """Whether ``optim.fused_update`` resolves on for this run, and why (for the log)."""
    mode, o = cfg.optim.fused_update, cfg.distributed.optimizer
    if mode == "off":
        return False, "optim.fused_update = off"
    if deepspeed:
        return False, "DeepSpeed's engine owns the optimizer and its partitions"
    if o != "torch_adamw":
        return False, f"distributed.optimizer = {o!r}"
    return True, f"optim.fused_update = {mode}"


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    return rank, world, local


def wants_deepspeed(cfg) -> bool:
    b = cfg.distributed.backend
    return b == "deepspeed" or (b == "auto" and env_world()[1] > 1)


def init_distributed(cfg, local_rank: int | None = None) -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed; returns (rank, world, local_rank)."""
    import deepspeed                      # optional heavy dependency: only a DeepSpeed run gets here

    if local_rank is not None and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(local_rank)
    if not cfg.distributed.shm_comm:
        # the shared-memory comm op JIT-compiles for ~60 s on first use; plain gloo is equivalent
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        backend = cfg.distributed.dist_backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend,
                                   timeout=datetime.timedelta(minutes=cfg.distributed.timeout_minutes))
    rank, world, local = dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return rank, world, local


def deepspeed_config(cfg, world: int) -> dict:
    """The DeepSpeed JSON for this run, generated from the config so nothing can disagree."""
    d, t, z = cfg.data, cfg.train, cfg.distributed
    zero = {"stage": z.zero_stage, "contiguous_gradients": True,
            "overlap_comm": torch.cuda.is_available(), "reduce_bucket_size": 5e7}
    if z.zero_stage == 3:
        zero.update({"stage3_param_persistence_threshold": z.stage3_persistence_threshold,
                     "stage3_prefetch_bucket_size": 5e7, "stage3_max_live_parameters": 1e9})
    return {
        "train_micro_batch_size_per_gpu": d.batch_size,
        "train_batch_size": d.batch_size * world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": AMP_DTYPES[t.precision] == torch.bfloat16},
        "fp16": {"enabled": AMP_DTYPES[t.precision] == torch.float16, "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 2000, "hysteresis": 2, "min_loss_scale": 1},
        "gradient_clipping": cfg.optim.grad_clip_norm or 0.0,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def build_optimizer(cfg, model):
    """The configured optimizer over the official parameter groups."""
    o, name = cfg.optim, cfg.distributed.optimizer
    kw = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    if name == "torch_adamw":
        extra = {"fused": True} if next(model.parameters()).is_cuda else {}
        return build_adamw(model, weight_decay=o.weight_decay, **kw, **extra)
    if name == "deepspeed_fused_adam":
        from deepspeed.ops.adam import FusedAdam          # optional heavy dependency: imported when chosen

        return FusedAdam(param_groups(model, o.weight_decay), adam_w_mode=True, **kw)
    if name == "apex_fused_adam":
        try:
            from apex.optimizers import FusedAdam as ApexFusedAdam    # optional (a cluster build)
        except ImportError as e:
            raise RuntimeError("distributed.optimizer = apex_fused_adam but NVIDIA apex is not installed "
                               "(a cluster build; see README)") from e
        return ApexFusedAdam(param_groups(model, o.weight_decay), adam_w_mode=True, **kw)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")


def partition_teacher(teacher, ds_cfg: dict):
    """Partition an fp32 teacher like the student under ZeRO-3 (same shapes, order and world)."""
    import deepspeed                      # optional heavy dependency

    cfg = {**ds_cfg, "zero_optimization": {**ds_cfg["zero_optimization"], "stage3_param_persistence_threshold": 0}}
    deepspeed.zero.Init(module=teacher, config_dict_or_path=cfg, dtype=torch.float32)
    return teacher


@contextlib.contextmanager
def gathered(module, enabled: bool = True):
    """Gather a ZeRO-3 partitioned module's weights for the duration of the block (a collective:
    every rank enters it together). The one ZeRO-3 gather of the package (training's saves, checks and
    held-out eval; ``cosmos-fast eval``).

    Only parameters that are partitioned and not already held by an outer ``GatheredParameters``
    (DeepSpeed refuses overlapping nested gathers) are gathered, so this is a no-op for a plain
    model, for ZeRO-0/1/2 and inside an outer gather. It also covers the teacher, which is
    partitioned but never registered with an engine (no fetch hooks), and the root parameters
    (positional embedding, text projection) that ``encode_*`` use without the root's forward hook.
    """
    params = [p for p in module.parameters() if _needs_gather(p)] if enabled else []
    if not params:
        yield
        return
    import deepspeed                      # optional heavy dependency: only a ZeRO-3 partitioned model gets here

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def _needs_gather(p) -> bool:
    if not hasattr(p, "ds_id"):
        return False
    from deepspeed.runtime.zero import partition_parameters as zp   # optional heavy dependency

    depth = getattr(p, getattr(zp, "DS_Z3_GATHERED_PARAM_CONTEXT_DEPTH_ATTR", "_ds_z3_gathered_param_context_depth"), 0)
    return p.ds_status == zp.ZeroParamStatus.NOT_AVAILABLE and not depth


def _named(model):
    return dict(model.named_parameters())


@torch.no_grad()
def ema_update_zero(teacher, student, momentum: float, stage: int) -> None:
    """θ_T ← m·θ_T + (1 − m)·θ_S without communication; shard by shard under ZeRO-3."""
    if stage < 3:
        ema_update(teacher, student, momentum)
        return
    tp, sp = _named(teacher), _named(student)
    if tp.keys() != sp.keys():
        raise ValueError("teacher and student parameter names differ")
    t_sh = [tp[n].ds_tensor for n in tp]
    s_sh = [sp[n].ds_tensor.to(tp[n].ds_tensor.dtype) for n in tp]
    for n, a, b in zip(tp, t_sh, s_sh):
        if a.numel() != b.numel():
            raise RuntimeError(f"ZeRO-3 shards of {n} do not line up: teacher {a.numel()} vs student {b.numel()}")
    torch._foreach_mul_(t_sh, momentum)
    torch._foreach_add_(t_sh, s_sh, alpha=1.0 - momentum)


@torch.no_grad()
def clamp_scales_zero(engine, teacher, stage: int, max_value: float) -> None:
    """Clamp both logit scales on the student (working copy and fp32 master) and the teacher."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param   # optional heavy dependency

    for name in SCALE_NAMES:
        p = getattr(engine.module, name)
        master = safe_get_full_fp32_param(p)
        if master is not None and not bool(((master >= 0) & (master <= max_value)).all()):
            safe_set_full_fp32_param(p, master.clamp(0.0, max_value))
        for q in (p, getattr(teacher, name)):
            (q.ds_tensor if stage == 3 else q.data).clamp_(0.0, max_value)


def full_state_dict(module, stage: int) -> dict:
    """A consolidated CPU state dict (gathers ZeRO-3 partitions; every rank must call it)."""
    with gathered(module, stage == 3):
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


@torch.no_grad()
def load_full_state_dict(module, sd: dict, stage: int) -> None:
    """Load a consolidated state dict into a (possibly ZeRO-3 partitioned) module; collective."""
    if stage < 3:
        module.load_state_dict(sd)
        return
    import deepspeed                      # optional heavy dependency: only ZeRO-3 gets here

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
        if dist.get_rank() == 0:
            module.load_state_dict(sd)


def memory_plan(n_params: int, stage: int, world: int, precision: str) -> dict:
    """Bytes per rank of student weights, gradients, optimizer state and the fp32 teacher."""
    half = AMP_DTYPES[precision] is not None
    w = 2 if half else 4
    weights = n_params * w / (world if stage == 3 else 1)
    grads = n_params * w / (world if stage >= 2 else 1)
    optim = n_params * (12 if half else 8) / (world if stage >= 1 else 1)   # fp32 master (half) + 2 moments
    teacher = n_params * 4 / (world if stage == 3 else 1)
    return {"student_weights": weights, "gradients": grads, "optimizer": optim, "teacher": teacher,
            "total": weights + grads + optim + teacher}


def activation_bytes(model_cfg, batch_size: int, global_size: int, local_size: int, n_local: int,
                     num_captions: int, precision: str, grad_checkpointing: bool) -> int:
    """Estimated bytes of the student's saved activations for one training step on one rank.

    Per transformer block and token, backward keeps about (10 + 2·mlp_ratio)·width values (LN
    inputs and outputs, q/k/v, the attention output, both MLP activations, residuals) plus the
    attention probabilities (heads × tokens values per token); with gradient checkpointing only
    each block's input is kept, plus one block recomputed. 4 bytes per value in fp32, 2 under AMP.
    A start-up check, not a profiler. Against the measured forward peak (CPU, fp32, 8 crops at
    2×g + 6×96 px): tiny at B = 32, 391 MiB estimated vs 383 MiB; ViT-B/16 at B = 4, 2864 vs 2604 MiB.
    """
    v, t = model_cfg.vision_cfg, model_cfg.text_cfg
    width_bytes = 4 if precision == "fp32" else 2

    def tower(tokens_per_seq: list, width: int, layers: int, heads: int, mlp_ratio: float) -> float:
        per_block = sum(s * ((10 + 2 * mlp_ratio) * width + heads * s) for s in tokens_per_seq)
        if grad_checkpointing:
            return sum(tokens_per_seq) * width * layers + per_block
        return per_block * layers

    grid = lambda size: (size // v.patch_size) ** 2 + 1                     # noqa: E731 (patches + CLS)
    image_tokens = [grid(global_size)] * 2 + [grid(local_size)] * n_local
    values = (tower(image_tokens, v.width, v.layers, v.heads, v.mlp_ratio)
              + tower([t.context_length] * num_captions, t.width, t.layers, t.heads, t.mlp_ratio))
    inputs = 3 * (2 * global_size ** 2 + n_local * local_size ** 2) * 4 + num_captions * t.context_length * 8
    return int(batch_size * (values * width_bytes + inputs))


def free_memory_bytes(device: torch.device) -> int | None:
    """Free memory of ``device``: CUDA's free bytes, or the host's MemAvailable; None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
