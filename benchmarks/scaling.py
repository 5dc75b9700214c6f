"""Scaling efficiency: measured weak scaling on this machine + a communication model projected to A100 clusters.

1. Measured (``--worlds 1,2``): the trainer under DeepSpeed ZeRO ``--stages`` with a fixed per-rank
   batch (weak scaling) on 1 and 2 ranks (CPU: gloo, ``--threads`` torch threads per rank, so the
   1-rank run leaves a core idle and more ranks than cores would measure oversubscription, not
   scaling). Step time = per step the slowest rank, median over ``--steps``; efficiency =
   t(1 rank) / t(W ranks). The largest world is also profiled for one step to measure the
   communication volume per collective (method: benchmarks/profile_train.py).
2. Model (projection to 8, 16, 32, 64, 128 A100s, 8 per node):
     t_step(W) = t_compute(W) + exposed communication
   * t_compute(W) = (per-rank FLOPs of the step) / (peak · MFU): FLOPs per sample of the projected
     model counted by FlopCounterMode on one fast-path training step at B=1 (``--flops-per-sample``
     overrides), peak 312 TFLOP/s (A100 bf16 dense), MFU ``--mfu`` (default 0.40, an assumption);
     plus the loss, whose per-rank cost grows with the global batch: 176 matmuls of
     2·B·B_g·D FLOPs (fast path: local rows × all columns; cosmos_method.md §8.2).
     On CUDA, the measured 1-rank step time replaces FLOPs/(peak·MFU) (``compute_source=measured``).
   * Communication volume per rank per step by category, from
     :func:`benchmarks.comm_model.comm_volume` (formula, ring algorithms, bf16
     parameters/gradients/features): see its docstring. On CUDA with a measured profile, the
     formula is rescaled per category by measured/formula at the measured world size.
   * Time per category = wire bytes / bus bandwidth + α per call. Bus bandwidths (nccl-tests
     busbw, which already folds in the ring factor): 230 GB/s within an 8×A100 NVLink node; across
     nodes ~90 GB/s with 4×HDR InfiniBand (``--ib hdr4``) or ~180 GB/s with 8×HDR (``hdr8``);
     α = 10 µs intra-node, 30 µs inter-node; calls = ceil(bytes / 50 MB bucket) per category.
   * Overlap: scenario ``none`` — nothing overlaps (upper bound of the cost). Scenario ``overlap`` —
     gradient reduction and ZeRO-3 parameter gathers of the student (DeepSpeed overlap_comm and
     prefetch) can hide behind up to half of the compute time; the feature all-gather, the loss
     statistics, the post-step parameter all-gather and the ZeRO-3 teacher gather are on the
     critical path and never overlap.
   Efficiency(W) = t_step(1) / t_step(W) (weak scaling, per-GPU batch fixed); comm share =
   exposed communication / t_step.

Outputs: ``<results>/scaling/<device>_<date>_<sha>.csv`` (rows ``kind=measured`` and
``kind=projection``), ``.md`` (the report) and ``.png`` (drawn by benchmarks/report.py).

    .venv/bin/python benchmarks/scaling.py --worlds 1,2 --stages 2          # CPU, tiny config
    python benchmarks/scaling.py --model ViT-B-16 --batch 64 --worlds 1,2,4,8   # on a GPU node
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.bench_train import TrainPath, count_flops, make_batch, results_dir  # noqa: E402
from benchmarks.comm_model import CATEGORIES, comm_volume  # noqa: E402
from benchmarks.harness import env_info, write_csv  # noqa: E402
from benchmarks.profile_train import demo_shards, launch  # noqa: E402
from benchmarks.report import plot_scaling  # noqa: E402
from cosmos_fast.ema import build_teacher  # noqa: E402
from cosmos_fast.model import create_model  # noqa: E402
from cosmos_fast.model.config import resolve_model_config  # noqa: E402

OVERLAPPABLE = ("grad_reduce", "zero3_param_gather")
PROJECT_GPUS = (8, 16, 32, 64, 128)
IB_BUSBW = {"hdr4": 90e9, "hdr8": 180e9}
LOSS_MATMULS = 176


# ----------------------------------------------------------------------------- formulas
def loss_flops(batch: int, world: int, dim: int = 512, impl: str = "fast") -> float:
    """Per-rank FLOPs of the 80-pair loss (forward + backward): 176 matmuls (cosmos_method.md §8.2),
    each 2·B·B_g·D on the fast path (local rows) or 2·B_g²·D on the official path (all rows)."""
    bg = batch * world
    rows = batch if impl == "fast" else bg
    return LOSS_MATMULS * 2.0 * rows * bg * dim


@dataclass
class Cluster:
    """A100 cluster assumptions (published NCCL bus bandwidths; see the module docstring)."""
    gpus_per_node: int = 8
    intra_busbw: float = 230e9
    inter_busbw: float = 90e9
    alpha_intra: float = 10e-6
    alpha_inter: float = 30e-6
    peak_flops: float = 312e12
    mfu: float = 0.40
    bucket_bytes: float = 50e6
    overlap_window: float = 0.5            # fraction of compute time that can hide overlappable comm
    name: str = "A100 8/node, 4xHDR"

    def busbw(self, world: int) -> float:
        return self.intra_busbw if world <= self.gpus_per_node else self.inter_busbw

    def alpha(self, world: int) -> float:
        return self.alpha_intra if world <= self.gpus_per_node else self.alpha_inter


def project(worlds, *, n_params: int, flops_per_sample: float, batch: int, stage: int, dim: int = 512,
            cluster: Cluster | None = None, overlap: str = "none", compute_s: float | None = None,
            volume_scale: dict | None = None, **volume_kw) -> list[dict]:
    """Projected step time, efficiency and communication share for each world size (1 is added as
    the baseline). ``compute_s`` (a measured 1-rank step time) replaces FLOPs/(peak·MFU)."""
    cl = cluster or Cluster()
    if overlap not in ("none", "overlap"):
        raise ValueError(f"overlap must be 'none' or 'overlap', got {overlap!r}")
    base_compute = compute_s if compute_s is not None else (
        (batch * flops_per_sample + loss_flops(batch, 1, dim)) / (cl.peak_flops * cl.mfu))
    rows = []
    for w in sorted(set([1, *worlds])):
        t_comp = base_compute + (loss_flops(batch, w, dim) - loss_flops(batch, 1, dim)) / (cl.peak_flops * cl.mfu)
        vol = comm_volume(n_params, stage, w, batch=batch, dim=dim, **volume_kw)
        if volume_scale:
            vol = {k: v * volume_scale.get(k, 1.0) for k, v in vol.items()}
        t_cat = {k: (v / cl.busbw(w) + cl.alpha(w) * math.ceil(v / cl.bucket_bytes)) if v > 0 else 0.0
                 for k, v in vol.items()}
        crit = sum(t for k, t in t_cat.items() if k not in OVERLAPPABLE)
        ovl = sum(t_cat[k] for k in OVERLAPPABLE)
        exposed = crit + (max(0.0, ovl - cl.overlap_window * t_comp) if overlap == "overlap" else ovl)
        t_step = t_comp + exposed
        rows.append({"gpus": w, "nodes": math.ceil(w / cl.gpus_per_node), "zero_stage": stage, "overlap": overlap,
                     "B": batch, "global_batch": batch * w, "t_compute_ms": t_comp * 1e3,
                     "t_comm_ms": (crit + ovl) * 1e3, "t_exposed_ms": exposed * 1e3, "t_step_ms": t_step * 1e3,
                     "comm_share": exposed / t_step, "wire_mb": sum(vol.values()) / 1e6,
                     **{f"wire_mb_{k}": v / 1e6 for k, v in vol.items()},
                     "busbw_gbs": cl.busbw(w) / 1e9 if w > 1 else 0.0})
    t1 = rows[0]["t_step_ms"]
    for r in rows:
        r["efficiency"] = t1 / r["t_step_ms"]
        r["samples_per_s"] = r["global_batch"] / (r["t_step_ms"] / 1e3)
    return rows


# ----------------------------------------------------------------------------- measurement
def count_flops_per_sample(model: str, image_size: int | None = None) -> float:
    """FLOPs of one fast-path training step at B=1 (student fwd+bwd, teacher fwd, loss), counted
    by FlopCounterMode on CPU (math attention)."""

    mcfg = resolve_model_config(model)
    size = image_size or mcfg.vision_cfg.image_size
    student = create_model(model, pool_impl="absorbed")
    p = TrainPath("fast", student, build_teacher(student), "absorbed", "blockwise", torch.device("cpu"), None)
    batch = make_batch(1, size, 96 if size >= 224 else size // 2, mcfg.text_cfg.vocab_size, mcfg.text_cfg.context_length)
    return float(count_flops(p, batch)["flops_step"])


def count_params(model: str) -> int:
    return sum(p.numel() for p in create_model(model, device="meta").parameters())


def measure(worlds, stages, args, device) -> tuple[list[dict], dict]:
    """Weak-scaling runs; returns rows and {stage: measured comm rows of the largest world}."""
    rows, comm = [], {}
    tmp = Path(tempfile.mkdtemp(prefix="cosmos_scaling_"))
    top = max(worlds)
    n = args.batch * top * (args.warmup + args.steps + 2)
    shards = demo_shards(tmp / "data", n)
    for stage in stages:
        base = None
        for w in sorted(worlds):
            t0 = time.perf_counter()
            res = launch(w, stage, tmp / f"zero{stage}_w{w}", shards=shards, n_samples=n, batch=args.batch,
                         steps=args.steps, warmup=args.warmup, profile_steps=1 if (w == top and w > 1) else 0,
                         model=args.model, local_size=args.local_size, threads=args.threads, trace=False)
            per_step = [max(r["step_times_s"][i] for r in res) for i in range(args.steps)]
            med = statistics.median(per_step)
            base = med if w == min(worlds) and base is None else base
            phases = {k: statistics.mean(r["phases_ms"].get(k, 0.0) for r in res)
                      for k in ("data_wait", "student_forward", "teacher_forward", "loss", "backward", "ema", "optimizer")}
            if res[0]["comm"]:
                comm[stage] = res[0]["comm"]
            wire = sum(c["wire_bytes"] for c in res[0]["comm"]) if res[0]["comm"] else float("nan")
            rows.append({"kind": "measured", "gpus": w, "zero_stage": stage, "B": args.batch, "global_batch": args.batch * w,
                         "t_step_ms": med * 1e3, "p20_ms": sorted(per_step)[round(0.2 * (len(per_step) - 1))] * 1e3,
                         "p80_ms": sorted(per_step)[round(0.8 * (len(per_step) - 1))] * 1e3,
                         "samples_per_s": args.batch * w / med, "efficiency": base / med,
                         "threads_per_rank": args.threads, "n_params": res[0]["n_params"],
                         "wire_mb": wire / 1e6 if wire == wire else "",
                         **{f"t_{k}_ms": v for k, v in phases.items()}})
            print(f"measured ZeRO-{stage} W={w}: step {med * 1e3:.1f} ms, efficiency {base / med:.3f} "
                  f"({time.perf_counter() - t0:.0f} s incl. start-up)", flush=True)
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return rows, comm


# ----------------------------------------------------------------------------- report
def write_report(path: Path, info: dict, measured: list[dict], proj: list[dict], comm: dict, notes: list[str]) -> None:
    L = [f"# Scaling report ({info['device']}, {info['date']}, commit {info['commit']}, torch {info['torch']})", ""]
    L += notes + [""]
    if measured:
        L += ["## Measured weak scaling on this machine", "",
              "| ZeRO | ranks | B/rank | step ms (p20–p80) | samples/s | efficiency | wire MB/step/rank |",
              "|---|---|---|---|---|---|---|"]
        for r in measured:
            wire = "" if r["wire_mb"] == "" else f"{r['wire_mb']:.3f}"
            L.append(f"| {r['zero_stage']} | {r['gpus']} | {r['B']} | {r['t_step_ms']:.1f} ({r['p20_ms']:.1f}–{r['p80_ms']:.1f}) "
                     f"| {r['samples_per_s']:.2f} | {r['efficiency']:.3f} | {wire} |")
        for stage, rows in comm.items():
            L += ["", f"Measured communication per step, ZeRO-{stage}, largest world (rank 0):", "",
                  "| category | collective | calls | size MB | wire MB |", "|---|---|---|---|---|"]
            for c in rows:
                L.append(f"| {c['category']} | {c['collective']} | {c['calls']:.1f} | {c['size_bytes'] / 1e6:.3f} | "
                         f"{c['wire_bytes'] / 1e6:.3f} |")
    L += ["", "## Projection", ""]
    keys = sorted({(r["zero_stage"], r["ib"], r["overlap"]) for r in proj})
    L += ["| ZeRO | IB | overlap | " + " | ".join(f"{g} GPUs eff / comm%" for g in PROJECT_GPUS) + " |",
          "|---|---|---|" + "---|" * len(PROJECT_GPUS)]
    for key in keys:
        sel = {r["gpus"]: r for r in proj if (r["zero_stage"], r["ib"], r["overlap"]) == key}
        L.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(
            f"{sel[g]['efficiency']:.3f} / {100 * sel[g]['comm_share']:.1f}%" for g in PROJECT_GPUS if g in sel) + " |")
    one = [r for r in proj if r["overlap"] == "none" and r["ib"] == "hdr4" and r["gpus"] == 128]
    if one:
        L += ["", "Wire MB per GPU per step at 128 GPUs (no overlap, 4×HDR):", "",
              "| ZeRO | " + " | ".join(CATEGORIES) + " | t_compute ms | t_step ms |", "|---" * (len(CATEGORIES) + 3) + "|"]
        for r in sorted(one, key=lambda r: r["zero_stage"]):
            L.append(f"| {r['zero_stage']} | " + " | ".join(f"{r[f'wire_mb_{k}']:.1f}" for k in CATEGORIES)
                     + f" | {r['t_compute_ms']:.1f} | {r['t_step_ms']:.1f} |")
    L += ["", f"![scaling]({path.with_suffix('.png').name})", ""]
    path.write_text("\n".join(L))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", default="1,2", help="measured world sizes ('' to skip measuring)")
    ap.add_argument("--stages", default="2", help="ZeRO stages to measure")
    ap.add_argument("--model", default="tiny", help="measured model (config model.name)")
    ap.add_argument("--batch", type=int, default=4, help="measured per-rank batch")
    ap.add_argument("--local-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--project-model", default=None, help="projected model (default ViT-B-16 on CPU, --model on CUDA)")
    ap.add_argument("--project-batch", type=int, default=64, help="per-GPU batch of the projection (CC3M: 64)")
    ap.add_argument("--flops-per-sample", type=float, default=None, help="skip counting; FLOPs of one step per sample")
    ap.add_argument("--mfu", type=float, default=0.40)
    ap.add_argument("--results-dir", default=None)
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = env_info(device)
    worlds = [int(x) for x in args.worlds.split(",") if x.strip()]
    stages = [int(x) for x in args.stages.split(",") if x.strip()]
    measured, comm = measure(worlds, stages, args, device) if worlds else ([], {})

    pmodel = args.project_model or (args.model if device.type == "cuda" else "ViT-B-16")
    n_params = count_params(pmodel)
    notes = [f"Projection for {pmodel} ({n_params / 1e6:.1f}M parameters), {args.project_batch} samples per GPU, "
             f"bf16 parameters/gradients/features, fp32 teacher partitioned under ZeRO-3, fast loss path."]
    compute_s, scale = None, None
    if device.type == "cuda" and measured and pmodel == args.model and args.project_batch == args.batch:
        compute_s = min(r["t_step_ms"] for r in measured if r["gpus"] == 1) / 1e3
        notes.append(f"compute_source=measured: t_compute = measured 1-rank step {compute_s * 1e3:.1f} ms on "
                     f"{info['device']} (bandwidths remain the A100 figures unless edited).")
    if compute_s is None:
        fps = args.flops_per_sample
        if fps is None:
            t0 = time.perf_counter()
            fps = count_flops_per_sample(pmodel)
            notes.append(f"FLOPs per sample: {fps / 1e9:.1f} GFLOP, counted by FlopCounterMode on one fast-path step "
                         f"at B=1 ({time.perf_counter() - t0:.0f} s); the analytic count is ≈559 for ViT-B/16 "
                         "(official repeat pooling).")
        else:
            notes.append(f"FLOPs per sample: {fps / 1e9:.1f} GFLOP (given).")
        notes.append(f"compute_source=model: t_compute = FLOPs / (312 TFLOP/s × MFU {args.mfu}).")
    else:
        fps = 0.0
    if device.type == "cuda" and comm:
        top = max(worlds)
        meas_n = measured[0]["n_params"]
        dim = resolve_model_config(args.model).embed_dim
        for stage, rows in comm.items():
            f = comm_volume(meas_n, stage, top, batch=args.batch, dim=dim)
            m = {}
            for c in rows:
                m[c["category"]] = m.get(c["category"], 0.0) + c["wire_bytes"]
            scale = {k: m.get(k, 0.0) / f[k] for k in f if f[k] > 0}
            notes.append(f"volume_source=measured: ZeRO-{stage} formula volumes rescaled by measured/formula at W={top}: "
                         + ", ".join(f"{k} {v:.2f}" for k, v in scale.items()))
    notes.append("Bus bandwidths: 230 GB/s in an 8×A100 NVLink node; across nodes 90 GB/s (4×HDR) or 180 GB/s (8×HDR); "
                 "α 10/30 µs per call; overlap scenarios as in benchmarks/scaling.py.")

    dim = resolve_model_config(pmodel).embed_dim
    proj = []
    for ib, bw in IB_BUSBW.items():
        cl = Cluster(inter_busbw=bw, mfu=args.mfu, name=f"A100 8/node {ib}")
        for stage in (0, 1, 2, 3):
            for overlap in ("none", "overlap"):
                for r in project(PROJECT_GPUS, n_params=n_params, flops_per_sample=fps, batch=args.project_batch,
                                 stage=stage, dim=dim, cluster=cl, overlap=overlap, compute_s=compute_s,
                                 volume_scale=scale):
                    proj.append({"kind": "projection", "model": pmodel, "ib": ib, "mfu": args.mfu,
                                 "flops_per_sample": fps, "n_params": n_params,
                                 "compute_source": "measured" if compute_s else "model",
                                 "volume_source": "measured" if scale else "formula", **r})
    for r in measured:
        r["model"] = args.model
    print("\n".join(notes))
    print(f"\n{'ZeRO':>4s} {'IB':5s} {'overlap':8s} " + " ".join(f"{g:>13d}" for g in PROJECT_GPUS) + "   (efficiency / comm share)")
    for stage in (0, 1, 2, 3):
        for ib in IB_BUSBW:
            for overlap in ("none", "overlap"):
                sel = {r["gpus"]: r for r in proj if (r["zero_stage"], r["ib"], r["overlap"]) == (stage, ib, overlap)}
                print(f"{stage:4d} {ib:5s} {overlap:8s} " + " ".join(
                    f"{sel[g]['efficiency']:6.3f}/{100 * sel[g]['comm_share']:5.1f}%" for g in PROJECT_GPUS))
    if args.no_csv:
        return 0
    root = results_dir(args.results_dir)
    csv_path = write_csv("scaling", measured + proj, device, root=root,
                         case=("kind", "model", "gpus", "nodes", "zero_stage", "B", "global_batch", "threads_per_rank",
                               "ib", "overlap", "compute_source", "volume_source"))
    md = csv_path.with_suffix(".md")
    write_report(md, info, measured, [r for r in proj if r["gpus"] in PROJECT_GPUS], comm, notes)
    try:
        plot_scaling(csv_path, csv_path.with_suffix(".png"))
    except Exception as e:
        print(f"note: no plot ({type(e).__name__}: {e})")
    print(f"wrote {csv_path}, {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
