"""One rank of the paper's 128-GPU COSMOS run on one device: official-style vs generic vs fast.

The official code on W ranks (global batch B_g = W·B) has every rank all-gather both sides of each
of the 80 pairs and compute all 80 B_g×B_g logit matrices (cosmos_method.md §3.4, §8). One device
reproduces one rank's work exactly: local batch B (``--batch``, default 32), the other W − 1 ranks'
features fixed random normalised blocks (``--world``, default 128 ⇒ B_g = 4096), collectives served
by the simulated world of :mod:`benchmarks.rank_sim` (no torch.distributed; see there what a
gather and a reduction return). Paths, on the same weights and batch, timed interleaved:

  official       repeat pooling (``pool_impl="reference"``), the reference loss fed the simulated
                 gather (the full B_g×B_g loss of all 80 pairs on this rank; 1/W gradient semantics
                 as DDP), the Python-loop EMA of the official code, ``torch.optim.AdamW`` with its
                 defaults (torch picks its foreach kernels on CUDA; ``--official-adamw loop``: off),
                 eager towers; precision ``--precision`` (bf16 autocast on CUDA)
  official_fp16  the same in the official precision: fp16 autocast + GradScaler (CUDA only)
  generic        the same algorithm plus what anyone could add to the official code:
                 ``torch.compile`` of the towers (``--generic-compile``: regional = each
                 transformer block, whole = the student and teacher modules, off), fused AdamW,
                 the foreach EMA (:func:`cosmos_fast.ema.ema_update`)
  fast           the trainer as configured: a config tree (:data:`FAST_OVERRIDES` plus
                 ``--fast-override KEY=VALUE``) built as the trainer builds it (:func:`build_fast`):
                 local rows × gathered columns with the fused (CUDA) / blockwise (CPU) loss,
                 shared/absorbed pooling, the trainer's engine and step

Equality first. (1) Every rank at a small scale (``--check-model``, W = 4, B = 8, CPU, fp32): for
each rank r the simulation is run with rank r's own batch and the others' features computed from
theirs, the fast path in lockstep (the other ranks as threads, so the simulation equals a real
4-rank run): each rank's loss and gradients of the fast and generic paths must equal the official
per-rank computation, and the per-rank official gradients must sum to a single-process full-batch
computation (network weights; each rank's logit-scale gradients are the full ones, as DDP gives).
(2) At the benchmark's scale: the loss value of one rank, each path against the official path in
fp32 (the fast path in lockstep, forward only; the generic path from its first step, same weights).

Reported per path: samples/s per rank (median step, p20, p80), the phase breakdown (student towers,
pooling, teacher forward, loss, backward, EMA, optimizer: CUDA events on GPU, perf_counter on CPU,
inside the timed steps; the pooling split is a pre-hook on the student's image token mapping),
first-step time (compile), extra peak memory of a step (harness.peak_memory), MFU on the official
FLOP count (FlopCounterMode over one official step, math attention; the official per-rank loss is
≈ 3 TFLOP at B_g = 4096) and utilisation on the executed FLOPs (the fast path counted with the
blockwise loss and shared pooling standing in for the Triton kernels, which the counter cannot see),
and the modelled communication per rank and step: the collectives each path's loss issues, counted
by the simulated world (ring bytes), plus the gradient reduction (DDP all-reduce of fp32 gradients
for the official-style paths; the configured ZeRO stage for the fast path, benchmarks/comm_model.py).

    python benchmarks/bench_rank.py                                   # GPU: ViT-B-16, B = 32, W = 128
    .venv/bin/python benchmarks/bench_rank.py --model tiny --batch 4 --world 8 --reps 2 --device cpu
    python benchmarks/bench_rank.py --check-only                      # the equality checks alone

Rows: ``<out>/rank/<device>_<date>_<sha>.csv`` (``--out``, default a temporary folder; never
bench_results/ unless asked), long format (benchmarks/harness.py).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.bench_train import _stats, count_flops, device_peak, make_batch, parse_model  # noqa: E402
from benchmarks.comm_model import comm_volume  # noqa: E402
from benchmarks.harness import add_record_arg, env_info, peak_memory, save_results  # noqa: E402
from benchmarks.rank_sim import SimLoss, SimWorld  # noqa: E402
from cosmos_fast.config import load_config  # noqa: E402
from cosmos_fast.ema import build_teacher  # noqa: E402
from cosmos_fast.engine import AMP_DTYPES, LocalEngine, build_engine  # noqa: E402
from cosmos_fast.model import create_model  # noqa: E402
from cosmos_fast.model.config import resolve_model_config  # noqa: E402
from cosmos_fast.ops.contrastive import CosmosLoss, resolve_contrastive_impl  # noqa: E402
from cosmos_fast.ops.cross_pool import resolve_cross_pool_impl  # noqa: E402
from cosmos_fast.optim import param_groups  # noqa: E402
from cosmos_fast.profiling import NULL_TIMER  # noqa: E402
from cosmos_fast.step import cosmos_forward_loss, train_step  # noqa: E402
from cosmos_fast.trainer import loss_operands  # noqa: E402

PATHS = ("official", "official_fp16", "generic", "fast")
MOMENTUM = 0.99                     # the official EMA momentum of the 4096-batch runs
N_LOCAL, N_CAPS = 6, 8
# The fast path's config: the trainer's config tree with these overrides (then the run's precision,
# model and --fast-override). The issue-16 levers join here once their keys exist in config.py:
FAST_OVERRIDES = (
    "model.pool_impl=auto",
    "model.loss_impl=auto",
    "distributed.grad_semantics=official",
    "distributed.optimizer=torch_adamw",
    "ema.order=before_step",
    # "train.compile=true",
    # "train.cuda_graph=true",
    "optim.fused_update=auto",
    "model.truncate_captions=true",
    "model.loss_operands=auto",
    "model.loss_workspace_mb=256",
)
PHASE_COLS = ("towers_fwd", "pooling", "teacher_fwd", "loss", "backward", "ema", "optimizer", "other")
# the trainer's phase names → this benchmark's (student_forward is split at the pooling mark)
_PHASE_NAMES = {"teacher_forward": "teacher_fwd", "loss": "loss", "backward": "backward", "ema": "ema",
                "optimizer": "optimizer"}


# ----------------------------------------------------------------------------- timing
class EventTimer:
    """The PhaseTimer interface of :func:`cosmos_fast.step.train_step`, without synchronising inside
    the step: CUDA events on GPU, perf_counter on CPU; :meth:`flush` (after the step) adds the
    step's phases to the totals. ``mark("pool_start")`` inside the student forward splits it into
    towers and pooling."""

    enabled = True

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.totals: dict[str, float] = defaultdict(float)
        self.steps = 0
        self._spans, self._marks = [], []

    def _now(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def _ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    @contextlib.contextmanager
    def phase(self, name: str):
        start = self._now()
        try:
            yield
        finally:
            self._spans.append((name, start, self._now()))

    def mark(self, name: str) -> None:
        self._marks.append((name, self._now()))

    def add(self, name: str, seconds: float) -> None:
        pass

    def flush(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        marks = dict(self._marks)
        for name, a, b in self._spans:
            if name == "student_forward":
                m = marks.get("pool_start")
                if m is not None:
                    self.totals["towers_fwd"] += self._ms(a, m)
                    self.totals["pooling"] += self._ms(m, b)
                else:
                    self.totals["towers_fwd"] += self._ms(a, b)
            elif name in _PHASE_NAMES:
                self.totals[_PHASE_NAMES[name]] += self._ms(a, b)
        self._spans, self._marks = [], []
        self.steps += 1

    def mean_ms(self) -> dict[str, float]:
        return {k: v / max(1, self.steps) for k, v in self.totals.items()}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- paths
def official_ema(teacher, student, momentum: float) -> None:
    """The official EMA (train.py:190-193): one Python loop over the parameter pairs."""
    with torch.no_grad():
        for param_q, param_k in zip(student.parameters(), teacher.parameters()):
            param_k.data.mul_(momentum).add_((1 - momentum) * param_q.detach().data)


class OfficialEngine(LocalEngine):
    """LocalEngine with the official Python-loop EMA."""

    def ema(self, momentum: float) -> None:
        official_ema(self.teacher, self.student, momentum)


def compile_towers(model, mode: str) -> None:
    """``regional``: each transformer block of both towers (one compiled block per shape, reused by
    every layer); ``whole``: the module; ``off``: nothing."""
    if mode == "off":
        return
    dyn = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):    # 3 shapes × student/teacher × fwd/bwd
        if hasattr(dyn, name):
            setattr(dyn, name, max(getattr(dyn, name), 64))
    if mode == "regional":
        for blocks in (model.visual.transformer.resblocks, model.transformer.resblocks):
            for block in blocks:
                block.compile(dynamic=False)
    elif mode == "whole":
        model.compile(dynamic=False)
    else:
        raise ValueError(f"--generic-compile must be regional, whole or off, got {mode!r}")


class RankPath:
    """One path: its own student, teacher, optimizer (in an engine) and loss, run in ``sim``."""

    def __init__(self, name, engine, loss_fn, sim, device, precision, info: dict, pool_split: bool = True,
                 momentum: float = MOMENTUM, ema_order: str = "before_step"):
        self.name, self.engine, self.sim, self.device, self.precision = name, engine, sim, device, precision
        self.momentum, self.ema_order = momentum, ema_order
        self.loss = SimLoss(loss_fn)
        self.info = info                       # case columns: pool_impl, loss_impl, compile, ...
        self.timer = NULL_TIMER
        self.times: list[float] = []
        self.first_step_s = float("nan")
        self.first_loss = float("nan")
        if pool_split:
            self.student.image_token_mapping.register_forward_pre_hook(self._pool_mark)

    student = property(lambda self: self.engine.student)
    teacher = property(lambda self: self.engine.teacher)

    def _pool_mark(self, module, args):
        if hasattr(self.timer, "mark"):
            self.timer.mark("pool_start")

    def step(self, batch, timer=None) -> dict:
        """One training step (the trainer's :func:`cosmos_fast.step.train_step`) as rank r."""
        self.timer = timer or NULL_TIMER
        try:
            with self.sim.active():
                return train_step(self.engine, self.loss, batch["crops"], batch["captions"], momentum=self.momentum,
                                  ema_order=self.ema_order, timer=self.timer)
        finally:
            self.timer = NULL_TIMER

    def forward_loss(self, batch, lockstep: bool = False, fp32: bool = False) -> float:
        """The step's loss from the current weights, forward only (no update)."""
        ctx = contextlib.nullcontext() if fp32 else self.engine.forward_context()
        with torch.no_grad(), self.sim.active(lockstep=lockstep), ctx:
            losses = cosmos_forward_loss(self.student, self.teacher, self.loss, batch["crops"], batch["captions"])
        return float(losses["loss"])

    def forward_backward(self, batch, lockstep: bool = False):
        """(loss, {parameter name: gradient}) from the current weights (no update; no loss scaling)."""
        self.engine.zero_grad()
        with self.sim.active(lockstep=lockstep):
            with self.engine.forward_context():
                losses = cosmos_forward_loss(self.student, self.teacher, self.loss, batch["crops"], batch["captions"])
            losses["loss"].backward()
        grads = {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
                 for n, p in self.student.named_parameters()}
        self.engine.zero_grad()
        return float(losses["loss"].detach()), grads


def _autocast(device, precision):
    dtype = AMP_DTYPES[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else None


def fast_config(model_name, precision: str, extra=()):
    """The fast path's config: the trainer's tree with FAST_OVERRIDES, the run's model and
    precision, then ``extra`` (``--fast-override``)."""
    over = list(FAST_OVERRIDES) + [f"train.precision={precision}", f"ema.momentum={MOMENTUM}"]
    if isinstance(model_name, str):
        over.append(f"model.name={model_name}")
    return load_config(None, over + list(extra))   # unknown keys / wrong types refused by name


def build_official(base, teacher, device, precision, sim, cfg, adamw: str = "default") -> RankPath:
    """``adamw``: ``default`` (the official call: torch picks foreach on CUDA) or ``loop`` (foreach
    and fused off: the per-parameter loop of older torch releases)."""
    student = copy.deepcopy(base)
    student.pool_impl = "reference"
    o = cfg.optim
    kw = {"foreach": False, "fused": False} if adamw == "loop" else {}
    opt = torch.optim.AdamW(param_groups(student, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, **kw)
    scaler = torch.amp.GradScaler("cuda") if precision == "amp_fp16" else None
    engine = OfficialEngine(student, copy.deepcopy(teacher), opt, autocast=_autocast(device, precision), scaler=scaler)
    name = "official_fp16" if precision == "amp_fp16" else "official"
    return RankPath(name, engine, CosmosLoss("reference"), sim, device, precision,
                    {"pool_impl": "reference", "loss_impl": "reference", "compile": "off",
                     "optimizer": f"adamw_{adamw}", "ema": "python_loop"})


def build_generic(base, teacher, device, precision, sim, cfg, compile_mode: str) -> RankPath:
    student = copy.deepcopy(base)
    student.pool_impl = "reference"
    t = copy.deepcopy(teacher)
    compile_towers(student, compile_mode)
    compile_towers(t, compile_mode)
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(student, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            fused=True)
    engine = LocalEngine(student, t, opt, autocast=_autocast(device, precision))
    return RankPath("generic", engine, CosmosLoss("reference"), sim, device, precision,
                    {"pool_impl": "reference", "loss_impl": "reference", "compile": compile_mode,
                     "optimizer": "adamw_fused", "ema": "foreach"}, pool_split=compile_mode != "whole")


def build_fast(cfg, base, teacher, device, sim) -> RankPath:
    """The trainer's build (cosmos_fast.trainer.Trainer._build) of student, teacher, loss and engine,
    on copies of the shared weights. Where the issue-16 levers plug in once merged: see the report."""
    student = copy.deepcopy(base)
    student.pool_impl = cfg.model.pool_impl
    student.set_grad_checkpointing(cfg.model.grad_checkpointing)
    student.truncate_captions = cfg.model.truncate_captions
    t = copy.deepcopy(teacher)
    t.truncate_captions = cfg.model.truncate_captions
    loss_fn = CosmosLoss(impl=cfg.model.loss_impl, grad_semantics=cfg.distributed.grad_semantics,
                         operands=loss_operands(cfg, device), workspace_mb=cfg.model.loss_workspace_mb)
    engine = build_engine(cfg, student, t, device)
    p = student.text_attn_cross_pool
    info = {"pool_impl": resolve_cross_pool_impl(cfg.model.pool_impl, device, (N_CAPS, p.n_head, p.d_model)),
            "loss_impl": resolve_contrastive_impl(cfg.model.loss_impl, device), "compile": "config",
            "optimizer": cfg.distributed.optimizer + ("_fused" if device.type == "cuda" else ""), "ema": "foreach"}
    return RankPath("fast", engine, loss_fn, sim, device, cfg.train.precision, info, momentum=cfg.ema.momentum,
                    ema_order=cfg.ema.order)


# ----------------------------------------------------------------------------- inputs
def split_features(s: dict, t: dict) -> dict:
    return {"s_image_features": s["image_features"], "s_text_features": s["text_features"],
            "s_img_crossmodal_features": s["img_crossmodal_features"],
            "s_txt_crossmodal_features": s["txt_crossmodal_features"],
            "t_image_features": t["image_features"], "t_text_features": t["text_features"]}


def random_peers(world: int, b: int, dim: int, device, seed: int = 1) -> dict:
    """Fixed random normalised (W, rows, D) blocks for every feature argument (fp32)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    rows = {"s_image_features": 2 + N_LOCAL, "s_text_features": N_CAPS, "s_img_crossmodal_features": 2 + N_LOCAL,
            "s_txt_crossmodal_features": N_CAPS, "t_image_features": 2, "t_text_features": 2}
    return {k: torch.nn.functional.normalize(torch.randn(world, n * b, dim, generator=g), dim=-1).to(device)
            for k, n in rows.items()}


def rank_features(student, teacher, batches: list, b: int) -> dict:
    """Every rank's features (no grad) from its own batch: the peers of an exact simulation."""
    per = defaultdict(list)
    with torch.no_grad():
        for batch in batches:
            crops, caps = batch["crops"], batch["captions"]
            s = student(crops, caps, batch_size=b)
            t = teacher(torch.cat([crops[0], crops[1]]), caps[:2 * b])
            for k, v in split_features(s, t).items():
                per[k].append(v.float())
    return {k: torch.stack(v) for k, v in per.items()}


def global_batch(batches: list, b: int) -> dict:
    """The W local batches as one single-process batch (crops rank-major, captions caption-major)."""
    crops = [torch.cat([bt["crops"][i] for bt in batches]) for i in range(len(batches[0]["crops"]))]
    n_caps = batches[0]["captions"].shape[0] // b
    caps = torch.cat([bt["captions"][k * b:(k + 1) * b] for k in range(n_caps) for bt in batches])
    return {"crops": crops, "captions": caps}


def _to(batch, device):
    return {"crops": [c.to(device) for c in batch["crops"]], "captions": batch["captions"].to(device)}


def _batch(mcfg, b, seed, device):
    image = mcfg.vision_cfg.image_size
    local = 96 if image >= 224 else max(mcfg.vision_cfg.patch_size, image // 2)
    return _to(make_batch(b, image, local, mcfg.text_cfg.vocab_size, mcfg.text_cfg.context_length, seed=seed,
                          n_local=N_LOCAL, n_caps=N_CAPS), device)


# ----------------------------------------------------------------------------- equality
SCALES = ("logit_scale", "distill_logit_scale")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _flat(grads: dict, keep=lambda n: True) -> torch.Tensor:
    return torch.cat([g.flatten().double() for n, g in grads.items() if keep(n)])


def check_every_rank(model="tiny", world: int = 4, batch: int = 8, seed: int = 0, fast_overrides=(),
                     loss_tol: float = 1e-5, grad_tol: float = 1e-4) -> dict:
    """The small-scale equality of the module docstring, on CPU in fp32. Returns the largest errors;
    raises SystemExit when a path differs."""
    device = torch.device("cpu")
    spec = parse_model(model) if isinstance(model, str) else model
    mcfg = resolve_model_config(spec)
    torch.manual_seed(seed)
    base = create_model(spec, pool_impl="reference", truncate_captions=False)   # official: 77 tokens
    teacher = build_teacher(base)
    batches = [_batch(mcfg, batch, seed + 100 + r, device) for r in range(world)]
    peers = rank_features(base, teacher, batches, batch)
    cfg = fast_config(spec, "fp32", fast_overrides)
    sim = SimWorld(world, 0, peers, backend="gloo")
    paths = {"official": build_official(base, teacher, device, "fp32", sim, cfg),
             "generic": build_generic(base, teacher, device, "fp32", sim, cfg, "off"),
             "fast": build_fast(cfg, base, teacher, device, sim)}
    # the single-process computation on the global batch (W = 1: no simulated world)
    full = copy.deepcopy(base)
    full.zero_grad(set_to_none=True)
    gb = global_batch(batches, batch)
    out = cosmos_forward_loss(full, teacher, CosmosLoss("reference"), gb["crops"], gb["captions"])
    out["loss"].backward()
    full_loss = float(out["loss"].detach())
    full_grads = {n: p.grad.detach().clone() for n, p in full.named_parameters()}
    err = defaultdict(float)
    summed = None
    for r in range(world):
        sim_r = SimWorld(world, r, peers, backend="gloo")
        res = {}
        for name, p in paths.items():
            p.sim = sim_r
            res[name] = p.forward_backward(batches[r], lockstep=name == "fast")
        lo, go = res["official"]
        for name in ("generic", "fast"):
            lx, gx = res[name]
            err[f"{name}_loss_rel_err"] = max(err[f"{name}_loss_rel_err"], abs(lx - lo) / abs(lo))
            err[f"{name}_grad_rel_err"] = max(err[f"{name}_grad_rel_err"], _rel(_flat(gx), _flat(go)))
        err["rank_loss_vs_full_rel_err"] = max(err["rank_loss_vs_full_rel_err"], abs(lo - full_loss) / full_loss)
        scale_err = _rel(_flat(go, lambda n: n in SCALES), _flat(full_grads, lambda n: n in SCALES))
        err["scale_grad_vs_full_rel_err"] = max(err["scale_grad_vs_full_rel_err"], scale_err)
        summed = go if summed is None else {n: summed[n] + g for n, g in go.items()}
    err["summed_grad_vs_full_rel_err"] = _rel(_flat(summed, lambda n: n not in SCALES),
                                              _flat(full_grads, lambda n: n not in SCALES))
    err = dict(err)
    print(f"every-rank equality (CPU fp32, model {mcfg.name}, W={world}, B={batch}, B_g={world * batch}): full-batch "
          f"loss {full_loss:.6f}; " + ", ".join(f"{k} {v:.2e}" for k, v in err.items()))
    bad = {k: v for k, v in err.items() if not v <= (loss_tol if "loss" in k else grad_tol)}
    if bad:
        raise SystemExit(f"per-rank equality failed (loss tol {loss_tol:g}, gradient tol {grad_tol:g}): {bad}")
    return err


def check_full_scale(paths: dict, batch, ref: RankPath) -> dict:
    """One rank's loss value, each path against the official path in fp32 (forward only; the fast
    path in lockstep). fp32 runs: rel. err ≤ 1e-4; low precision: at most twice the official path's
    own error in that precision + 1e-3 (bench_train's rule)."""
    truth = ref.forward_loss(batch, fp32=True)
    vals = {name: p.forward_loss(batch, lockstep=name == "fast") for name, p in paths.items() if name != "generic"}
    if "official" not in vals:
        vals["official"] = ref.forward_loss(batch)
    errs = {name: abs(v - truth) / abs(truth) for name, v in vals.items()}
    own = errs.get("official", 0.0)
    print(f"one-rank loss at scale: official fp32 {truth:.6f}; " + ", ".join(
        f"{n} {vals[n]:.6f} (rel err {errs[n]:.2e})" for n in vals))
    for name, e in errs.items():
        if (paths[name].precision if name in paths else ref.precision) == "fp32":
            allowed = 1e-4
        elif name.startswith("official"):
            allowed = 5e-2                       # the official paths set the low-precision error scale
        else:
            allowed = 2 * own + 1e-3
        if not e <= allowed:
            raise SystemExit(f"path {name}: one-rank loss {vals[name]:.6f} differs from the official fp32 loss "
                             f"{truth:.6f} (rel err {e:.2e} > {allowed:.2e})")
    return {"truth": truth, "values": vals, "rel_err": errs}


# ----------------------------------------------------------------------------- communication
def comm_rows(path: RankPath, counted: dict, n_params: int, world: int, b: int, cfg) -> dict:
    """Per-rank bytes per step: the loss's collectives (counted) + the gradient reduction (model)."""
    out = {f"comm_{op}_bytes": v[1] for op, v in counted.items()}
    out["loss_collectives"] = sum(v[0] for v in counted.values())
    out["comm_loss_bytes"] = sum(v[1] for v in counted.values())
    if path.name == "fast":
        stage = cfg.distributed.zero_stage
        gb = 2 if path.precision != "fp32" else 4
        v = comm_volume(n_params, stage, world, batch=b, grad_bytes=gb, param_bytes=gb)
        out["comm_grad_bytes"] = v["grad_reduce"] + v["param_allgather_after_step"] + v["zero3_param_gather"]
        out["comm_grad_model"] = f"ZeRO-{stage}, {gb}-byte gradients"
    else:
        out["comm_grad_bytes"] = comm_volume(n_params, 0, world, batch=b, grad_bytes=4)["grad_reduce"]
        out["comm_grad_model"] = "DDP all-reduce of fp32 gradients"
    out["comm_total_bytes"] = out["comm_loss_bytes"] + out["comm_grad_bytes"]
    return out


# ----------------------------------------------------------------------------- main
def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    precision = args.precision if args.precision != "auto" else ("amp_bf16" if cuda else "fp32")
    wanted = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = [p for p in wanted if p not in PATHS]
    if unknown or not wanted:
        raise SystemExit(f"--paths: unknown {unknown}; choose from {PATHS}")
    if "official_fp16" in wanted and not cuda:
        print("note: official_fp16 (fp16 + GradScaler) needs CUDA; skipped")
        wanted.remove("official_fp16")
    compile_mode = args.generic_compile or ("regional" if cuda else "off")
    info = env_info(device)
    print(" ".join(f"{k}={v}" for k, v in info.items()),
          f"model={args.model if len(args.model) < 40 else 'dict'} B={args.batch} W={args.world} "
          f"B_g={args.batch * args.world} precision={precision}")

    small = {}
    if args.small_check:                                            # ---- equality, every rank
        t0 = time.perf_counter()
        small = check_every_rank(args.check_model, world=args.check_world, batch=args.check_batch, seed=args.seed,
                                 fast_overrides=args.fast_override)
        print(f"  ({time.perf_counter() - t0:.1f} s)")

    spec = parse_model(args.model)
    mcfg = resolve_model_config(spec)
    torch.manual_seed(args.seed)
    base = create_model(spec, pool_impl="reference", truncate_captions=False)   # official: 77 tokens.to(device)
    teacher = build_teacher(base)
    n_params = sum(p.numel() for p in base.parameters())
    batch = _batch(mcfg, args.batch, args.seed, device)
    peers = random_peers(args.world, args.batch, mcfg.embed_dim, device, seed=args.seed + 1)
    sim = SimWorld(args.world, args.rank, peers, backend="nccl" if cuda else "gloo")
    cfg = fast_config(spec, precision, args.fast_override)
    paths = {}
    for name in wanted:
        if name == "official":
            paths[name] = build_official(base, teacher, device, precision, sim, cfg, args.official_adamw)
        elif name == "official_fp16":
            paths[name] = build_official(base, teacher, device, "amp_fp16", sim, cfg, args.official_adamw)
        elif name == "generic":
            paths[name] = build_generic(base, teacher, device, precision, sim, cfg, compile_mode)
        else:
            paths[name] = build_fast(cfg, base, teacher, device, sim)

    if "fast" in paths:                  # compile the loss kernels before threads launch them
        paths["fast"].forward_loss(batch)
    # the official path in the run's precision: the check's truth and the FLOP count (built if not timed)
    ref_path = paths.get("official") or build_official(base, teacher, device, precision, sim, cfg, args.official_adamw)
    full = check_full_scale(paths, batch, ref_path)                 # ---- equality at scale
    rows_check = {"loss_official_fp32": full["truth"]}
    if args.check_only:
        rows = [{**_case(args, precision, p), **small, **rows_check, "loss_value": full["values"].get(n, float("nan")),
                 "loss_rel_err_vs_official_fp32": full["rel_err"].get(n, float("nan"))} for n, p in paths.items()]
        return _write(args, rows, device)

    flops_official = count_flops(ref_path, batch)["flops_step"]     # ---- FLOPs
    del ref_path
    flops_exec = {}
    if "fast" in paths:
        fp = paths["fast"]
        inner, pool = fp.loss.inner, fp.student.pool_impl
        fp.loss.inner = CosmosLoss("blockwise", grad_semantics=cfg.distributed.grad_semantics)
        fp.student.pool_impl = "shared" if fp.info["pool_impl"] == "fused" else pool
        try:
            flops_exec["fast"] = count_flops(fp, batch)["flops_step"]
        finally:
            fp.loss.inner, fp.student.pool_impl = inner, pool
    peak, peak_source = device_peak(device, AMP_DTYPES[precision] or torch.float32, args.peak_tflops)
    print(f"official FLOPs per rank step: {flops_official / 1e12:.3f} TFLOP "
          f"({flops_official / args.batch / 1e9:.1f} GFLOP/sample); peak {peak:.3g} TFLOP/s ({peak_source})")

    for name, p in list(paths.items()):                             # ---- warm-up (compiles)
        for i in range(max(1, args.warmup)):
            _sync(device)
            t0 = time.perf_counter()
            try:
                out = p.step(batch)
            except Exception as e:                  # a compiler missing on the machine: eager, said so
                if name != "generic" or compile_mode == "off" or i:
                    raise
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                print(f"note: torch.compile failed for the generic path ({reason}); it runs eager")
                torch._dynamo.reset()
                p = paths[name] = build_generic(base, teacher, device, precision, sim, cfg, "off")
                p.info["compile"] = f"off (compile failed: {reason[:80]})"
                _sync(device)
                t0 = time.perf_counter()
                out = p.step(batch)
            _sync(device)
            if i == 0:
                p.first_step_s = time.perf_counter() - t0
                p.first_loss = float(out["loss"])
        p.timer_acc = EventTimer(device)
    del base
    order = list(paths.values())                                    # ---- timing, interleaved
    if "generic" in paths:                 # same weights and batch as the check: its first step's loss
        ref_loss = full["values"]["official"]
        e = abs(paths["generic"].first_loss - ref_loss) / abs(ref_loss)
        full["rel_err"]["generic"] = abs(paths["generic"].first_loss - full["truth"]) / abs(full["truth"])
        full["values"]["generic"] = paths["generic"].first_loss
        print(f"generic: first-step loss {paths['generic'].first_loss:.6f} vs official {ref_loss:.6f} (rel {e:.2e})")
        if not e <= (1e-4 if precision == "fp32" else 2e-2):
            raise SystemExit(f"generic path: first-step loss differs from the official path's (rel err {e:.2e})")
    for i in range(args.reps):
        for p in (order if i % 2 == 0 else order[::-1]):
            _sync(device)
            t0 = time.perf_counter()
            p.step(batch, timer=p.timer_acc)
            _sync(device)
            p.times.append(time.perf_counter() - t0)
            p.timer_acc.flush()

    rows = []
    for name, p in paths.items():                                   # ---- memory, communication
        sim.reset_comm()
        mem = peak_memory(lambda p=p: p.step(batch), device)
        counted = sim.comm()
        st = _stats(p.times)
        phases = p.timer_acc.mean_ms()
        row = {**_case(args, precision, p), "params": n_params,
               "median_ms": st["median_s"] * 1e3, "p20_ms": st["p20_s"] * 1e3, "p80_ms": st["p80_s"] * 1e3,
               "samples_per_s": args.batch / st["median_s"], "first_step_ms": p.first_step_s * 1e3}
        for ph in PHASE_COLS[:-1]:
            row[f"t_{ph}_ms"] = phases.get(ph, float("nan") if ph == "pooling" else 0.0)
        row["t_other_ms"] = row["median_ms"] - sum(v for k, v in row.items() if k.startswith("t_") and v == v)
        row["peak_mib"] = mem / 2 ** 20
        row.update(comm_rows(p, counted, n_params, args.world, args.batch, cfg))
        row["flops_official_step"] = flops_official
        row["mfu_official"] = flops_official / st["median_s"] / (peak * 1e12)
        row["flops_executed_step"] = executed = flops_exec.get(name, flops_official)
        row["util_executed"] = executed / st["median_s"] / (peak * 1e12)
        row["peak_tflops"] = peak
        row.update(small)
        row.update(rows_check)
        row["loss_value"] = full["values"].get(name, float("nan"))
        row["loss_rel_err_vs_official_fp32"] = full["rel_err"].get(name, float("nan"))
        rows.append(row)
    by = {r["path"]: r for r in rows}
    for r in rows:
        for ref in ("official", "generic"):
            if ref in by:
                r[f"speedup_vs_{ref}"] = by[ref]["median_ms"] / r["median_ms"]
    print_table(rows)
    return _write(args, rows, device)


def _case(args, precision, p: RankPath) -> dict:
    return {"model": args.model if not args.model.strip().startswith("{") else "dict", "B": args.batch,
            "world": args.world, "B_g": args.batch * args.world, "rank": args.rank, "path": p.name,
            "precision": p.precision, **p.info, "reps": args.reps,
            "fast_overrides": " ".join(args.fast_override) if p.name == "fast" else ""}


CASE = ("model", "B", "world", "B_g", "rank", "path", "precision", "pool_impl", "loss_impl", "compile", "optimizer",
        "ema", "reps", "fast_overrides", "comm_grad_model")


def _write(args, rows, device) -> dict:
    out = {"rows": rows, "csv": None}
    if not args.no_csv:
        root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_rank_"))
        out["csv"] = save_results("rank", rows, device, case=CASE, root=root, record_run=args.record)
    return out


def print_table(rows):
    ph = " ".join(f"{p[:9]:>9s}" for p in PHASE_COLS)
    head = (f"{'path':14s} {'ms':>8s} {'samp/s':>8s} {ph} {'peak MiB':>9s} {'MFU off':>8s} {'util ex':>8s} "
            f"{'comm MB':>8s} {'vs off':>7s} {'vs gen':>7s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        phs = " ".join(f"{r[f't_{p}_ms']:9.2f}" for p in PHASE_COLS)
        print(f"{r['path']:14s} {r['median_ms']:8.2f} {r['samples_per_s']:8.2f} {phs} {r['peak_mib']:9.1f} "
              f"{r.get('mfu_official', float('nan')):8.2%} {r.get('util_executed', float('nan')):8.2%} "
              f"{r['comm_total_bytes'] / 1e6:8.1f} {r.get('speedup_vs_official', float('nan')):6.2f}x "
              f"{r.get('speedup_vs_generic', float('nan')):6.2f}x")
    print("(phases: mean ms per step inside the timed steps; comm: modelled bytes per rank per step)")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ViT-B-16", help="tiny, ViT-B-16, ViT-B-32, or an open_clip-style JSON dict")
    ap.add_argument("--batch", type=int, default=32, help="local batch B of the simulated rank")
    ap.add_argument("--world", type=int, default=128, help="simulated ranks W (B_g = W·B)")
    ap.add_argument("--rank", type=int, default=0, help="which rank this device plays")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {PATHS}")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "amp_bf16", "amp_fp16"],
                    help="auto: amp_bf16 on CUDA, fp32 on CPU (official_fp16 is always fp16 + GradScaler)")
    ap.add_argument("--official-adamw", default="default", choices=["default", "loop"],
                    help="the official paths' AdamW: torch's defaults (foreach on CUDA), or foreach and fused off")
    ap.add_argument("--generic-compile", default=None, choices=["regional", "whole", "off"],
                    help="torch.compile of the generic path's towers (default regional on CUDA, off on CPU)")
    ap.add_argument("--fast-override", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for the fast path (repeatable), e.g. train.compile=true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per path (the first one compiles)")
    ap.add_argument("--reps", "--steps", dest="reps", type=int, default=10, help="timed steps per path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (see bench_train)")
    ap.add_argument("--small-check", action=argparse.BooleanOptionalAction, default=True,
                    help="the every-rank equality at a small scale (CPU) first")
    ap.add_argument("--check-model", default="tiny", help="model of the every-rank equality")
    ap.add_argument("--check-world", type=int, default=4)
    ap.add_argument("--check-batch", type=int, default=8)
    ap.add_argument("--check-only", action="store_true", help="run the equality checks, then stop")
    ap.add_argument("--out", default=None, help="results root: rows go to OUT/rank/ (default: a temp folder)")
    ap.add_argument("--no-csv", action="store_true")
    add_record_arg(ap)
    args = ap.parse_args(argv)
    if not 0 <= args.rank < args.world:
        ap.error(f"--rank {args.rank} must lie in [0, --world {args.world})")
    return args


def main(argv=None):
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
