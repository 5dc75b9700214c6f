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
import random
import time
from pathlib import Path

import numpy as np
import torch

from .config import Config, save_config, validate
from .data.captions import Tokenizer
from .data.loader import StreamSpec, WebDatasetLoader, expand_shards, steps_per_epoch
from .ema import MomentumSchedule, build_teacher
from .loss import CosmosLoss
from .model import create_model, set_attention_backend
from .model.checkpoint import save_checkpoint, select_state_dict, strip_prefix, check_state_dict, torch_load
from .optim import build_adamw
from .schedules import WarmupCosineLR
from .step import cosmos_train_step

log = logging.getLogger("cosmos_fast.trainer")


class NonFiniteLossError(RuntimeError):
    pass


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
    def __init__(self, cfg: Config, output_dir, resume=None, rank: int = 0, world_size: int = 1):
        self.cfg, self.rank, self.world = cfg, rank, world_size
        self.notes = validate(cfg, world_size)
        self.out = Path(output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.out.mkdir(parents=True, exist_ok=True)
        self._log_file = logging.FileHandler(self.out / "train.log")
        self._log_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        pkg_log = logging.getLogger("cosmos_fast")
        pkg_log.addHandler(self._log_file)
        if pkg_log.getEffectiveLevel() > logging.INFO:     # the run log always gets INFO lines
            pkg_log.setLevel(logging.INFO)
        self.device = self._device(cfg.train.device)
        set_attention_backend(cfg.model.attention)

        # build: identical student on every rank (seed + 0), then seed + rank (official main.py)
        seed_everything(cfg.train.seed)
        self.student = create_model(cfg.model.name, pool_impl=cfg.model.pool_impl).to(self.device)
        self.student.set_grad_checkpointing(cfg.model.grad_checkpointing)
        self.teacher = build_teacher(self.student)
        seed_everything(cfg.train.seed + rank)
        self.loss_fn = CosmosLoss(impl=cfg.model.loss_impl)
        o = cfg.optim
        extra = {"fused": True} if self.device.type == "cuda" else {}
        self.optimizer = build_adamw(self.student, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                     weight_decay=o.weight_decay, **extra)
        amp = {"amp_bf16": torch.bfloat16, "amp_fp16": torch.float16}.get(cfg.train.precision)
        self.amp_dtype = amp
        self.scaler = torch.amp.GradScaler("cuda") if cfg.train.precision == "amp_fp16" else None

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
        self.metrics_path = self.out / "metrics.jsonl"
        if resume:
            self.resume(resume)
        else:
            self.metrics_path.write_text("")
        save_config(cfg, self.out / "config.yaml")
        self.tb = self._tensorboard() if cfg.train.tensorboard else None
        self._log_start()

    # ----------------------------------------------------------------- build
    @staticmethod
    def _device(name: str) -> torch.device:
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(name)

    def _build_loader(self) -> WebDatasetLoader:
        d, m = self.cfg.data, self.student.cfg
        spec = StreamSpec(
            shards=expand_shards(d.train_shards), batch_size=d.batch_size, seed=self.cfg.train.seed,
            rank=self.rank, world=self.world, num_workers=d.num_workers,
            steps_per_epoch=steps_per_epoch(d.train_num_samples, d.batch_size * self.world, d.num_workers),
            resampled=d.resampled, shuffle_buffer=d.shuffle_buffer, shuffle_initial=d.shuffle_initial,
            caption_mode=d.caption_mode, num_captions=d.num_captions, string_fields=d.string_fields,
            global_size=d.global_size or m.vision_cfg.image_size, local_size=d.local_size,
            n_local=d.local_crops, crop_scale=d.crop_scale, tokenizer_name="ViT-B-16",
            context_length=m.text_cfg.context_length)
        return WebDatasetLoader(spec)

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard is not installed; TensorBoard scalars are off")
            return None
        return SummaryWriter(str(self.out / "tb"))

    def _log_start(self):
        n = sum(p.numel() for p in self.student.parameters())
        fp32 = 4 * n
        log.info("model %s: %.2fM parameters; student %.1f MB + fp32 teacher %.1f MB + AdamW state %.1f MB",
                 self.cfg.model.name, n / 1e6, fp32 / 2 ** 20, fp32 / 2 ** 20, 2 * fp32 / 2 ** 20)
        for note in self.notes:
            log.info(note)
        log.info("device %s, precision %s, %d steps/epoch × %d epochs = %d steps (starting at step %d)",
                 self.device, self.cfg.train.precision, self.steps_per_epoch, self.cfg.optim.epochs,
                 self.total_steps, self.step)

    # ------------------------------------------------------------------ step
    def train_step(self, batch) -> dict:
        """One optimizer step on a batch; returns the losses (``finite`` False = step skipped)."""
        lr = self.lr_schedule(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        m = self.momentum(self.step)
        crops = [c.to(self.device, non_blocking=True) for c in batch["crops"]]
        captions = batch["captions"].to(self.device, non_blocking=True)
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None else None)
        out = cosmos_train_step(self.student, self.teacher, self.loss_fn, self.optimizer, crops, captions,
                                momentum=m, ema_order=self.cfg.ema.order, scaler=self.scaler,
                                autocast=autocast, grad_clip_norm=self.cfg.optim.grad_clip_norm)
        out.update(lr=lr, momentum=m)
        if not out["finite"]:
            self.nonfinite_total += 1
            self.nonfinite_run += 1
            log.warning("step %d: non-finite loss (clip %s, distill %s); step skipped (%d in a row)",
                        self.step + 1, float(out["clip_loss"]), float(out["distill_loss"]), self.nonfinite_run)
            if self.nonfinite_run >= self.cfg.train.max_nonfinite:
                raise NonFiniteLossError(
                    f"{self.nonfinite_run} non-finite losses in a row (train.max_nonfinite = "
                    f"{self.cfg.train.max_nonfinite}); stopping. The last good checkpoint is "
                    f"{self.ckpt_dir / 'epoch_latest.pt'}")
            return out
        self.nonfinite_run = 0
        if out["overflow"]:
            self.overflows += 1
            log.info("step %d: fp16 gradient overflow, GradScaler skipped the update (scale now %.0f)",
                     self.step + 1, self.scaler.get_scale())
        self.step += 1
        return out

    # ----------------------------------------------------------------- train
    def _done(self) -> bool:
        mx = self.cfg.train.max_steps
        return self.step >= self.total_steps or (mx is not None and self.step >= mx)

    def train(self) -> dict:
        from tqdm import tqdm

        t = self.cfg.train
        target = min(self.total_steps, t.max_steps or self.total_steps)
        bar = tqdm(total=target, initial=self.step, desc=t.name, unit="step", dynamic_ncols=True,
                   disable=not t.progress or self.rank != 0)
        global_batch = self.cfg.data.batch_size * self.world
        last = {}
        try:
            while not self._done():
                self.loader.set_epoch(self.epoch)
                tick = time.perf_counter()
                for batch in self.loader:
                    out = self.train_step(batch)
                    if not out["finite"]:
                        continue
                    now = time.perf_counter()
                    last = self._record(out, batch["skipped"], global_batch / max(now - tick, 1e-9))
                    tick = now
                    bar.update(1)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", clip=f"{last['clip_loss']:.4f}",
                                    distill=f"{last['distill_loss']:.4f}", samples_s=f"{last['samples_per_s']:.1f}",
                                    skipped=sum(last["skipped_samples"].values()))
                    if t.save_every_steps and self.step % t.save_every_steps == 0:
                        self.save()
                    if t.eval_every_steps and self.step % t.eval_every_steps == 0 and self.cfg.data.val_shards:
                        self.log_eval(self.evaluate())
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
        if self._saved_step != self.step:
            self.save()
        return last

    def _record(self, out: dict, skipped: dict, samples_per_s: float) -> dict:
        row = {"step": self.step, "loss": float(out["loss"]), "clip_loss": float(out["clip_loss"]),
               "distill_loss": float(out["distill_loss"]), "lr": out["lr"], "momentum": out["momentum"],
               "logit_scale": float(self.student.logit_scale.detach().exp()),
               "distill_logit_scale": float(self.student.distill_logit_scale.detach().exp()),
               "samples_per_s": samples_per_s, "skipped_samples": dict(skipped),
               "nonfinite_steps": self.nonfinite_total}
        if self.rank == 0:
            with open(self.metrics_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
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
        return {name: retrieval_eval(model, images, tokens, owner, bs)
                for name, model in (("student", self.student), ("teacher", self.teacher))}

    def log_eval(self, results: dict) -> None:
        line = ", ".join(f"{m} i2t R@1 {r['i2t_r1']:.3f} t2i R@1 {r['t2i_r1']:.3f}" for m, r in results.items())
        log.info("step %d retrieval: %s", self.step, line)
        if self.rank == 0:
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
                "rng": _rng_state(), "nonfinite_total": self.nonfinite_total,
                "nonfinite_run": self.nonfinite_run, "overflows": self.overflows}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.loader.load_state_dict(state["data"])
        _set_rng_state(state["rng"])
        self.nonfinite_total = int(state["nonfinite_total"])
        self.nonfinite_run = int(state["nonfinite_run"])
        self.overflows = int(state.get("overflows", 0))

    def save(self, epoch_file: bool = False) -> Path | None:
        if self.rank != 0:
            return None
        self._saved_step = self.step
        extra = {"optimizer": self.optimizer.state_dict(), "trainer": self.state_dict(),
                 "config": self.cfg.to_dict()}
        if self.scaler is not None:
            extra["scaler"] = self.scaler.state_dict()
        path = save_checkpoint(self.ckpt_dir / "epoch_latest.pt", self.student, self.teacher,
                               epoch=self.epoch, name=self.cfg.train.name, **extra)
        if epoch_file:
            save_checkpoint(self.ckpt_dir / f"epoch_{self.epoch}.pt", self.student, self.teacher,
                            epoch=self.epoch, name=self.cfg.train.name, **extra)
        return path

    def resume(self, source) -> None:
        path = Path(source)
        if path.is_dir():
            for cand in (path / "checkpoints" / "epoch_latest.pt", path / "epoch_latest.pt"):
                if cand.is_file():
                    path = cand
                    break
            else:
                raise FileNotFoundError(f"--resume {source}: no checkpoints/epoch_latest.pt in that folder")
        body = torch_load(path)
        student_sd = strip_prefix(select_state_dict(body, "student", path))
        teacher_sd = (strip_prefix(select_state_dict(body, "teacher", path))
                      if isinstance(body, dict) and "teacher" in body else student_sd)
        for model, sd in ((self.student, student_sd), (self.teacher, teacher_sd)):
            check_state_dict(model, sd, path)
            model.load_state_dict(sd)
        self.teacher.float()
        if "trainer" not in body:
            log.warning("--resume %s holds weights only (no optimizer, schedule, RNG or data position): "
                        "starting a new run from these weights", path)
            self.metrics_path.write_text("")
            return
        self.optimizer.load_state_dict(body["optimizer"])
        if self.scaler is not None and "scaler" in body:
            self.scaler.load_state_dict(body["scaler"])
        self.load_state_dict(body["trainer"])
        self._truncate_metrics()
        log.info("resumed %s at step %d (epoch %d, %d batches into it)", path, self.step, self.epoch,
                 self.loader.consumed)

    def _truncate_metrics(self) -> None:
        if not self.metrics_path.is_file():
            self.metrics_path.write_text("")
            return
        keep = [line for line in self.metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= self.step]
        self.metrics_path.write_text("".join(line + "\n" for line in keep))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        logging.getLogger("cosmos_fast").removeHandler(self._log_file)
        self._log_file.close()

