"""One COSMOS training step, end to end: the official-style path vs our fast path, plus data loading.

Paths (same model weights, same pre-built batch, one process, one run)
  reference  repeat-the-context cross-attention pooling + the official per-pair B×B loss
             (``pool_impl="reference"``, ``CosmosLoss("reference")``), every caption at full length,
             torch AdamW + the foreach EMA
  fast       shared-K/V pooling + the fused loss: Triton on CUDA (``fused``/``fused``), the same
             algorithms in PyTorch on CPU (``shared``/``blockwise``), truncated captions
             (``model.truncate_captions``), the EMA + AdamW in one pass (``optim.fused_update``)

Each path is a full ``cosmos_fast.step.cosmos_train_step``: student forward (8 crops, 8 captions,
two poolers), teacher forward (no grad), the 80-pair loss, backward, EMA of the teacher, AdamW step.
On CUDA the student runs under bf16 autocast (``--precision``), the teacher in fp32, as the trainer.

Before anything is timed, both paths run forward + backward from the same weights on the batch and
their losses and gradients must agree (fp32: loss rel. err ≤ 1e-4, gradient ‖Δg‖/‖g‖ ≤ 1e-3;
bf16: 2e-2 / 5e-2). Steps of the two paths are then interleaved (ABAB…, order alternating) so that
load from other processes hits both alike; the ratio is only meaningful within one run.

Reported per path: step time (median, p20, p80), samples/s, the per-phase breakdown from
``cosmos_fast.profiling.PhaseTimer`` (data_wait = host→device copy of the pre-built batch; on CPU the
timed steps are the breakdown steps since the timer does not synchronise there; on CUDA a separate
pass with the synchronising timer follows the timed one), the extra peak memory of one step
(harness.peak_memory: allocator peak on CUDA, dispatch-level storage tracker on CPU), and MFU.

FLOP count (the MFU numerator)
  ``torch.utils.flop_counter.FlopCounterMode`` — a dispatch-level counter of matmul/conv/attention
  ops — is run over one complete training step of the *reference* path, with attention forced to the
  math SDPA decomposition (the counter has no formula for CPU flash attention; the math path issues
  the same matmuls). The counter cannot see inside Triton kernels, which is why it counts the
  reference and the same number (the useful work of one official step) is the numerator for both
  paths. Per-phase FLOPs (student / teacher forward, loss, backward) are counted the same way.
  Elementwise work (softmax, LayerNorm, AdamW, EMA) is not counted, as is usual for MFU.
MFU = counted FLOPs per step / median step time / peak of the device that ran it: on CUDA the
dense spec-sheet peak for the compute dtype (``--peak-tflops`` overrides; unknown GPUs use a measured
matmul); on CPU there is no spec sheet, so the peak is a measured fp32 matmul (2048³, best of 5) at
the thread count of the run — CPU MFU is "fraction of what torch's GEMM reaches here".

Data loading (``--data``, on by default): the torchvision loader and the DALI loader
(``cosmos_fast.data.backends``; DALI on CUDA when present, its CPU backend otherwise) read the same
webdataset shards (``--shards``, or synthetic demo shards written once at 256 px) with the same
StreamSpec; one epoch warms up (DALI builds its indexes), the next is timed. Rows go beside the
step rows so one can see whether the loader keeps up with the fast step.

    .venv/bin/python benchmarks/bench_train.py --model tiny --batch 2
    .venv/bin/python benchmarks/bench_train.py --model ViT-B-32 --batch 2 --reps 3 --warmup 1
    python benchmarks/bench_train.py --model ViT-B-16 --batch 64          # GPU, official batch
    .venv/bin/python benchmarks/bench_train.py --model '{"embed_dim": 32, ...}' --batch 2 --no-data

Rows: ``<results>/train/<device>_<date>_<sha>.csv`` and ``<results>/train_data/...``; ``<results>`` is
``--results-dir``, else ``$COSMOS_BENCH_RESULTS``, else ``bench_results/``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.harness import add_record_arg, env_info, peak_memory, record, write_csv  # noqa: E402
from cosmos_fast.ema import build_teacher  # noqa: E402
from cosmos_fast.data.stream import StreamSpec, expand_shards  # noqa: E402
from cosmos_fast.data.synthetic import write_demo_data  # noqa: E402
from cosmos_fast.engine import AMP_DTYPES  # noqa: E402
from cosmos_fast.fused_update import FusedEmaAdamW  # noqa: E402
from cosmos_fast.ops.contrastive import CosmosLoss  # noqa: E402
from cosmos_fast.model import create_model  # noqa: E402
from cosmos_fast.model.attention import attention_backend  # noqa: E402
from cosmos_fast.model.config import resolve_model_config  # noqa: E402
from cosmos_fast.optim import build_adamw  # noqa: E402
from cosmos_fast.profiling import PHASES, PhaseTimer  # noqa: E402
from cosmos_fast.step import cosmos_forward_loss, cosmos_train_step  # noqa: E402

N_LOCAL, N_CAPS = 6, 8
MOMENTUM = 0.999
# Dense (no sparsity) spec-sheet peaks, TFLOP/s, by GPU name substring and compute dtype.
GPU_PEAK_TFLOPS = {
    "H200": {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7},   # fp32 = TF32 tensor cores
    "H100": {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7},   # SXM
    "A100": {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0},
    "L40S": {"bfloat16": 362.1, "float16": 362.1, "float32": 183.0},
    "A10": {"bfloat16": 125.0, "float16": 125.0, "float32": 62.5},
}


# ----------------------------------------------------------------------------- results
def results_dir(arg: str | None = None) -> Path:
    """--results-dir, else $COSMOS_BENCH_RESULTS, else <repo>/bench_results."""
    return Path(arg or os.environ.get("COSMOS_BENCH_RESULTS") or REPO / "bench_results")


# ----------------------------------------------------------------------------- inputs
def parse_model(spec: str):
    """A model name (tiny, ViT-B-16, ViT-B-32, ...) or an open_clip-style JSON dict."""
    return json.loads(spec) if spec.strip().startswith("{") else spec


def make_batch(b: int, image_size: int, local_size: int, vocab: int, context: int, seed: int = 0,
               n_local: int = N_LOCAL, n_caps: int = N_CAPS) -> dict:
    """2 global + n_local local crops and n_caps caption-major token rows (SOT … EOT, zero pad)."""
    g = torch.Generator().manual_seed(seed)
    crops = [torch.randn(b, 3, image_size, image_size, generator=g) for _ in range(2)]
    crops += [torch.randn(b, 3, local_size, local_size, generator=g) for _ in range(n_local)]
    caps = torch.zeros(n_caps * b, context, dtype=torch.long)
    lengths = torch.randint(4, min(context - 1, 30), (n_caps * b,), generator=g)
    for i, n in enumerate(lengths.tolist()):
        caps[i, 0] = vocab - 2                                          # start of text
        caps[i, 1:n] = torch.randint(1, vocab - 2, (n - 1,), generator=g)
        caps[i, n] = vocab - 1                                          # end of text (the argmax)
    return {"crops": crops, "captions": caps}


# ----------------------------------------------------------------------------- paths
class TrainPath:
    """One implementation path: its own copy of the student, teacher, optimizer and loss."""

    def __init__(self, name, student, teacher, pool_impl, loss_impl, device, amp_dtype):
        self.name, self.pool_impl, self.loss_impl = name, pool_impl, loss_impl
        self.student = copy.deepcopy(student)
        self.student.pool_impl = pool_impl
        self.teacher = copy.deepcopy(teacher)
        # official-style: every caption at the full context (no truncation; model.truncate_captions)
        self.student.truncate_captions = self.teacher.truncate_captions = name != "reference"
        self.loss_fn = CosmosLoss(loss_impl)
        extra = {"fused": True} if device.type == "cuda" else {}
        if name == "reference":
            self.optimizer = build_adamw(self.student, lr=1e-5, weight_decay=0.5, **extra)
        else:                          # the EMA + AdamW in one pass over flat buffers (optim.fused_update)
            self.optimizer = FusedEmaAdamW(self.student, self.teacher, lr=1e-5, weight_decay=0.5)
        self.device, self.amp_dtype = device, amp_dtype
        self.timer = PhaseTimer(enabled=False, device=device)
        self.times: list[float] = []

    def autocast(self):
        if self.amp_dtype is None:
            return None
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to_device(self, batch, timer=None):
        t0 = time.perf_counter()
        crops = [c.to(self.device, non_blocking=True) for c in batch["crops"]]
        caps = batch["captions"].to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        (self.timer if timer is None else timer).add("data_wait", time.perf_counter() - t0)
        return crops, caps

    def step(self, batch, timer=None):
        """One training step; phases go to ``timer`` (default: this path's timer)."""
        timer = self.timer if timer is None else timer
        crops, caps = self.to_device(batch, timer)
        return cosmos_train_step(self.student, self.teacher, self.loss_fn, self.optimizer, crops, caps,
                                 momentum=MOMENTUM, autocast=self.autocast(), timer=timer)

    def forward_backward(self, batch, fp32: bool = False):
        """Losses and the flat student gradient from the current weights (no update); ``fp32`` runs
        without autocast (the ground truth of a low-precision comparison)."""
        crops, caps = self.to_device(batch)
        self.optimizer.zero_grad(set_to_none=True)
        with (None if fp32 else self.autocast()) or contextlib.nullcontext():
            losses = cosmos_forward_loss(self.student, self.teacher, self.loss_fn, crops, caps)
        losses["loss"].backward()
        grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().flatten()
                           for p in self.student.parameters()])
        self.optimizer.zero_grad(set_to_none=True)
        return {k: float(losses[k].detach()) for k in ("loss", "clip_loss", "distill_loss")}, grads


def _errors(losses, grads, truth_losses, truth_grads):
    loss_err = max(abs(losses[k] - truth_losses[k]) / max(abs(truth_losses[k]), 1e-30) for k in truth_losses)
    return loss_err, float((grads - truth_grads).norm() / truth_grads.norm().clamp_min(1e-30))


def check_equal(ref: TrainPath, fast: TrainPath, batch, low_precision: bool) -> dict:
    """Losses and gradients of the fast path against the reference; raises if they differ.

    fp32: the fast path must equal the reference (loss rel err ≤ 1e-4, ‖Δg‖/‖g‖ ≤ 1e-3). Under
    autocast two low-precision runs differ by their rounding, so both are measured against the
    reference run in fp32 and the fast path may be off by at most twice the reference's own
    low-precision error (plus 1e-3), the rule the kernel tests use."""
    lr, gr = ref.forward_backward(batch)
    lf, gf = fast.forward_backward(batch)
    loss_err, grad_err = _errors(lf, gf, lr, gr)
    out = {"loss_ref": lr["loss"], "loss_fast": lf["loss"], "loss_rel_err": loss_err, "grad_rel_err": grad_err}
    if not low_precision:
        print(f"equality: reference loss {lr['loss']:.6f} (clip {lr['clip_loss']:.6f}, distill "
              f"{lr['distill_loss']:.6f}); fast loss {lf['loss']:.6f}; max loss rel err {loss_err:.2e} "
              f"(tol 1e-04), gradient ‖Δg‖/‖g‖ {grad_err:.2e} (tol 1e-03)")
        if not (loss_err <= 1e-4 and grad_err <= 1e-3):
            raise SystemExit(f"fast path differs from the reference: loss rel err {loss_err:.3e}, "
                             f"gradient rel err {grad_err:.3e}")
        return out
    l32, g32 = ref.forward_backward(batch, fp32=True)
    ref_loss_err, ref_grad_err = _errors(lr, gr, l32, g32)
    fast_loss_err, fast_grad_err = _errors(lf, gf, l32, g32)
    print(f"equality against the reference in fp32 (loss {l32['loss']:.6f}): reference under autocast "
          f"loss rel err {ref_loss_err:.2e}, ‖Δg‖/‖g‖ {ref_grad_err:.2e}; fast loss rel err "
          f"{fast_loss_err:.2e}, ‖Δg‖/‖g‖ {fast_grad_err:.2e} (allowed: 2× the reference's + 1e-3); "
          f"fast vs reference directly: loss {loss_err:.2e}, gradient {grad_err:.2e}")
    if not (fast_loss_err <= 2 * ref_loss_err + 1e-3 and fast_grad_err <= 2 * ref_grad_err + 1e-3):
        raise SystemExit(f"fast path is further from the fp32 reference than twice the reference's own "
                         f"low-precision error: loss {fast_loss_err:.3e} vs {ref_loss_err:.3e}, gradient "
                         f"{fast_grad_err:.3e} vs {ref_grad_err:.3e}")
    out.update(ref_lowp_loss_err=ref_loss_err, ref_lowp_grad_err=ref_grad_err, fast_lowp_loss_err=fast_loss_err,
               fast_lowp_grad_err=fast_grad_err)
    return out


# ----------------------------------------------------------------------------- FLOPs and peak
class FlopPhases(PhaseTimer):
    """A PhaseTimer that counts FLOPs per phase with FlopCounterMode instead of timing."""

    def __init__(self):
        super().__init__(enabled=True)
        self.flops: dict[str, int] = defaultdict(int)

    @contextlib.contextmanager
    def phase(self, name: str):
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            yield
        self.flops[name] += counter.get_total_flops()

    def add(self, name, seconds):
        pass


def count_flops(path: TrainPath, batch) -> dict:
    """FLOPs of one full training step of ``path`` (dispatch-level, math attention), per phase."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopPhases()
    with attention_backend("math"), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as total:
        path.step(batch, timer=counter)
    out = {f"flops_{k}": v for k, v in counter.flops.items()}
    out["flops_step"] = total.get_total_flops()
    return out


def measured_matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for i in range(reps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(4 if device.type == "cuda" else 1):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:                                         # the first call warms up
            best = min(best, (time.perf_counter() - t0) / (4 if device.type == "cuda" else 1))
    return 2 * n ** 3 / best / 1e12


def device_peak(device: torch.device, compute_dtype: torch.dtype, override: float | None) -> tuple[float, str]:
    """(peak TFLOP/s, where it came from)."""
    if override:
        return override, "--peak-tflops"
    name = str(compute_dtype).replace("torch.", "")
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        for key, peaks in GPU_PEAK_TFLOPS.items():
            if key in gpu and name in peaks:
                return peaks[name], f"spec sheet {key} dense {name}"
        return measured_matmul_tflops(device, compute_dtype, 8192), f"measured {name} matmul 8192³"
    return measured_matmul_tflops(device, torch.float32), "measured fp32 matmul 2048³"


# ----------------------------------------------------------------------------- timing
def _stats(times: list[float]) -> dict:
    t = sorted(times)

    def pct(f):
        return t[min(len(t) - 1, round(f * (len(t) - 1)))]
    return {"median_s": statistics.median(t), "p20_s": pct(0.2), "p80_s": pct(0.8)}


def time_interleaved(paths: list[TrainPath], batch, warmup: int, reps: int, device) -> None:
    """Warm up each path, then time ``reps`` steps of each, alternating which path goes first."""
    sync_free = device.type != "cuda"
    for p in paths:
        p.timer = PhaseTimer(enabled=False, device=device)
        for _ in range(warmup):
            p.step(batch)
        p.times = []
        p.timer = PhaseTimer(enabled=sync_free, device=device)   # CPU: the timed steps give the breakdown
    for i in range(reps):
        for p in (paths if i % 2 == 0 else paths[::-1]):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            p.step(batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            p.times.append(time.perf_counter() - t0)
    if not sync_free:                       # CUDA: a separate breakdown pass with a synchronising timer
        for p in paths:
            p.timer = PhaseTimer(enabled=True, device=device)
            for _ in range(reps):
                p.step(batch)


# ----------------------------------------------------------------------------- data loading
def time_loaders(shards: str, batch: int, global_size: int, local_size: int, workers: int, samples: int,
                 device: torch.device, backends=("torchvision", "dali")) -> list[dict]:
    """samples/s of each loader backend over the same shards (epoch 0 warms up, epoch 1 is timed)."""
    try:
        from cosmos_fast.data.backends import build_loader
    except Exception as e:                      # the DALI backend is optional / in development
        print(f"note: cosmos_fast.data.backends does not import ({type(e).__name__}: {e}); torchvision only")
        from cosmos_fast.data.torchvision_loader import WebDatasetLoader

        def build_loader(spec, backend="torchvision", **kw):
            if backend != "torchvision":
                raise RuntimeError("cosmos_fast.data.backends unavailable")
            return WebDatasetLoader(spec)
    urls = expand_shards(shards)
    rows = []
    index_dir = tempfile.mkdtemp(prefix="bench_train_idx_")
    # the torchvision loader splits an epoch's batches evenly over its workers
    steps = -(-max(1, samples // batch) // max(1, workers)) * max(1, workers)
    for backend in backends:
        spec = StreamSpec(shards=urls, batch_size=batch, seed=0, rank=0, world=1, num_workers=workers,
                          steps_per_epoch=steps, resampled=False, shuffle_buffer=256,
                          shuffle_initial=32, caption_mode="textcrop", num_captions=N_CAPS, string_fields="split",
                          global_size=global_size, local_size=local_size, n_local=N_LOCAL, crop_scale=0.4,
                          tokenizer_name="ViT-B-16", context_length=77)
        kw = {"device": "cuda" if device.type == "cuda" else "cpu", "index_dir": index_dir} if backend == "dali" else {}
        try:
            loader = build_loader(spec, backend, **kw)
            out_device = "cpu"
            for epoch in (0, 1):
                loader.set_epoch(epoch)
                n, t0, lat, tick = 0, time.perf_counter(), [], time.perf_counter()
                for b in loader:
                    n += b["crops"][0].shape[0]
                    out_device = str(b["crops"][0].device)
                    now = time.perf_counter()
                    lat.append(now - tick)
                    tick = now
                elapsed = time.perf_counter() - t0
            if hasattr(loader, "close"):
                loader.close()
        except Exception as e:
            print(f"note: data backend {backend} unavailable here ({type(e).__name__}: {str(e)[:200]})")
            continue
        rows.append({"backend": backend, "batches_on": out_device, "workers": workers, "B": batch,
                     "global_size": global_size, "local_size": local_size, "samples": n,
                     "samples_per_s": n / elapsed, "batch_median_ms": statistics.median(lat) * 1e3 if lat else 0.0})
        print(f"data {backend:11s} on {out_device}: {n} samples in {elapsed:.2f} s = {n / elapsed:.1f} samples/s")
    tv = next((r for r in rows if r["backend"] == "torchvision"), None)
    for r in rows:
        r["speedup_vs_torchvision"] = r["samples_per_s"] / tv["samples_per_s"] if tv else float("nan")
    return rows


# ----------------------------------------------------------------------------- main
def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    amp = AMP_DTYPES[
        args.precision if args.precision != "auto" else ("amp_bf16" if cuda else "fp32")]
    compute_dtype = amp or torch.float32
    model_spec = parse_model(args.model)
    mcfg = resolve_model_config(model_spec)
    image_size = mcfg.vision_cfg.image_size
    local_size = args.local_size or (96 if image_size >= 224 else max(mcfg.vision_cfg.patch_size, image_size // 2))
    fast_pool = args.fast_pool or ("shared" if cuda else "absorbed")       # what model.pool_impl=auto picks
    fast_loss = args.fast_loss or ("fused" if cuda else "blockwise")
    info = env_info(device)
    print(" ".join(f"{k}={v}" for k, v in info.items()),
          f"model={args.model if len(args.model) < 40 else 'dict'} B={args.batch} precision={args.precision}")

    torch.manual_seed(args.seed)
    base = create_model(model_spec, pool_impl="reference").to(device)
    teacher = build_teacher(base)
    n_params = sum(p.numel() for p in base.parameters())
    paths = [TrainPath("reference", base, teacher, "reference", "reference", device, amp),
             TrainPath("fast", base, teacher, fast_pool, fast_loss, device, amp)]
    del base, teacher
    batch = make_batch(args.batch, image_size, local_size, mcfg.text_cfg.vocab_size, mcfg.text_cfg.context_length,
                       seed=args.seed)
    if cuda:
        batch = {"crops": [c.pin_memory() for c in batch["crops"]], "captions": batch["captions"].pin_memory()}

    eq = check_equal(paths[0], paths[1], batch, amp is not None)          # ---- equality first
    flops = count_flops(paths[0], batch)                                 # ---- one reference step, counted
    peak, peak_source = device_peak(device, compute_dtype, args.peak_tflops)
    print(f"FLOPs per step (reference, dispatch-level): {flops['flops_step'] / 1e9:.2f} GFLOP = "
          f"{flops['flops_step'] / args.batch / 1e9:.2f} GFLOP/sample; peak {peak:.2f} TFLOP/s ({peak_source})")
    print("  per phase, GFLOP/sample: " + ", ".join(
        f"{k[6:]} {v / args.batch / 1e9:.2f}" for k, v in flops.items() if k != "flops_step"))
    time_interleaved(paths, batch, args.warmup, args.reps, device)      # ---- timing
    rows = []
    for p in paths:
        means = p.timer.mean()
        mem = peak_memory(lambda p=p: p.step(batch, timer=PhaseTimer(False)), device)
        st = _stats(p.times)
        row = {"model": args.model if not args.model.strip().startswith("{") else "dict:" + mcfg.name,
               "params": n_params, "B": args.batch, "image_size": image_size, "local_size": local_size,
               "precision": args.precision if args.precision != "auto" else ("amp_bf16" if cuda else "fp32"),
               "threads": torch.get_num_threads(), "path": p.name, "pool_impl": p.pool_impl, "loss_impl": p.loss_impl,
               "median_ms": st["median_s"] * 1e3, "p20_ms": st["p20_s"] * 1e3, "p80_ms": st["p80_s"] * 1e3,
               "samples_per_s": args.batch / st["median_s"], "reps": args.reps}
        for ph in PHASES:
            row[f"t_{ph}_ms"] = means.get(ph, 0.0) * 1e3
        row["peak_mib"] = mem / 2 ** 20
        row.update(flops)
        row["flop_method"] = "FlopCounterMode on one reference step (math attention); same count both paths"
        row["peak_tflops"] = peak
        row["peak_source"] = peak_source
        row["achieved_tflops"] = flops["flops_step"] / st["median_s"] / 1e12
        row["mfu"] = row["achieved_tflops"] / peak
        row.update(eq)
        rows.append(row)
    ref = rows[0]
    for r in rows:
        r["speedup_vs_ref"] = ref["median_ms"] / r["median_ms"]
        r["mem_ratio_vs_ref"] = ref["peak_mib"] / r["peak_mib"] if r["peak_mib"] > 0 else float("nan")
    print_table(rows)
    root = results_dir(args.results_dir)
    out = {"rows": rows, "csv": None, "data_rows": [], "data_csv": None}
    if not args.no_csv:
        out["csv"] = write_csv("train", rows, device, root=root,
                               case=("model", "params", "B", "image_size", "local_size", "precision", "threads", "path",
                                     "pool_impl", "loss_impl", "reps", "flop_method", "peak_source"))
        print(f"wrote {out['csv']}")
        if args.record:
            record(out["csv"])
    if args.data:
        shards = args.shards
        if not shards:
            data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="bench_train_shards_"))
            # the torchvision loader needs a shard per worker
            per_shard = max(1, args.data_samples // max(2, args.data_workers))
            shards = write_demo_data(data_dir, n_train=args.data_samples, n_val=1,
                                     samples_per_shard=per_shard, image_size=256)["train"]
        drows = time_loaders(shards, args.data_batch or args.batch, image_size, local_size, args.data_workers,
                             args.data_samples, device)
        fast_sps = rows[1]["samples_per_s"]
        for r in drows:
            r["model"] = rows[0]["model"]
            r["train_fast_samples_per_s"] = fast_sps
            r["loader_over_train"] = r["samples_per_s"] / fast_sps
        out["data_rows"] = drows
        if drows and not args.no_csv:
            out["data_csv"] = write_csv("train_data", drows, device, root=root,
                                        case=("backend", "batches_on", "workers", "B", "global_size", "local_size",
                                              "samples", "model"))
            print(f"wrote {out['data_csv']}")
            if args.record:
                record(out["data_csv"])
    return out


def print_table(rows):
    ph = " ".join(f"{p[:8]:>8s}" for p in PHASES)
    head = (f"{'path':9s} {'median ms':>10s} {'p20':>9s} {'p80':>9s} {'samp/s':>8s} {ph} "
            f"{'peak MiB':>9s} {'TFLOP/s':>8s} {'MFU':>7s} {'speedup':>8s} {'mem ×':>6s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        phs = " ".join(f"{r[f't_{p}_ms']:8.1f}" for p in PHASES)
        print(f"{r['path']:9s} {r['median_ms']:10.1f} {r['p20_ms']:9.1f} {r['p80_ms']:9.1f} "
              f"{r['samples_per_s']:8.2f} {phs} {r['peak_mib']:9.1f} {r['achieved_tflops']:8.4f} "
              f"{r['mfu']:7.2%} {r['speedup_vs_ref']:7.2f}x {r['mem_ratio_vs_ref']:5.2f}x")
    print("(phase columns: mean ms per step; GFLOP/sample counted on the reference: "
          f"{rows[0]['flops_step'] / rows[0]['B'] / 1e9:.2f})")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny, ViT-B-16, ViT-B-32, or an open_clip-style JSON dict")
    ap.add_argument("--batch", type=int, default=2, help="per-device batch B")
    ap.add_argument("--local-size", type=int, default=0, help="local crop px (0: 96 for 224-px models, else half)")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "amp_bf16", "amp_fp16"],
                    help="auto: amp_bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--fast-pool", default=None, help="pooling impl of the fast path (default shared on CUDA, absorbed on CPU)")
    ap.add_argument("--fast-loss", default=None, help="loss impl of the fast path (default fused/blockwise)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: see docstring)")
    ap.add_argument("--data", action=argparse.BooleanOptionalAction, default=True, help="also time the loaders")
    ap.add_argument("--shards", default="", help="webdataset shards for the data rows (default: synthetic)")
    ap.add_argument("--data-dir", default="", help="where to write the synthetic shards (default: a temp dir)")
    ap.add_argument("--data-samples", type=int, default=64)
    ap.add_argument("--data-batch", type=int, default=0, help="loader batch (0: --batch)")
    ap.add_argument("--data-workers", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--results-dir", default=None, help="root for CSVs (default $COSMOS_BENCH_RESULTS or bench_results/)")
    ap.add_argument("--no-csv", action="store_true")
    add_record_arg(ap)
    return ap.parse_args(argv)


def main(argv=None):
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
