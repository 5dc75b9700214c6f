"""The COSMOS trainer: build → train_step → train → state_dict/load_state_dict → close, over one
engine interface (:mod:`cosmos_fast.engine`: one process, or DeepSpeed ZeRO).

Per optimizer step (cosmos_method.md Appendix A, :func:`cosmos_fast.step.train_step`): set the LR,
student + teacher forward and the COSMOS loss, backward, EMA of the teacher (official order: before
the optimizer step), optimizer step, clamp both logit scales on both models. Output folder:
``config.yaml`` (resolved), ``metrics.jsonl`` (one line per completed optimizer step,
:mod:`cosmos_fast.metrics`), ``train.log``, ``tb/`` (TensorBoard), ``checkpoints/`` in the engine's
format (:mod:`cosmos_fast.checkpointing`).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from .checkpointing import (check_config_change, claim_output_dir, find_checkpoint, make_output_dir,
                            newest_checkpoint, rng_state, seed_everything, set_rng_state)
from .config import Config, ConfigError, save_config, validate
from .ops.multicrop import numba_available
from .data.backends import build_loader, resolve_backend
from .data.stream import StreamSpec, check_pipe_urls, expand_shards, missing_local_shards, steps_per_epoch
from .device import resolve_device
from .device_step import DeviceStep, OUT_KEYS, compile_blocker, cuda_graph_blocker
from .ema import build_teacher
from .engine import (activation_bytes, build_engine, free_memory_bytes, gathered, init_distributed, memory_plan,
                     wants_deepspeed)
from .eval import evaluate_models, format_results, load_eval_sets, load_shard_retrieval_set, log_to_tensorboard
from .metrics import MetricsLog, log_train_scalars, open_tensorboard, write_retrieval
from .ops.contrastive import CosmosLoss, resolve_contrastive_impl
from .model import create_model, set_attention_backend
from .model.checkpoint import check_state_dict, select_state_dict, strip_prefix, torch_load
from .model.config import resolve_model_config
from .profiling import PhaseTimer
from .schedules import MomentumSchedule, WarmupCosineLR
from .step import train_step

log = logging.getLogger("cosmos_fast.trainer")


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row, or the weights became non-finite (nothing was saved)."""


class Preempted(RuntimeError):
    """Training stopped on SIGTERM or SIGINT after writing a checkpoint."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.signum = signum


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def loss_operands(cfg: Config, device: torch.device) -> str:
    """``model.loss_operands`` for :class:`CosmosLoss`: ``auto`` becomes bf16 when the fused loss runs
    on CUDA in an AMP run (train.precision amp_bf16 / amp_fp16: autocast hands the loss fp32
    features), else it stays ``auto`` (the features' own dtype there)."""
    o = cfg.model.loss_operands
    if o == "auto" and cfg.train.precision != "fp32" and device.type == "cuda" \
            and resolve_contrastive_impl(cfg.model.loss_impl, device) == "fused":
        return "bf16"
    return o


def check_config(cfg: Config, world_size: int = 1, cuda: bool | None = None, check_files: bool = False) -> list[str]:
    """The start-up checks, before any data is read: :func:`cosmos_fast.config.validate` (what the
    values alone show), then what needs the package and the machine (the model name resolves, the
    patch size divides the crops, numba / apex / CUDA are there, the shard URLs are allowed and, with
    ``check_files``, every local shard exists, every worker gets a shard). Returns the notes."""
    notes = validate(cfg, world_size)
    cuda = torch.cuda.is_available() if cuda is None else cuda
    d, t = cfg.data, cfg.train
    try:
        mcfg = resolve_model_config(cfg.model.name)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model.name: {err}") from None
    if d.augment == "fused" and not numba_available():
        raise ConfigError("config field data.augment = 'fused' needs numba (pip install numba); use 'torchvision' or 'auto'")
    for path, value in (("eval.retrieval_root", cfg.eval.retrieval_root), ("eval.imagenet_val", cfg.eval.imagenet_val),
                        ("eval.sun397_root", cfg.eval.sun397_root)):
        if value and not Path(value).is_dir():
            raise ConfigError(f"config field {path} = {value!r} is not a folder")
    if cfg.distributed.optimizer == "apex_fused_adam" and importlib.util.find_spec("apex") is None:
        raise ConfigError("distributed.optimizer = apex_fused_adam but NVIDIA apex is not installed")
    patch = mcfg.vision_cfg.patch_size
    gsize = d.global_size or mcfg.vision_cfg.image_size
    for path, size in (("data.global_size", gsize), ("data.local_size", d.local_size)):
        if size % patch:
            raise ConfigError(f"config field {path} = {size} is not a multiple of the patch size {patch}")
    if t.precision != "fp32" and not cuda:
        raise ConfigError(f"config field train.precision = {t.precision!r} needs CUDA; use fp32 on CPU")
    if t.device.startswith("cuda") and not cuda:
        raise ConfigError(f"config field train.device = {t.device!r} but CUDA is not available")
    deepspeed = cfg.distributed.backend == "deepspeed" or world_size > 1
    blockers = (("train.cuda_graph", t.cuda_graph,
                 cuda_graph_blocker(cfg, "cuda" if cuda and t.device != "cpu" else "cpu", world_size, deepspeed)),
                ("train.compile", t.compile, compile_blocker(cfg, world_size, deepspeed)))
    for path, value, blocker in blockers:
        if value == "on" and blocker is not None:
            raise ConfigError(f"config field {path} = 'on' is impossible here: {blocker}; set it to auto or off")
    n_shards = len(expand_shards(d.train_shards))
    for field_name, shards in (("data.train_shards", d.train_shards), ("data.val_shards", d.val_shards)):
        urls = expand_shards(shards) if shards else []
        try:
            check_pipe_urls(urls, d.allow_pipe, field_name)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        missing = missing_local_shards(urls) if check_files else []
        if missing:
            raise ConfigError(f"config field {field_name} = {shards!r} matches {len(urls) - len(missing)} of "
                              f"{len(urls)} local files; missing: {', '.join(missing[:3])}"
                              f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''}")
    workers = max(1, d.num_workers)
    if not d.resampled and n_shards < workers * world_size:
        raise ConfigError(f"data.train_shards has {n_shards} shards but data.num_workers × world size = "
                          f"{workers} × {world_size} = {workers * world_size}: every worker needs a shard "
                          f"(the official loader's rule); lower data.num_workers or set data.resampled=true")
    return notes


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
        self.notes = check_config(cfg, self.world, check_files=True)     # before anything is built or written
        self.out = Path(output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.metrics_path = self.out / "metrics.jsonl"
        self.metrics = MetricsLog(self.metrics_path, self.is_main)
        make_output_dir(self.out)
        auto = resume is None and cfg.train.auto_resume and not overwrite     # --overwrite starts anew
        if auto:
            resume = newest_checkpoint(self.ckpt_dir, self.use_ds)
        claim_output_dir(self.out, resume, overwrite, self.is_main)
        if self.world > 1:
            dist.barrier()
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
        student = create_model(cfg.model.name, pool_impl=cfg.model.pool_impl,
                               truncate_captions=cfg.model.truncate_captions).to(self.device)
        student.set_grad_checkpointing(cfg.model.grad_checkpointing)
        teacher = build_teacher(student)               # fp32, before any partitioning
        seed_everything(cfg.train.seed + self.rank)
        self.loss_fn = CosmosLoss(impl=cfg.model.loss_impl, grad_semantics=cfg.distributed.grad_semantics,
                                  operands=loss_operands(cfg, self.device), workspace_mb=cfg.model.loss_workspace_mb)
        self.engine = build_engine(cfg, student, teacher, self.device, rank=self.rank, world=self.world,
                                   deepspeed=self.use_ds,
                                   config_out=self.out / "deepspeed_config.json" if self.is_main else None)

        self.loader = self._build_loader()
        self.steps_per_epoch = self.loader.steps_per_epoch
        self.total_steps = self.steps_per_epoch * cfg.optim.epochs
        self.lr_schedule = WarmupCosineLR(cfg.optim.lr, cfg.optim.warmup, self.total_steps)
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
        self._pending: list[dict] = []      # CUDA-graph steps whose losses the host has not read yet
        self._timed_steps: list[float] = []
        self._flush_tick = time.perf_counter()
        if resume:
            if auto:
                log.info("auto-resume: found %s", resume)
            self.resume(resume)
        else:
            self.metrics.start()
        if self.is_main:                                # every resolved config is kept
            if not resume or not (self.out / "config.yaml").is_file():
                save_config(cfg, self.out / "config.yaml")
            if resume:
                save_config(cfg, self.out / f"config.resumed-{self.step}.yaml")
        self.tb = open_tensorboard(self.out / "tb", self.step) if cfg.train.tensorboard and self.is_main else None
        self._log_start()
        self._setup_step_paths()

    # the engine's models and optimizer (the student is the unwrapped module under DeepSpeed)
    student = property(lambda self: self.engine.student)
    teacher = property(lambda self: self.engine.teacher)
    optimizer = property(lambda self: self.engine.optimizer)
    stage = property(lambda self: self.engine.stage)

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
            raise ConfigError(
                f"data.batch_size = {d.batch_size} needs an estimated {act / 2 ** 30:.1f} GiB of activations on "
                f"{self.device} (plus {state / 2 ** 30:.2f} GiB of gradients and optimizer state), but only "
                f"{free / 2 ** 30:.1f} GiB are free: lower data.batch_size, set model.grad_checkpointing=true, "
                f"or set train.memory_check=false to try anyway")

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
        backend = resolve_backend(d.backend)
        return build_loader(spec, backend, **({"device": self.device} if backend == "dali" else {}))

    def _memory_plan(self) -> tuple[int, dict]:
        """(student parameter count, memory_plan bytes per rank) for this run's stage, world and precision."""
        n = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in self.student.parameters())
        return n, memory_plan(n, self.stage, self.world, self.cfg.train.precision)

    def _log_start(self):
        n, plan = self._memory_plan()
        mb = {k: f"{v / 2 ** 20:.1f} MB" for k, v in plan.items()}
        log.info("model %s: %.2fM parameters; per rank (%s, ZeRO-%d, %d ranks): student weights %s, gradients %s, "
                 "optimizer %s, fp32 teacher %s, total %s", self.cfg.model.name, n / 1e6,
                 self.engine.name, self.stage, self.world, mb["student_weights"],
                 mb["gradients"], mb["optimizer"], mb["teacher"], mb["total"])
        for note in self.notes:
            log.info(note)
        mx = self.cfg.train.max_steps
        stop = (f"; train.max_steps = {mx}: this run stops at step {self.target_steps}"
                if mx is not None and mx < self.total_steps else "")
        log.info("device %s, precision %s, %d steps/epoch × %d epochs = %d steps in the schedule%s "
                 "(starting at step %d)", self.device, self.cfg.train.precision, self.steps_per_epoch,
                 self.cfg.optim.epochs, self.total_steps, stop, self.step)

    def _setup_step_paths(self) -> None:
        """``train.compile`` and ``train.cuda_graph``: resolve ``auto``, switch on what runs, log why."""
        t, dev = self.cfg.train, self.device.type
        blocker = compile_blocker(self.cfg, self.world, self.use_ds)
        if t.compile == "auto":
            self.compiled = dev == "cuda" and blocker is None
            why = blocker or ("CUDA" if self.compiled else
                              f"the device is {dev}: there the compile takes minutes and the compiled step was not faster")
        else:
            self.compiled, why = t.compile == "on", "set in the config"
        if self.compiled:
            self.student.set_compiled_blocks(True)
            self.teacher.set_compiled_blocks(True)
        log.info("train.compile = %s: transformer blocks %s (%s)", t.compile,
                 "compiled (one graph per token shape; the first step includes the compile)" if self.compiled
                 else "eager", why)
        blocker = cuda_graph_blocker(self.cfg, dev, self.world, self.use_ds)
        graph = t.cuda_graph == "on" or (t.cuda_graph == "auto" and blocker is None)
        self.device_step = DeviceStep(self.engine, self.loss_fn, self.cfg.ema.order, capture=True) if graph else None
        log.info("train.cuda_graph = %s: %s", t.cuda_graph,
                 "the step is captured once as a CUDA graph and replayed, non-finite losses skipped on the device "
                 "(metrics read every train.log_every_steps steps)" if graph
                 else f"eager step ({blocker or 'set in the config'})")

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
        m = self.momentum(self.step)
        crops = [c.to(self.device, non_blocking=True) for c in batch["crops"]]
        captions = batch["captions"].to(self.device, non_blocking=True)
        timed = len(self._timed_steps) < 2 and (self.compiled or self.device_step is not None)
        start = time.perf_counter()
        if self.device_step is not None:
            # no host sync: the losses and the skip flag stay on the device until the next flush
            vec = self.device_step(crops, captions, lr, m)
            self.step += 1
            self._pending.append({"step": self.step, "epoch": self.epoch + 1, "time": time.time(), "vec": vec,
                                  "lr": lr, "momentum": m, "skipped": dict(batch["skipped"])})
            out = {"finite": True, "deferred": True}
        else:
            self.engine.set_lr(lr)
            out = train_step(self.engine, self.loss_fn, crops, captions, momentum=m, ema_order=self.cfg.ema.order,
                             timer=self.timer)
            out.update(lr=lr, momentum=m)
        if timed:
            self._time_first_steps(start)
        if out.get("deferred"):
            return out
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

    def _time_first_steps(self, start: float) -> None:
        """Log the compile / warm-up cost: the first step's time against the second's."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._timed_steps.append(time.perf_counter() - start)
        if len(self._timed_steps) == 2:
            first, second = self._timed_steps
            log.info("first step %.2f s, second %.2f s: about %.1f s of torch.compile and warm-up in the first "
                     "(train.compile %s, train.cuda_graph %s)", first, second, max(first - second, 0.0),
                     "on" if self.compiled else "off", "on" if self.device_step is not None else "off")

    def _flush(self) -> dict | None:
        """The CUDA-graph path: read the pending steps' losses on the host (one sync), write their
        metrics rows and count their non-finite losses as the eager path does (a skipped step
        writes no row and counts in ``nonfinite_steps``; too many in a row stop the run). Returns
        the last row written, if any."""
        if not self._pending:
            return None
        pending, self._pending = self._pending, []
        values = torch.stack([p["vec"] for p in pending]).tolist()
        now = time.perf_counter()
        rate = len(pending) * self.cfg.data.batch_size * self.world / max(now - self._flush_tick, 1e-9)
        self._flush_tick = now
        last = None
        for p, v in zip(pending, values):
            out = dict(zip(OUT_KEYS, v), lr=p["lr"], momentum=p["momentum"])
            if not out["finite"]:
                self.nonfinite_total += 1
                self.nonfinite_run += 1
                log.warning("step %d: non-finite loss (clip %s, distill %s); step skipped on the device (%d in a row)",
                            p["step"], out["clip_loss"], out["distill_loss"], self.nonfinite_run)
                if self.nonfinite_run >= self.cfg.train.max_nonfinite:
                    raise NonFiniteLossError(
                        f"{self.nonfinite_run} non-finite losses in a row (train.max_nonfinite = "
                        f"{self.cfg.train.max_nonfinite}); stopping. {self._last_good_text()}")
                continue
            self.nonfinite_run = 0
            last = self._record(out, p["skipped"], rate, step=p["step"], epoch=p["epoch"], when=p["time"])
        return last

    # ----------------------------------------------------------------- train
    def _done(self) -> bool:
        mx = self.cfg.train.max_steps
        return self.step >= self.total_steps or (mx is not None and self.step >= mx)

    def train(self) -> dict:
        t = self.cfg.train
        target = self.target_steps
        bar = tqdm(total=target, initial=self.step, desc=t.name, unit="step", dynamic_ncols=True,
                   disable=not t.progress or not self.is_main)
        global_batch = self.cfg.data.batch_size * self.world
        last = {}
        start_step, start_time = self.step, time.perf_counter()
        self._flush_tick = start_time
        previous_handlers = self._install_stop_handlers()
        try:
            while not self._done():
                self.loader.set_epoch(self.epoch)
                tick = time.perf_counter()
                for batch in self._batches():
                    self.timer.add("data_wait", time.perf_counter() - tick)
                    out = self.train_step(batch)
                    if out.get("deferred"):               # the CUDA-graph step: rows written at flushes
                        tick = time.perf_counter()
                        if (t.log_every_steps and self.step % t.log_every_steps == 0) or self._done():
                            last = self._flush() or last
                    elif not out["finite"]:
                        continue
                    else:
                        now = time.perf_counter()
                        last = self._record(out, self._global_skips(batch["skipped"]),
                                            global_batch / max(now - tick, 1e-9))
                        tick = now
                    if last and t.log_every_steps and self.step % t.log_every_steps == 0:
                        self._log_progress(last, start_step, start_time)
                    bar.update(1)
                    if last:
                        bar.set_postfix(loss=f"{last['loss']:.4f}", clip=f"{last['clip_loss']:.4f}",
                                        distill=f"{last['distill_loss']:.4f}",
                                        samples_s=f"{last['samples_per_s']:.1f}",
                                        skipped=sum(last["skipped_samples"].values()))
                    if t.save_every_steps and self.step % t.save_every_steps == 0:
                        self.save()
                    if t.eval_every_steps and self.step % t.eval_every_steps == 0 and self.cfg.data.val_shards:
                        self.log_eval(self.evaluate())
                    if self.cfg.eval.every_steps and self.step % self.cfg.eval.every_steps == 0:
                        self.zero_shot_eval()
                    if self._should_stop():
                        self._stop_with_checkpoint()
                    if self._done():
                        break
                if self.loader.consumed >= self.steps_per_epoch:      # the epoch is complete
                    last = self._flush() or last
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
        last = self._flush() or last
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

    def _stop_with_checkpoint(self):
        name = signal.Signals(self._stop_signal).name
        log.warning("%s received: saving a checkpoint at step %d and exiting", name, self.step)
        self.save()
        raise Preempted(f"stopped by {name} after step {self.step}; checkpoint saved", self._stop_signal)

    def _batches(self):
        """The loader's batches. Ctrl-C reaches the loader's workers too (one process group) and they
        exit: when that happens while this process waits for a batch, the stop that was asked for
        happens here, at the same step boundary, instead of a "worker exited" error."""
        batches = iter(self.loader)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except RuntimeError:
                if not self._stop_requested:
                    raise
                self._stop_with_checkpoint()
            yield batch

    def _should_stop(self) -> bool:
        if self.world == 1:
            return self._stop_requested
        flag = torch.tensor([1.0 if self._stop_requested else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)          # every rank stops (and saves) together
        return bool(flag.item())

    def _global_skips(self, skipped: dict) -> dict:
        if self.world == 1:
            return dict(skipped)
        parts = [None] * self.world
        dist.all_gather_object(parts, dict(skipped))
        total = {}
        for part in parts:
            for k, v in part.items():
                total[k] = total.get(k, 0) + v
        return total

    def _record(self, out: dict, skipped: dict, samples_per_s: float, *, step: int | None = None,
                epoch: int | None = None, when: float | None = None) -> dict:
        row = {"step": self.step if step is None else step, "epoch": self.epoch + 1 if epoch is None else epoch,
               "time": round(time.time() if when is None else when, 3), "loss": float(out["loss"]), "clip_loss": float(out["clip_loss"]),
               "distill_loss": float(out["distill_loss"]), "lr": out["lr"], "momentum": out["momentum"],
               "logit_scale": float(out["logit_scale"]), "distill_logit_scale": float(out["distill_logit_scale"]),
               "samples_per_s": samples_per_s, "skipped_samples": dict(skipped),
               "nonfinite_steps": self.nonfinite_total}
        self.metrics.append(row)
        if self.tb is not None:
            log_train_scalars(self.tb, row, self.step)
        return row

    # ------------------------------------------------------------------ eval
    def evaluate(self) -> dict:
        """Image↔text retrieval on data.val_shards for student and teacher: ``{model: {i2t_r{1,5,10},
        t2i_r{1,5,10}, n_images, n_texts}}``. The evaluator of ``cosmos-fast eval --val-shards``; every
        rank encodes the whole set (as many forwards on every rank, so ZeRO-3 gathers stay in step)."""
        if self._val is None:
            self._val = load_shard_retrieval_set(self.cfg.data.val_shards)
        keep = ("i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5", "i2t_r10", "t2i_r10", "n_images", "n_texts")
        results = {}
        for name, model in (("student", self.student), ("teacher", self.teacher)):
            with gathered(model, self.stage == 3):          # every rank takes part under ZeRO-3
                metrics = evaluate_models(
                    {name: model}, sets=[self._val], batch_size=self.cfg.data.eval_batch_size, num_workers=0,
                    image_size=self.cfg.data.global_size or self.student.cfg.vision_cfg.image_size,
                    device=self.device, distributed=False, progress=False)[name][self._val.name]
            results[name] = {k: metrics[k] for k in keep}
        return results

    def zero_shot_eval(self) -> dict | None:
        """COCO / Flickr30k retrieval and ImageNet (and SUN397) zero-shot classification of student
        and teacher, on every rank (features sharded and gathered); rank 0 writes zero_shot.jsonl."""
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
            write_retrieval(self.out / "eval.jsonl", self.tb, self.step, results)

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "data": self.loader.state_dict(),
                "rng": rng_state(), "nonfinite_total": self.nonfinite_total, "world": self.world,
                "nonfinite_run": self.nonfinite_run, "overflows": self.overflows}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.loader.load_state_dict(state["data"])
        set_rng_state(state["rng"])
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
        flags = [torch.isfinite(self.engine.local_values(p)).all()
                 for model in (self.student, self.teacher) for p in model.parameters()]
        flag = torch.stack(flags).all().float() if flags else torch.ones((), device=self.device)
        if self.world > 1:
            flag = flag.to(self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def save(self, epoch_file: bool = False) -> Path | None:
        """Checkpoint the run in the engine's format (an official-format file, or a DeepSpeed tag folder).
        Non-finite weights are never written: NonFiniteLossError names the newest finite checkpoint."""
        self._flush()                        # the CUDA-graph steps' rows and skip counts first
        if not self.weights_finite():
            raise NonFiniteLossError(f"the weights are non-finite at step {self.step}: not saving a checkpoint. "
                                     f"{self._last_good_text()}")
        self._saved_step = self.step
        self._last_good = self.engine.save(self.ckpt_dir, trainer_state=self.state_dict(), epoch=self.epoch,
                                           step=self.step, name=self.cfg.train.name, config=self.cfg.to_dict(),
                                           epoch_file=epoch_file, keep_last=self.cfg.distributed.keep_last)
        log.info("checkpoint saved at step %d: %s%s", self.step, self._last_good,
                 f" and epoch_{self.epoch}.pt" if epoch_file and self.engine.writes_files else "")
        return self._last_good

    def resume(self, source) -> None:
        """Continue from ``source`` (a checkpoint file, a DeepSpeed tag folder, or a run or checkpoints
        folder: :func:`cosmos_fast.checkpointing.find_checkpoint`). Exactly (optimizer, schedules, RNG,
        data position) from a checkpoint of this engine's format; else the weights (and an exported
        run's schedule position) with a marker line in metrics.jsonl."""
        path = Path(source)
        if path.is_dir():
            try:
                path = find_checkpoint(path)
            except FileNotFoundError as e:
                raise FileNotFoundError(f"--resume {e}") from None
        if path.is_dir():                                   # a DeepSpeed tag folder
            self.load_state_dict(self.engine.load_tag(path, trust=self.trust_checkpoint,
                                                      check_config=self._check_config_change))
            self._last_good = path
            self.metrics.truncate(self.step)
            log.info("resumed DeepSpeed checkpoint %s at step %d (epoch %d, %d batches into it)", path,
                     self.step, self.epoch, self.loader.consumed)
            return
        body = torch_load(path, trust=self.trust_checkpoint)
        student_sd = strip_prefix(select_state_dict(body, "student", path))
        teacher_sd = (strip_prefix(select_state_dict(body, "teacher", path))
                      if isinstance(body, dict) and "teacher" in body else student_sd)
        for model, sd in ((self.student, student_sd), (self.teacher, teacher_sd)):
            with self.engine.gathered(model):
                check_state_dict(model, sd, path)
            self.engine.load_full_state_dict(model, sd)
        position = body.get("cosmos_fast_position") if isinstance(body, dict) else None
        if not self.engine.writes_files or "trainer" not in body:
            if position:      # an exported run: continue its schedules (e.g. on another number of ranks)
                self.step, self.epoch = int(position["step"]), int(position["epoch"])
                self.loader.load_state_dict({"epoch": self.epoch, "consumed": 0})
                log.warning("--resume %s: weights and schedule position (step %d, epoch %d); AdamW moments "
                            "start fresh and epoch %d's data order restarts", path, self.step, self.epoch,
                            self.epoch + 1)
                self.metrics.mark(f"resumed weights and schedule position from {path}", self.step)
                return
            log.warning("--resume %s: loading weights only (no optimizer, schedule, RNG or data position%s): "
                        "starting a new run from these weights", path,
                        "; a single-process file cannot restore DeepSpeed optimizer partitions"
                        if not self.engine.writes_files and "trainer" in body else "")
            self.metrics.mark(f"new run from the weights of {path}", self.step)
            return
        self._check_config_change(body.get("config"), body["trainer"].get("world", 1), path)
        self.engine.load_training_state(body)
        self.load_state_dict(body["trainer"])
        self._last_good = path
        self.metrics.truncate(self.step)
        log.info("resumed %s at step %d (epoch %d, %d batches into it)", path, self.step, self.epoch,
                 self.loader.consumed)

    def _check_config_change(self, old: dict | None, old_world: int, source) -> None:
        check_config_change(old, self.cfg.to_dict(), old_world, self.world, source,
                            allow=self.allow_config_change, config_path=self.out / "config.yaml")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self._log_file is not None:
            logging.getLogger("cosmos_fast").removeHandler(self._log_file)
            self._log_file.close()
            self._log_file = None
