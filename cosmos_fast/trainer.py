"""The COSMOS trainer: build → train_step → train → state_dict/load_state_dict → close.

Single process on CPU or one GPU. Per optimizer step (cosmos_method.md Appendix A): set the LR,
student + teacher forward and the COSMOS loss (autocast when configured), backward, EMA of the
teacher (official order: before the optimizer step), AdamW step, clamp both logit scales on both
models. Output folder: ``config.yaml`` (resolved), ``metrics.jsonl`` (one line per completed
optimizer step), ``train.log``, ``tb/`` (TensorBoard), ``checkpoints/epoch_{n}.pt`` and
``checkpoints/epoch_latest.pt`` in the official file format plus the resume state.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch

from .config import Config, save_config, validate
from .data.captions import Tokenizer
from .device import resolve_device
from .data.stream import StreamSpec, expand_shards, steps_per_epoch
from .ema import MomentumSchedule, build_teacher
from .loss import CosmosLoss
from .model import create_model, set_attention_backend
from .distributed import (activation_bytes, clamp_scales_zero, deepspeed_config, ema_update_zero,
                          free_memory_bytes, full_state_dict, gathered, init_distributed, load_full_state_dict,
                          memory_plan, partition_teacher, wants_deepspeed, build_optimizer)
from .model.checkpoint import (atomic_torch_save, check_deepspeed_files, check_state_dict, save_checkpoint,
                               select_state_dict, strip_prefix, torch_load)
from .model.cosmos import LOGIT_SCALE_MAX
from .schedules import WarmupCosineLR
from .profiling import PhaseTimer
from .step import cosmos_forward_loss, cosmos_train_step

log = logging.getLogger("cosmos_fast.trainer")


class _Fp32Inputs:
    """Calls the fp32 teacher with fp32 images even when the student runs on 16-bit inputs."""

    def __init__(self, teacher):
        self.teacher = teacher

    def __call__(self, images, captions):
        return self.teacher(images.float(), captions)


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row, or the weights became non-finite (nothing was saved)."""


class Preempted(RuntimeError):
    """Training stopped on SIGTERM or SIGINT after writing a checkpoint."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.signum = signum


class RunFolderError(ValueError):
    """The output folder cannot take this run (another run's outputs, not a folder, not writable)."""


class ConfigChangeError(ValueError):
    """Resuming with a config whose changes break exact resume."""


# Config keys whose change breaks exact resume (data order, batch composition, schedule lengths, seeds).
EXACT_RESUME_KEYS = (
    "model.name", "data.backend", "data.train_shards", "data.train_num_samples", "data.batch_size",
    "data.num_workers", "data.resampled", "data.shuffle_buffer", "data.shuffle_initial", "data.caption_mode",
    "data.num_captions", "data.local_crops", "data.crop_scale", "data.global_size", "data.local_size",
    "data.string_fields", "train.seed", "optim.epochs", "optim.warmup", "ema.schedule")
# What a run writes into its folder: a new run refuses to start over these without --overwrite.
RUN_OUTPUTS = ("metrics.jsonl", "eval.jsonl", "zero_shot.jsonl", "checkpoints", "tb")
METRICS_MARKER = "marker"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _strict_json(row: dict) -> str:
    """One strict-JSON line: non-finite floats (which json.dumps would write as NaN/Infinity) become null."""
    def clean(x):
        if isinstance(x, float) and not np.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x
    return json.dumps(clean(row), allow_nan=False)


def _local_values(p, rank: int) -> torch.Tensor:
    """A parameter's values held by this rank: the whole tensor, or under ZeRO-3 the valid part of its
    partition (the last partitions are padded with uninitialised memory)."""
    part = getattr(p, "ds_tensor", None)
    if part is None:
        return p.detach()
    n = part.numel()
    valid = max(0, min(n, int(p.ds_numel) - rank * n))
    return part.detach().reshape(-1)[:valid]


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _inside(path, folder) -> bool:
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
        return True
    except ValueError:
        return False


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
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


class Trainer:
    def __init__(self, cfg: Config, output_dir, resume=None, local_rank: int | None = None, *,
                 overwrite: bool = False, allow_config_change: bool = False, trust_checkpoint: bool = False):
        self.cfg = cfg
        self.allow_config_change = allow_config_change
        self.trust_checkpoint = trust_checkpoint
        self.use_ds = wants_deepspeed(cfg)
        if self.use_ds:
            self.rank, self.world, self.local_rank = init_distributed(cfg, local_rank)
        else:
            self.rank, self.world, self.local_rank = 0, 1, 0
        self.is_main = self.rank == 0
        self.notes = validate(cfg, self.world, check_files=True)     # before anything is built or written
        self.out = Path(output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.metrics_path = self.out / "metrics.jsonl"
        self._make_output_dir()
        auto = resume is None and cfg.train.auto_resume and not overwrite     # --overwrite starts anew
        if auto:
            resume = self._newest_checkpoint()
        self._claim_output_dir(resume, overwrite)
        self._log_file = None
        pkg_log = logging.getLogger("cosmos_fast")
        if self.is_main:
            self._log_file = logging.FileHandler(self.out / "train.log")
            self._log_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            pkg_log.addHandler(self._log_file)
        if not self.is_main:                                # one rank speaks for the run
            pkg_log.setLevel(logging.WARNING)
        elif pkg_log.getEffectiveLevel() > logging.INFO:   # the run log always gets INFO lines
            pkg_log.setLevel(logging.INFO)
        self.tb = None
        try:
            self._build(resume, auto)
        except BaseException:
            self.close()                                   # no train.log handler left behind
            raise

    def _build(self, resume, auto: bool) -> None:
        cfg = self.cfg
        self.device = resolve_device(cfg.train.device, self.local_rank)
        set_attention_backend(cfg.model.attention)

        # build: identical student on every rank (seed + 0), then seed + rank (official main.py)
        seed_everything(cfg.train.seed)
        self.student = create_model(cfg.model.name, pool_impl=cfg.model.pool_impl).to(self.device)
        self.student.set_grad_checkpointing(cfg.model.grad_checkpointing)
        self.teacher = build_teacher(self.student)               # fp32, before any partitioning
        seed_everything(cfg.train.seed + self.rank)
        self.loss_fn = CosmosLoss(impl=cfg.model.loss_impl, grad_semantics=cfg.distributed.grad_semantics)
        o = cfg.optim
        self.optimizer = build_optimizer(cfg, self.student)
        self.engine = None
        self.stage = 0
        amp = {"amp_bf16": torch.bfloat16, "amp_fp16": torch.float16}.get(cfg.train.precision)
        self.amp_dtype = amp
        self.scaler = None
        if self.use_ds:
            import deepspeed

            self.stage = cfg.distributed.zero_stage
            self.ds_config = deepspeed_config(cfg, self.world)
            if self.stage == 3:
                partition_teacher(self.teacher, self.ds_config)
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=self.student, optimizer=self.optimizer, config=self.ds_config)
            self.student = self.engine.module
            if self.is_main:
                (self.out / "deepspeed_config.json").write_text(json.dumps(self.ds_config, indent=2))
        elif cfg.train.precision == "amp_fp16":
            self.scaler = torch.amp.GradScaler("cuda")

        self.loader = self._build_loader()
        self.steps_per_epoch = self.loader.steps_per_epoch
        self.total_steps = self.steps_per_epoch * o.epochs
        self.lr_schedule = WarmupCosineLR(o.lr, o.warmup, self.total_steps)
        self.momentum = MomentumSchedule(cfg.ema.momentum, cfg.ema.schedule, self.total_steps)
        self.step = 0
        self.epoch = 0
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self.overflows = 0
        self._val = None
        self._saved_step = None
        self._stop_requested = False
        self._stop_signal = signal.SIGTERM
        self.timer = PhaseTimer(enabled=False, device=self.device)   # benchmarks/profile_train.py enables it
        self._last_good = None          # the newest checkpoint with finite weights (written or resumed)
        self._check_memory()
        if resume:
            if auto:
                log.info("auto-resume: found %s", resume)
            self.resume(resume)
        elif self.is_main:
            self.metrics_path.write_text("")
        if self.is_main:                                # every resolved config is kept
            if not resume or not (self.out / "config.yaml").is_file():
                save_config(cfg, self.out / "config.yaml")
            if resume:
                save_config(cfg, self.out / f"config.resumed-{self.step}.yaml")
        self.tb = self._tensorboard() if cfg.train.tensorboard and self.is_main else None
        self._log_start()

    # ------------------------------------------------------------ run folder
    def _make_output_dir(self) -> None:
        if self.out.exists() and not self.out.is_dir():
            raise RunFolderError(f"--output-dir {self.out} exists and is not a folder")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunFolderError(f"--output-dir {self.out} cannot be created: {e.strerror or e}") from None
        if not os.access(self.out, os.W_OK | os.X_OK):
            raise RunFolderError(f"--output-dir {self.out} is not writable")

    def _previous_outputs(self) -> list[str]:
        """What another run left in the output folder (an empty metrics.jsonl does not count)."""
        found = []
        for name in RUN_OUTPUTS:
            p = self.out / name
            if p.is_dir() and any(p.iterdir()) or p.is_file() and p.stat().st_size > 0:
                found.append(name + ("/" if p.is_dir() else ""))
        return found

    def _claim_output_dir(self, resume, overwrite: bool) -> None:
        """Refuse to start a new run over another run's outputs unless told to (--overwrite), then
        remove stale temporary files of our own naming (a crash during a checkpoint write)."""
        continuing = resume is not None and _inside(resume, self.out)
        previous = self._previous_outputs()
        if continuing and overwrite:
            raise RunFolderError(f"--overwrite would delete {resume}, which this run resumes from")
        if previous and not continuing:
            if not overwrite:
                what = f"starting from {resume}" if resume is not None else "a new run"
                raise RunFolderError(
                    f"--output-dir {self.out} holds another run's outputs ({', '.join(previous)}); refusing to "
                    f"write {what} over them. Continue that run with --resume {self.out} (or "
                    f"train.auto_resume=true), pick a new --output-dir, or pass --overwrite to delete them")
            if self.is_main:
                log.warning("--overwrite: deleting the previous run's %s in %s", ", ".join(previous), self.out)
                for name in previous:
                    p = self.out / name.rstrip("/")
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
                for p in self.out.glob("config.resumed-*.yaml"):
                    p.unlink()
        if self.is_main and self.ckpt_dir.is_dir():
            for tmp in [*self.ckpt_dir.glob(".*.tmp"), *self.ckpt_dir.glob("step_*/.*.tmp")]:
                log.warning("removing %s, a partial checkpoint write of an interrupted run", tmp)
                tmp.unlink(missing_ok=True)
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def _check_memory(self) -> None:
        """Refuse a batch whose estimated activations and model state cannot fit the device."""
        if not self.cfg.train.memory_check:
            return
        d, m = self.cfg.data, self.student.cfg
        act = activation_bytes(m, d.batch_size, d.global_size or m.vision_cfg.image_size, d.local_size,
                               d.local_crops, d.num_captions, self.cfg.train.precision,
                               self.cfg.model.grad_checkpointing)
        _, plan = self._memory_plan()
        state = plan["gradients"] + plan["optimizer"]          # the weights are already allocated
        free = free_memory_bytes(self.device)
        log.info("estimated activation memory per step: %.2f GiB (data.batch_size %d)", act / 2 ** 30, d.batch_size)
        if free is not None and act + state > free:
            from .config import ConfigError

            raise ConfigError(
                f"data.batch_size = {d.batch_size} needs an estimated {act / 2 ** 30:.1f} GiB of activations on "
                f"{self.device} (plus {state / 2 ** 30:.2f} GiB of gradients and optimizer state), but only "
                f"{free / 2 ** 30:.1f} GiB are free: lower data.batch_size, set model.grad_checkpointing=true, "
                f"or set train.memory_check=false to try anyway")

    # ----------------------------------------------------------------- build
    def _build_loader(self):
        d, m = self.cfg.data, self.student.cfg
        spec = StreamSpec(
            shards=expand_shards(d.train_shards), batch_size=d.batch_size, seed=self.cfg.train.seed,
            rank=self.rank, world=self.world, num_workers=d.num_workers,
            steps_per_epoch=steps_per_epoch(d.train_num_samples, d.batch_size * self.world, d.num_workers),
            resampled=d.resampled, shuffle_buffer=d.shuffle_buffer, shuffle_initial=d.shuffle_initial,
            caption_mode=d.caption_mode, num_captions=d.num_captions, string_fields=d.string_fields,
            global_size=d.global_size or m.vision_cfg.image_size, local_size=d.local_size,
            n_local=d.local_crops, crop_scale=d.crop_scale, tokenizer_name="ViT-B-16",
            context_length=m.text_cfg.context_length, worker_start=d.worker_start, augment=d.augment,
            allow_pipe=d.allow_pipe)
        from .data.backends import build_loader, resolve_backend

        backend = resolve_backend(d.backend)
        return build_loader(spec, backend, **({"device": self.device} if backend == "dali" else {}))

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard is not installed; TensorBoard scalars are off")
            return None
        # a resumed run drops the events logged after its checkpoint, so curves are not drawn twice
        return SummaryWriter(str(self.out / "tb"), purge_step=self.step or None)

    def _memory_plan(self) -> tuple[int, dict]:
        """(student parameter count, memory_plan bytes per rank) for this run's stage, world and precision."""
        n = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in self.student.parameters())
        return n, memory_plan(n, self.stage, self.world, self.cfg.train.precision)

    def _log_start(self):
        n, plan = self._memory_plan()
        mb = {k: f"{v / 2 ** 20:.1f} MB" for k, v in plan.items()}
        log.info("model %s: %.2fM parameters; per rank (%s, ZeRO-%d, %d ranks): student weights %s, gradients %s, "
                 "optimizer %s, fp32 teacher %s, total %s", self.cfg.model.name, n / 1e6,
                 "DeepSpeed" if self.use_ds else "single process", self.stage, self.world, mb["student_weights"],
                 mb["gradients"], mb["optimizer"], mb["teacher"], mb["total"])
        for note in self.notes:
            log.info(note)
        mx = self.cfg.train.max_steps
        stop = (f"; train.max_steps = {mx}: this run stops at step {self.target_steps}"
                if mx is not None and mx < self.total_steps else "")
        log.info("device %s, precision %s, %d steps/epoch × %d epochs = %d steps in the schedule%s "
                 "(starting at step %d)", self.device, self.cfg.train.precision, self.steps_per_epoch,
                 self.cfg.optim.epochs, self.total_steps, stop, self.step)

    @property
    def target_steps(self) -> int:
        """The step this run stops at: the schedule's end, or train.max_steps if that comes first."""
        mx = self.cfg.train.max_steps
        return self.total_steps if mx is None else min(self.total_steps, mx)

    @property
    def finished(self) -> bool:
        return self._done()

    # ------------------------------------------------------------------ step
    def train_step(self, batch) -> dict:
        """One optimizer step on a batch; returns the losses (``finite`` False = step skipped)."""
        lr = self.lr_schedule(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        m = self.momentum(self.step)
        crops = [c.to(self.device, non_blocking=True) for c in batch["crops"]]
        captions = batch["captions"].to(self.device, non_blocking=True)
        if self.engine is None:
            autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
                        else None)
            out = cosmos_train_step(self.student, self.teacher, self.loss_fn, self.optimizer, crops, captions,
                                    momentum=m, ema_order=self.cfg.ema.order, scaler=self.scaler,
                                    autocast=autocast, grad_clip_norm=self.cfg.optim.grad_clip_norm,
                                    timer=self.timer)
        else:
            out = self._engine_step(crops, captions, m)
        out.update(lr=lr, momentum=m)
        if not out["finite"]:
            self.nonfinite_total += 1
            self.nonfinite_run += 1
            log.warning("step %d: non-finite loss (clip %s, distill %s); step skipped (%d in a row)",
                        self.step + 1, float(out["clip_loss"]), float(out["distill_loss"]), self.nonfinite_run)
            if self.nonfinite_run >= self.cfg.train.max_nonfinite:
                raise NonFiniteLossError(
                    f"{self.nonfinite_run} non-finite losses in a row (train.max_nonfinite = "
                    f"{self.cfg.train.max_nonfinite}); stopping. {self._last_good_text()}")
            return out
        self.nonfinite_run = 0
        if out["overflow"]:
            self.overflows += 1
            log.info("step %d: fp16 gradient overflow, the loss scaler skipped the update", self.step + 1)
        self.step += 1
        return out

    def _engine_step(self, crops, captions, momentum: float) -> dict:
        """The same step through the DeepSpeed engine (the loss is global on every rank, so a
        non-finite loss is skipped consistently by all ranks)."""
        timer = self.timer
        if self.amp_dtype is not None:                   # DeepSpeed bf16/fp16 keeps 16-bit weights
            crops = [c.to(self.amp_dtype) for c in crops]
        losses = cosmos_forward_loss(self.engine, _Fp32Inputs(self.teacher), self.loss_fn, crops, captions,
                                     timer, teacher_context=gathered(self.teacher, self.stage == 3))
        out = {k: v.detach() for k, v in losses.items()}
        out.update(finite=bool(torch.isfinite(out["loss"])), overflow=False)
        if not out["finite"]:
            return out
        with timer.phase("backward"):
            self.engine.backward(losses["loss"])
        if self.cfg.ema.order == "before_step":
            with timer.phase("ema"):
                ema_update_zero(self.teacher, self.engine.module, momentum, self.stage)
        with timer.phase("optimizer"):
            self.engine.step()
        out["overflow"] = not self.engine.was_step_applied()
        if self.cfg.ema.order == "after_step":
            with timer.phase("ema"):
                ema_update_zero(self.teacher, self.engine.module, momentum, self.stage)
        clamp_scales_zero(self.engine, self.teacher, self.stage, LOGIT_SCALE_MAX)
        return out

    # ----------------------------------------------------------------- train
    def _done(self) -> bool:
        mx = self.cfg.train.max_steps
        return self.step >= self.total_steps or (mx is not None and self.step >= mx)

    def train(self) -> dict:
        from tqdm import tqdm

        t = self.cfg.train
        target = self.target_steps
        bar = tqdm(total=target, initial=self.step, desc=t.name, unit="step", dynamic_ncols=True,
                   disable=not t.progress or not self.is_main)
        global_batch = self.cfg.data.batch_size * self.world
        last = {}
        start_step, start_time = self.step, time.perf_counter()
        previous_handlers = self._install_stop_handlers()
        try:
            while not self._done():
                self.loader.set_epoch(self.epoch)
                tick = time.perf_counter()
                for batch in self.loader:
                    self.timer.add("data_wait", time.perf_counter() - tick)
                    out = self.train_step(batch)
                    if not out["finite"]:
                        continue
                    now = time.perf_counter()
                    last = self._record(out, self._global_skips(batch["skipped"]),
                                        global_batch / max(now - tick, 1e-9))
                    tick = now
                    if t.log_every_steps and self.step % t.log_every_steps == 0:
                        self._log_progress(last, start_step, start_time)
                    bar.update(1)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", clip=f"{last['clip_loss']:.4f}",
                                    distill=f"{last['distill_loss']:.4f}", samples_s=f"{last['samples_per_s']:.1f}",
                                    skipped=sum(last["skipped_samples"].values()))
                    if t.save_every_steps and self.step % t.save_every_steps == 0:
                        self.save()
                    if t.eval_every_steps and self.step % t.eval_every_steps == 0 and self.cfg.data.val_shards:
                        self.log_eval(self.evaluate())
                    if self.cfg.eval.every_steps and self.step % self.cfg.eval.every_steps == 0:
                        self.zero_shot_eval()
                    if self._should_stop():
                        name = signal.Signals(self._stop_signal).name
                        log.warning("%s received: saving a checkpoint at step %d and exiting", name, self.step)
                        self.save()
                        raise Preempted(f"stopped by {name} after step {self.step}; checkpoint saved",
                                        self._stop_signal)
                    if self._done():
                        break
                if self.loader.consumed >= self.steps_per_epoch:      # the epoch is complete
                    log.info("epoch %d done at step %d; skipped samples so far: %s; non-finite steps: %d; "
                             "fp16 overflows: %d", self.epoch + 1, self.step, self.loader.skipped or "none",
                             self.nonfinite_total, self.overflows)
                    self.epoch += 1
                    self.loader.set_epoch(self.epoch)
                    self.save(epoch_file=True)
        finally:
            bar.close()
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
        if self._saved_step != self.step:
            self.save()
        elapsed = time.perf_counter() - start_time
        done = self.step - start_step
        log.info("finished at step %d of %d: %d steps in %s (%.1f samples/s); checkpoint %s", self.step, target,
                 done, _hms(elapsed), done * global_batch / max(elapsed, 1e-9), self._last_good)
        return last

    def _log_progress(self, row: dict, start_step: int, start_time: float) -> None:
        """One train.log line every train.log_every_steps steps (a batch job has no progress bar)."""
        elapsed = time.perf_counter() - start_time
        done = self.step - start_step
        eta = elapsed / max(done, 1) * (self.target_steps - self.step)
        log.info("step %d/%d (epoch %d): loss %.4f (clip %.4f, distill %.4f), lr %.3g, %.1f samples/s, "
                 "skipped %d, ETA %s", self.step, self.target_steps, self.epoch + 1, row["loss"], row["clip_loss"],
                 row["distill_loss"], row["lr"], row["samples_per_s"], sum(row["skipped_samples"].values()),
                 _hms(eta))

    def _install_stop_handlers(self) -> dict:
        """SIGTERM and the first SIGINT (Ctrl-C) stop training at the next step boundary, after a
        checkpoint; a second SIGINT interrupts at once (KeyboardInterrupt)."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            if signum == signal.SIGINT and self._stop_requested:
                raise KeyboardInterrupt
            if signum == signal.SIGINT:
                log.warning("Ctrl-C: stopping after this step with a checkpoint (press again to stop now)")
            self._stop_requested = True
            self._stop_signal = signum
        return {signum: signal.signal(signum, handler) for signum in (signal.SIGTERM, signal.SIGINT)}

    def _should_stop(self) -> bool:
        if self.world == 1:
            return self._stop_requested
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self._stop_requested else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)          # every rank stops (and saves) together
        return bool(flag.item())

    def _global_skips(self, skipped: dict) -> dict:
        if self.world == 1:
            return dict(skipped)
        import torch.distributed as dist

        parts = [None] * self.world
        dist.all_gather_object(parts, dict(skipped))
        total = {}
        for part in parts:
            for k, v in part.items():
                total[k] = total.get(k, 0) + v
        return total

    def _record(self, out: dict, skipped: dict, samples_per_s: float) -> dict:
        row = {"step": self.step, "epoch": self.epoch + 1, "time": round(time.time(), 3), "loss": float(out["loss"]), "clip_loss": float(out["clip_loss"]),
               "distill_loss": float(out["distill_loss"]), "lr": out["lr"], "momentum": out["momentum"],
               "logit_scale": float(out["logit_scale"]), "distill_logit_scale": float(out["distill_logit_scale"]),
               "samples_per_s": samples_per_s, "skipped_samples": dict(skipped),
               "nonfinite_steps": self.nonfinite_total}
        if self.is_main:
            with open(self.metrics_path, "a") as fh:
                fh.write(_strict_json(row) + "\n")
            if self.tb is not None:
                for k in ("loss", "clip_loss", "distill_loss", "lr", "momentum", "logit_scale",
                          "distill_logit_scale", "samples_per_s"):
                    self.tb.add_scalar(f"train/{k}", row[k], self.step)
                self.tb.add_scalar("train/skipped_samples", sum(skipped.values()), self.step)
        return row

    # ------------------------------------------------------------------ eval
    def _val_set(self):
        if self._val is None:
            from .data.transforms import eval_transform
            from .eval.retrieval import load_retrieval_shards

            images, captions, owner = load_retrieval_shards(expand_shards(self.cfg.data.val_shards))
            tf = eval_transform(self.cfg.data.global_size or self.student.cfg.vision_cfg.image_size)
            tok = Tokenizer("ViT-B-16", self.student.cfg.text_cfg.context_length)
            self._val = (torch.stack([tf(im) for im in images]), tok(captions), owner)
        return self._val

    def evaluate(self) -> dict:
        """Image↔text retrieval on data.val_shards for student and teacher."""
        from .eval.retrieval import retrieval_eval

        images, tokens, owner = self._val_set()
        bs = self.cfg.data.eval_batch_size
        results = {}
        for name, model in (("student", self.student), ("teacher", self.teacher)):
            with gathered(model, self.stage == 3):          # every rank takes part under ZeRO-3
                results[name] = retrieval_eval(model, images, tokens, owner, bs)
        return results

    def zero_shot_eval(self) -> dict | None:
        """COCO / Flickr30k retrieval and ImageNet (and SUN397) zero-shot classification of student
        and teacher, on every rank (features sharded and gathered); rank 0 writes zero_shot.jsonl."""
        from .eval import evaluate_models, format_results, load_eval_sets, log_to_tensorboard

        e = self.cfg.eval
        if not (e.retrieval_root or e.imagenet_val or e.sun397_root):
            return None
        if getattr(self, "_zs_sets", None) is None:
            self._zs_sets = load_eval_sets(
                retrieval_root=e.retrieval_root or None,
                retrieval_sets=tuple(x.strip() for x in e.retrieval_sets.split(",") if x.strip()),
                split=e.retrieval_split, imagenet_val=e.imagenet_val or None,
                imagenet_classnames=e.imagenet_classnames or None, sun397_root=e.sun397_root or None)
        results = {}
        for name, model in (("student", self.student), ("teacher", self.teacher)):
            with gathered(model, self.stage == 3):
                results.update(evaluate_models(
                    {name: model}, sets=self._zs_sets, batch_size=e.batch_size, num_workers=e.num_workers,
                    image_size=self.cfg.data.global_size or self.student.cfg.vision_cfg.image_size,
                    device=self.device, progress=self.is_main))
        if self.is_main:
            log.info("step %d zero-shot:\n%s", self.step, format_results(results))
            with open(self.out / "zero_shot.jsonl", "a") as fh:
                fh.write(json.dumps({"step": self.step, **results}) + "\n")
            if self.tb is not None:
                log_to_tensorboard(self.tb, results, self.step)
        return results

    def log_eval(self, results: dict) -> None:
        line = ", ".join(f"{m} i2t R@1 {r['i2t_r1']:.3f} t2i R@1 {r['t2i_r1']:.3f}" for m, r in results.items())
        log.info("step %d retrieval: %s", self.step, line)
        if self.is_main:
            with open(self.out / "eval.jsonl", "a") as fh:
                fh.write(json.dumps({"step": self.step, **results}) + "\n")
            if self.tb is not None:
                for m, r in results.items():
                    for k, v in r.items():
                        if k.startswith(("i2t", "t2i")):
                            self.tb.add_scalar(f"eval/{m}_{k}", v, self.step)

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "data": self.loader.state_dict(),
                "rng": _rng_state(), "nonfinite_total": self.nonfinite_total, "world": self.world,
                "nonfinite_run": self.nonfinite_run, "overflows": self.overflows}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.loader.load_state_dict(state["data"])
        _set_rng_state(state["rng"])
        self.nonfinite_total = int(state["nonfinite_total"])
        self.nonfinite_run = int(state["nonfinite_run"])
        self.overflows = int(state.get("overflows", 0))

    def _last_good_text(self) -> str:
        if self._last_good is None:
            return "No checkpoint with finite weights was written or resumed by this run."
        return f"The newest checkpoint with finite weights is {self._last_good}."

    def weights_finite(self) -> bool:
        """Every student and teacher parameter finite: one reduction on the device, one sync (all ranks
        agree; under ZeRO-3 each rank checks its own partitions)."""
        flags = [torch.isfinite(_local_values(p, self.rank)).all()
                 for model in (self.student, self.teacher) for p in model.parameters()]
        flag = torch.stack(flags).all().float() if flags else torch.ones((), device=self.device)
        if self.world > 1:
            import torch.distributed as dist

            flag = flag.to(self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def save(self, epoch_file: bool = False) -> Path | None:
        """Checkpoint the run: an official-format file (single process) or a DeepSpeed tag folder.
        Non-finite weights are never written: NonFiniteLossError names the newest finite checkpoint."""
        if not self.weights_finite():
            raise NonFiniteLossError(f"the weights are non-finite at step {self.step}: not saving a checkpoint. "
                                     f"{self._last_good_text()}")
        self._saved_step = self.step
        if self.engine is not None:
            self._last_good = self._save_deepspeed()
            log.info("checkpoint saved at step %d: %s", self.step, self._last_good)
            return self._last_good
        extra = {"optimizer": self.optimizer.state_dict(), "trainer": self.state_dict(),
                 "config": self.cfg.to_dict()}
        if self.scaler is not None:
            extra["scaler"] = self.scaler.state_dict()
        path = save_checkpoint(self.ckpt_dir / "epoch_latest.pt", self.student, self.teacher,
                               epoch=self.epoch, name=self.cfg.train.name, **extra)
        if epoch_file:
            save_checkpoint(self.ckpt_dir / f"epoch_{self.epoch}.pt", self.student, self.teacher,
                            epoch=self.epoch, name=self.cfg.train.name, **extra)
        self._last_good = path
        log.info("checkpoint saved at step %d: %s%s", self.step, path,
                 f" and epoch_{self.epoch}.pt" if epoch_file else "")
        return path

    def _save_deepspeed(self) -> Path:
        """DeepSpeed's own files (engine, optimizer partitions) + per-rank trainer state + the
        consolidated fp32 teacher, in ``checkpoints/step_NNNNNNNN/``. The folder counts only once
        rank 0 has written ``COMPLETE`` after every rank finished, and ``latest`` is replaced
        atomically after that, so a crash mid-save leaves the previous checkpoint the newest."""
        import torch.distributed as dist

        tag = f"step_{self.step:08d}"
        tag_dir = self.ckpt_dir / tag
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, save_latest=False,
                                    client_state={"step": self.step, "epoch": self.epoch})
        atomic_torch_save({"trainer": self.state_dict(), "world": self.world},
                          tag_dir / f"trainer_rank{self.rank:05d}.pt")
        teacher_sd = full_state_dict(self.teacher, self.stage)        # collective under ZeRO-3
        if self.is_main:
            atomic_torch_save({"teacher": teacher_sd, "epoch": self.epoch, "step": self.step,
                               "name": self.cfg.train.name, "config": self.cfg.to_dict()}, tag_dir / "teacher.pt")
        dist.barrier()
        if self.is_main:
            (tag_dir / "COMPLETE").write_text(json.dumps({"step": self.step, "epoch": self.epoch,
                                                          "world": self.world, "zero_stage": self.stage}))
            tmp = self.ckpt_dir / ".latest.tmp"
            tmp.write_text(tag)
            tmp.replace(self.ckpt_dir / "latest")
            self._retention()
        dist.barrier()
        return tag_dir

    def _retention(self) -> None:
        tags = sorted(p for p in self.ckpt_dir.glob("step_*") if (p / "COMPLETE").is_file())
        for old in tags[:-self.cfg.distributed.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def _newest_checkpoint(self):
        latest = self.ckpt_dir / "latest"
        if latest.is_file() and (self.ckpt_dir / latest.read_text().strip() / "COMPLETE").is_file():
            return self.ckpt_dir / latest.read_text().strip()
        if (self.ckpt_dir / "epoch_latest.pt").is_file() and not self.use_ds:
            return self.ckpt_dir / "epoch_latest.pt"
        return None

    def resume(self, source) -> None:
        path = Path(source)
        if path.is_dir():
            tag_dir = resolve_ds_checkpoint(path)
            if tag_dir is not None:
                return self._resume_deepspeed(tag_dir)
            for cand in (path / "checkpoints" / "epoch_latest.pt", path / "epoch_latest.pt"):
                if cand.is_file():
                    path = cand
                    break
            else:
                raise FileNotFoundError(f"--resume {source}: no checkpoint found in that folder")
        body = torch_load(path, trust=self.trust_checkpoint)
        student_sd = strip_prefix(select_state_dict(body, "student", path))
        teacher_sd = (strip_prefix(select_state_dict(body, "teacher", path))
                      if isinstance(body, dict) and "teacher" in body else student_sd)
        for model, sd in ((self.student, student_sd), (self.teacher, teacher_sd)):
            with gathered(model, self.stage == 3):
                check_state_dict(model, sd, path)
            load_full_state_dict(model, sd, self.stage)
        position = body.get("cosmos_fast_position") if isinstance(body, dict) else None
        if self.engine is not None or "trainer" not in body:
            if position:      # an exported run: continue its schedules (e.g. on another number of ranks)
                self.step, self.epoch = int(position["step"]), int(position["epoch"])
                self.loader.load_state_dict({"epoch": self.epoch, "consumed": 0})
                log.warning("--resume %s: weights and schedule position (step %d, epoch %d); AdamW moments "
                            "start fresh and epoch %d's data order restarts", path, self.step, self.epoch,
                            self.epoch + 1)
                self._mark_metrics(f"resumed weights and schedule position from {path}")
                return
            log.warning("--resume %s: loading weights only (no optimizer, schedule, RNG or data position%s): "
                        "starting a new run from these weights", path,
                        "; a single-process file cannot restore DeepSpeed optimizer partitions"
                        if self.engine is not None and "trainer" in body else "")
            self._mark_metrics(f"new run from the weights of {path}")
            return
        self._check_config_change(body.get("config"), body["trainer"].get("world", 1), path)
        self.optimizer.load_state_dict(body["optimizer"])
        if self.scaler is not None and "scaler" in body:
            self.scaler.load_state_dict(body["scaler"])
        self.load_state_dict(body["trainer"])
        self._last_good = path
        self._truncate_metrics()
        log.info("resumed %s at step %d (epoch %d, %d batches into it)", path, self.step, self.epoch,
                 self.loader.consumed)

    def _resume_deepspeed(self, tag_dir: Path) -> None:
        if self.engine is None:
            raise ValueError(f"--resume {tag_dir} is a DeepSpeed checkpoint: launch with distributed.backend="
                             f"deepspeed, or convert it with `cosmos-fast export` and resume from that file")
        info = json.loads((tag_dir / "COMPLETE").read_text())
        if info["world"] != self.world:
            raise ValueError(f"checkpoint {tag_dir} was written by {info['world']} ranks, this run has "
                             f"{self.world}: export it (`cosmos-fast export`) and --resume from the "
                             f"consolidated file to continue from its weights")
        check_deepspeed_files(tag_dir, trust=self.trust_checkpoint)     # DeepSpeed unpickles its files in full
        teacher = torch_load(tag_dir / "teacher.pt", trust=self.trust_checkpoint)
        self._check_config_change(teacher.get("config"), info["world"], tag_dir)
        self.engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_lr_scheduler_states=False)
        load_full_state_dict(self.teacher, teacher["teacher"], self.stage)
        state = torch_load(tag_dir / f"trainer_rank{self.rank:05d}.pt", trust=self.trust_checkpoint)
        self.load_state_dict(state["trainer"])
        self._last_good = tag_dir
        if self.is_main:
            self._truncate_metrics()
        log.info("resumed DeepSpeed checkpoint %s at step %d (epoch %d, %d batches into it)", tag_dir,
                 self.step, self.epoch, self.loader.consumed)

    def _check_config_change(self, old: dict | None, old_world: int, source) -> None:
        """Compare the checkpoint's config with this run's: changes that break exact resume are refused
        unless allow_config_change (--allow-config-change); the others are logged."""
        if not old:
            return
        before, now = _flat(old), _flat(self.cfg.to_dict())
        changed = {k: (before[k], now[k]) for k in now if k in before and before[k] != now[k]}
        if old_world != self.world:
            changed["world size"] = (old_world, self.world)
        breaking = {k: v for k, v in changed.items() if k in EXACT_RESUME_KEYS or k == "world size"}
        text = lambda items: "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in items.items())   # noqa: E731
        if breaking and not self.allow_config_change:
            raise ConfigChangeError(
                f"--resume {source}: this config changes what exact resume depends on ({text(breaking)}); "
                f"resume with the checkpoint's config ({self.out / 'config.yaml'}), or pass "
                f"--allow-config-change to continue anyway (data order and schedules will differ from an "
                f"uninterrupted run)")
        if changed:
            log.warning("--resume %s with a changed config: %s", source, text(changed))

    def _metrics_lines(self) -> list[str]:
        """metrics.jsonl's lines; a torn last line (a crash or a full disk during the append) is dropped."""
        if not self.metrics_path.is_file():
            return []
        lines = [line for line in self.metrics_path.read_text(errors="replace").splitlines() if line.strip()]
        if lines:
            try:
                json.loads(lines[-1])
            except ValueError:
                log.warning("%s: dropping a torn last line (%d characters): %.80r", self.metrics_path,
                            len(lines[-1]), lines[-1])
                lines.pop()
        return lines

    def _truncate_metrics(self) -> None:
        """Exact resume: drop the rows after the resumed step, only after the last marker line (rows
        before a marker belong to an earlier run in this folder and are never removed)."""
        lines = self._metrics_lines()
        rows = []
        for line in lines:
            try:
                rows.append(json.loads(line))
            except ValueError:
                rows.append(None)                     # an unreadable line is kept as it is
        last_marker = max((i for i, r in enumerate(rows) if r is not None and METRICS_MARKER in r), default=-1)
        keep = lines[:last_marker + 1] + [line for line, r in zip(lines[last_marker + 1:], rows[last_marker + 1:])
                                          if r is None or r.get("step", 0) <= self.step]
        self.metrics_path.write_text("".join(line + "\n" for line in keep))

    def _mark_metrics(self, what: str) -> None:
        """A run that starts from weights: append a marker line, keep every earlier row."""
        if not self.is_main:
            return
        lines = self._metrics_lines()
        lines.append(_strict_json({METRICS_MARKER: what, "step": self.step, "time": time.time()}))
        self.metrics_path.write_text("".join(line + "\n" for line in lines))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self._log_file is not None:
            logging.getLogger("cosmos_fast").removeHandler(self._log_file)
            self._log_file.close()
            self._log_file = None


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

