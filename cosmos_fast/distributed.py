"""DeepSpeed ZeRO for the COSMOS student and its EMA teacher.

Launch: ``deepspeed [--hostfile H] [--num_gpus N] --module cosmos_fast.train --config X ...`` on a
cluster, ``DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module cosmos_fast.train ...`` on CPU
(gloo), or ``torchrun``. :func:`init_distributed` reads RANK / WORLD_SIZE / LOCAL_RANK (or
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
"""
from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger("cosmos_fast.distributed")

OPTIMIZERS = ("torch_adamw", "deepspeed_fused_adam", "apex_fused_adam")


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
    import deepspeed

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
        "bf16": {"enabled": t.precision == "amp_bf16"},
        "fp16": {"enabled": t.precision == "amp_fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 2000, "hysteresis": 2, "min_loss_scale": 1},
        "gradient_clipping": cfg.optim.grad_clip_norm or 0.0,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def build_optimizer(cfg, model):
    """The configured optimizer over the official parameter groups."""
    from .optim import build_adamw, param_groups

    o, name = cfg.optim, cfg.distributed.optimizer
    kw = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    if name == "torch_adamw":
        extra = {"fused": True} if next(model.parameters()).is_cuda else {}
        return build_adamw(model, weight_decay=o.weight_decay, **kw, **extra)
    if name == "deepspeed_fused_adam":
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(param_groups(model, o.weight_decay), adam_w_mode=True, **kw)
    if name == "apex_fused_adam":
        try:
            from apex.optimizers import FusedAdam as ApexFusedAdam
        except ImportError as e:
            raise RuntimeError("distributed.optimizer = apex_fused_adam but NVIDIA apex is not installed "
                               "(a cluster build; see README)") from e
        return ApexFusedAdam(param_groups(model, o.weight_decay), adam_w_mode=True, **kw)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")


def partition_teacher(teacher, ds_cfg: dict):
    """Partition an fp32 teacher like the student under ZeRO-3 (same shapes, order and world)."""
    import deepspeed

    cfg = {**ds_cfg, "zero_optimization": {**ds_cfg["zero_optimization"], "stage3_param_persistence_threshold": 0}}
    deepspeed.zero.Init(module=teacher, config_dict_or_path=cfg, dtype=torch.float32)
    return teacher


def gathered(module, enabled: bool):
    """Context that gathers a ZeRO-3 partitioned module's weights (no-op otherwise)."""
    import contextlib

    if not enabled:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)


def _named(model):
    return dict(model.named_parameters())


@torch.no_grad()
def ema_update_zero(teacher, student, momentum: float, stage: int) -> None:
    """θ_T ← m·θ_T + (1 − m)·θ_S without communication; shard by shard under ZeRO-3."""
    from .ema import ema_update

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
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    from .ema import SCALE_NAMES

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
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
        if dist.get_rank() == 0:
            module.load_state_dict(sd)


def memory_plan(n_params: int, stage: int, world: int, precision: str) -> dict:
    """Bytes per rank of student weights, gradients, optimizer state and the fp32 teacher."""
    half = precision in ("amp_bf16", "amp_fp16")
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
