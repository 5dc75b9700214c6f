"""The trainer's step paths on one device: eager, compiled transformer blocks, the CUDA-graph step,
and both (``train.compile`` / ``train.cuda_graph``, cosmos_fast/device_step.py).

Every path starts from the same student and teacher weights and trains on the same pre-built batch
(2 global + 6 local crops, 8 captions; bf16 autocast on CUDA, fp32 on CPU) with the engine the
trainer builds (LocalEngine, AdamW fused on CUDA). Equality first: each path's first-step losses
must equal the eager path's (fp32 rel. err ≤ 1e-4; bf16 ≤ 2e-2, two roundings of the same sums).
Then ``--warmup`` untimed steps (they include the compile, Triton autotuning and the graph
capture, whose time is reported as ``first_steps_s``) and ``--reps`` timed steps per path, paths
interleaved step by step, each step synchronised (host wall time). On CPU the "graph" path is the
same step without host syncs run eagerly (no capture on CPU); compiling on CPU takes minutes. Every
path runs full-length captions with torch's AdamW: the graphed step takes neither caption truncation
(a host read of the length) nor the fused EMA + AdamW yet (``cuda_graph_blocker``).

    python benchmarks/bench_step_paths.py --model ViT-B-16 --batch 64           # GPU
    python benchmarks/bench_step_paths.py --model tiny --batch 8 --device cpu --paths eager,graph

Rows: ``<results>/step_paths/<device>_<date>_<sha>.csv`` (harness long format).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.bench_train import make_batch, parse_model, results_dir  # noqa: E402
from benchmarks.harness import save_results  # noqa: E402
from cosmos_fast.device_step import OUT_KEYS, DeviceStep  # noqa: E402
from cosmos_fast.ema import build_teacher  # noqa: E402
from cosmos_fast.engine import LocalEngine  # noqa: E402
from cosmos_fast.model import create_model  # noqa: E402
from cosmos_fast.ops.contrastive import CosmosLoss  # noqa: E402
from cosmos_fast.optim import build_adamw  # noqa: E402
from cosmos_fast.step import train_step  # noqa: E402

PATHS = ("eager", "compiled", "graph", "compiled+graph")
MOMENTUM, LR = 0.999, 1e-5


class Path_:
    """One step path with its own copy of the weights, optimizer and engine."""

    def __init__(self, name, student, teacher, device, amp):
        self.name = name
        s, t = copy.deepcopy(student), copy.deepcopy(teacher)
        if "compiled" in name:
            s.set_compiled_blocks(True)
            t.set_compiled_blocks(True)
        extra = {"fused": True} if device.type == "cuda" else {}
        opt = build_adamw(s, lr=LR, weight_decay=0.5, **extra)
        self.engine = LocalEngine(s, t, opt, autocast=torch.autocast(device.type, dtype=amp) if amp else None)
        self.loss_fn = CosmosLoss()
        self.device = device
        self.graph = DeviceStep(self.engine, self.loss_fn, capture=device.type == "cuda") if "graph" in name else None
        self.times: list[float] = []

    def step(self, crops, caps) -> torch.Tensor:
        """One training step; returns the losses as in OUT_KEYS[:-1]."""
        if self.graph is not None:
            return self.graph(crops, caps, LR, MOMENTUM)[:-1]
        self.engine.set_lr(LR)
        out = train_step(self.engine, self.loss_fn, crops, caps, momentum=MOMENTUM)
        return torch.stack([out[k].float().reshape(()) for k in OUT_KEYS[:-1]])

    def timed(self, crops, caps) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        self.step(crops, caps)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0


def run(args) -> dict:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = [p for p in paths if p not in PATHS]
    if unknown or "eager" not in paths:
        raise SystemExit(f"--paths: choose among {PATHS}, eager included (the reference); got {paths}")
    amp = torch.bfloat16 if device.type == "cuda" else None
    torch.manual_seed(args.seed)
    student = create_model(parse_model(args.model), truncate_captions=False).to(device)
    teacher = build_teacher(student)
    cfg = student.cfg
    local = args.local_size or (96 if cfg.vision_cfg.image_size == 224 else cfg.vision_cfg.image_size // 2)
    batch = make_batch(args.batch, cfg.vision_cfg.image_size, local, cfg.text_cfg.vocab_size,
                       cfg.text_cfg.context_length, seed=args.seed)
    crops = [c.to(device) for c in batch["crops"]]
    caps = batch["captions"].to(device)
    runs = {name: Path_(name, student, teacher, device, amp) for name in paths}

    # equality: the first step of every path from the same weights and batch
    first, first_s = {}, {}
    for name, p in runs.items():
        t0 = time.perf_counter()
        first[name] = p.step(crops, caps).cpu()
        for _ in range(args.warmup - 1):
            p.step(crops, caps)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        first_s[name] = time.perf_counter() - t0
    tol = 2e-2 if amp is not None else 1e-4
    for name, v in first.items():
        err = float(((v - first["eager"]).abs() / first["eager"].abs().clamp_min(1e-12)).max())
        print(f"equality {name:15s} first-step losses {v.tolist()}  max rel err vs eager {err:.2e} (tol {tol:g})")
        if not err <= tol:
            raise SystemExit(f"path {name} differs from eager: rel err {err:.3e} > {tol:g}")
    for _ in range(args.reps):                        # interleaved: load from elsewhere hits every path alike
        for p in runs.values():
            p.times.append(p.timed(crops, caps))
    base = statistics.median(runs["eager"].times)
    rows = []
    print(f"\n{'path':15s} {'median ms':>10s} {'samples/s':>10s} {'vs eager':>9s} {'warm-up s':>10s}")
    for name, p in runs.items():
        med = statistics.median(p.times)
        rows.append({"path": name, "model": args.model, "batch": args.batch,
                     "precision": "amp_bf16" if amp else "fp32", "median_s": med,
                     "p20_s": sorted(p.times)[round(0.2 * (len(p.times) - 1))],
                     "p80_s": sorted(p.times)[round(0.8 * (len(p.times) - 1))],
                     "samples_per_s": args.batch / med, "speedup_vs_eager": base / med,
                     "first_steps_s": first_s[name], "warmup_steps": args.warmup})
        print(f"{name:15s} {med * 1e3:10.2f} {args.batch / med:10.1f} {base / med:8.2f}x {first_s[name]:10.1f}")
    out = {"rows": rows}
    if not args.no_csv:
        out["csv"] = save_results("step_paths", rows, device, case=("path", "model", "batch", "precision"),
                                  root=results_dir(args.results_dir))
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny, ViT-B-16, ViT-B-32, or an open_clip-style JSON dict")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--local-size", type=int, default=0, help="local crop px (0: 96 for 224-px models, else half)")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, among {PATHS}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps (≥ 4: the graph captures on the 4th)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results-dir", default=None)
    ap.add_argument("--no-csv", action="store_true")
    return ap.parse_args(argv)


if __name__ == "__main__":
    run(parse_args())
