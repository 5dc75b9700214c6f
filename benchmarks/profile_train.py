"""Profile the COSMOS trainer on several ranks: per-phase timers, a chrome trace, communication per step.

Launches ``--world`` ranks with ``torch.multiprocessing.spawn`` (CPU: gloo + ``DS_ACCELERATOR=cpu``;
CUDA: one GPU per rank, NCCL), each running ``cosmos_fast.trainer.Trainer`` under DeepSpeed ZeRO
``--zero-stage`` on batches from its real data loader (synthetic demo shards unless ``--shards``).
Per rank: ``--warmup`` untimed steps, ``--steps`` timed steps (``PhaseTimer`` on: data_wait,
student_forward, teacher_forward, loss, backward, ema, optimizer), then ``--profile-steps`` steps
under ``torch.profiler`` (record_shapes=True) whose chrome trace is written gzipped.

Communication volume: method
  The process-group backends record one profiler event per collective they execute, named
  ``gloo:<collective>`` / ``nccl:<collective>``, whose recorded input shape and dtype give the bytes
  this rank handed to the collective. (gloo has no reduce-scatter: ``reduce_scatter_tensor`` appears
  as ``gloo:all_reduce`` of the full tensor; DeepSpeed's CPU path likewise all-reduces.) Each event
  is attributed to the training phase whose ``phase::<name>`` record_function range contains its
  start (the trainer's PhaseTimer is subclassed here to emit those ranges), and to the loss's
  feature-gradient backward when it starts inside the autograd node of ``_GatherWithGrad`` /
  ``_SumGrad``. Categories:
    feature_allgather       all-gather of features / teacher targets in the loss forward
    loss_stats_allreduce    the loss's column log-sum-exp statistics and diagonal sums (forward)
    feature_grad_reduce     reduce(-scatter) of gathered-feature and logit-scale gradients (loss backward)
    grad_reduce             DeepSpeed gradient reduce-scatter / all-reduce (in backward)
    zero3_param_gather      ZeRO-3 student parameter all-gathers (student forward and backward, and
                            the re-gather of small persistent parameters after the step)
    zero3_teacher_gather    ZeRO-3 gathers of the partitioned fp32 EMA teacher (teacher forward)
    param_allgather_after_step  ZeRO-1/2 all-gather of the updated parameter partitions
    optimizer_allreduce     small reductions inside the optimizer step (norms, overflow check)
    other                   anything else (broadcasts at start-up, clamp of the logit scales, …)
  Sizes are reported three ways per step and rank: ``input_bytes`` (what was handed over),
  ``size_bytes`` (nccl-tests convention: the full, gathered/reduced tensor) and ``wire_bytes``
  (per-rank traffic of a ring algorithm: all-reduce 2(W−1)/W·size, all-gather and reduce-scatter
  (W−1)/W·size, broadcast/reduce size), which divided by a bus bandwidth gives a time (scaling.py).
  On CUDA, if the NCCL events carry no shapes, the nearest preceding ``c10d::`` op's tensor shapes
  are used (not verified on a GPU in this repository yet).

Outputs in the run folder (``--output-dir``, default
``bench_results/profile/<device>_<date>_<sha>_zero<S>_w<W>/``): the trainer's own files
(config.yaml, deepspeed_config.json, train.log, metrics.jsonl), ``trace_rank<r>.json.gz``,
``rank<r>.json`` (step times, phase means, per-collective volumes) and ``summary.md``; CSV rows in
``<results>/profile_phases/`` and ``<results>/profile_comm/``.

    .venv/bin/python benchmarks/profile_train.py --world 2 --zero-stage 2 --steps 3
    .venv/bin/python benchmarks/profile_train.py --world 2 --zero-stage 3 --steps 2 --profile-steps 1
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import re
import shutil
import socket
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.bench_train import results_dir  # noqa: E402
from benchmarks.comm_model import comm_volume  # noqa: E402
from benchmarks.harness import env_info, write_csv  # noqa: E402
from cosmos_fast.profiling import PHASES, PhaseTimer  # noqa: E402
from cosmos_fast.config import load_config  # noqa: E402
from cosmos_fast.data.synthetic import write_demo_data  # noqa: E402
from cosmos_fast.trainer import Trainer  # noqa: E402

_COLL = re.compile(r"^(gloo|nccl|mpi|ucc):(\w+)$")
_DTYPE_BYTES = {"float": 4, "double": 8, "c10::Half": 2, "c10::BFloat16": 2, "long int": 8, "int": 4,
                "short int": 2, "signed char": 1, "unsigned char": 1, "bool": 1, "Half": 2, "BFloat16": 2,
                "Float": 4, "Double": 8, "Long": 8, "Int": 4, "float16": 2, "bfloat16": 2, "float32": 4}
_FEATURE_BWD = ("_GatherWithGradBackward", "_SumGradBackward")
CATEGORIES = ("feature_allgather", "loss_stats_allreduce", "feature_grad_reduce", "grad_reduce",
              "zero3_param_gather", "zero3_teacher_gather", "param_allgather_after_step",
              "optimizer_allreduce", "other")


class RecordingTimer(PhaseTimer):
    """PhaseTimer that also opens a ``phase::<name>`` profiler range (for attributing collectives)."""

    @contextlib.contextmanager
    def phase(self, name: str):
        with torch.profiler.record_function(f"phase::{name}"), super().phase(name):
            yield


# ----------------------------------------------------------------------------- comm accounting
def wire_factor(collective: str, world: int) -> float:
    """Per-rank bytes on the wire per byte of ``size`` for ring algorithms (nccl-tests bus factors)."""
    if world <= 1:
        return 0.0
    if collective in ("all_reduce", "allreduce"):
        return 2 * (world - 1) / world
    if collective.startswith(("all_gather", "allgather", "reduce_scatter", "all_to_all", "alltoall")):
        return (world - 1) / world
    return 1.0                                            # broadcast, reduce, send/recv


def size_factor(collective: str, world: int) -> int:
    """nccl-tests 'size' from this rank's input: all-gather's input is one of W pieces."""
    return world if collective.startswith(("all_gather", "allgather")) else 1


def classify(collective: str, phase: str | None, in_feature_bwd: bool, stage: int = 0) -> str:
    gather = collective.startswith(("all_gather", "allgather"))
    reduce = collective.startswith(("all_reduce", "allreduce", "reduce"))
    if in_feature_bwd:
        return "feature_grad_reduce"
    if phase == "loss":
        return "feature_allgather" if gather else "loss_stats_allreduce"
    if gather and (phase in ("student_forward", "backward") or (stage == 3 and phase == "optimizer")):
        return "zero3_param_gather"
    if gather and phase == "teacher_forward":
        return "zero3_teacher_gather"
    if reduce and phase == "backward":
        return "grad_reduce"
    if gather and phase == "optimizer":
        return "param_allgather_after_step"
    if reduce and phase == "optimizer":
        return "optimizer_allreduce"
    return "other"


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def collectives_from_profile(prof, world: int, steps: int, stage: int = 0) -> list[dict]:
    """Per-step volume by (category, collective) from a finished torch.profiler run."""
    events = list(prof.profiler.kineto_results.events())
    ranges = []                                       # (start, end, name) of phases and feature bwd nodes
    c10d = []                                         # (start, shapes, dtypes) of c10d:: ops (fallback sizes)
    for e in events:
        name = e.name()
        if name.startswith("phase::") or any(k in name for k in _FEATURE_BWD):
            ranges.append((e.start_ns(), e.start_ns() + e.duration_ns(), name))
        elif name.startswith("c10d::"):
            c10d.append((e.start_ns(), e.shapes(), e.dtypes()))
    c10d.sort(key=lambda x: x[0])
    acc: dict[tuple, dict] = {}
    for e in events:
        m = _COLL.match(e.name())
        if not m:
            continue
        coll, t = m.group(2), e.start_ns()
        shapes, dtypes = e.shapes(), e.dtypes()
        if not shapes or not shapes[0]:
            prev = [c for c in c10d if c[0] <= t]
            if prev:
                shapes, dtypes = prev[-1][1], prev[-1][2]
        first = next((i for i, s in enumerate(shapes) if s), None)
        nbytes = _numel(shapes[first]) * _DTYPE_BYTES.get(dtypes[first] if first < len(dtypes) else "float", 4) \
            if first is not None else 0
        containing = [r for r in ranges if r[0] <= t <= r[1]]
        phases = [r for r in containing if r[2].startswith("phase::")]
        phase = max(phases, key=lambda r: r[0])[2][len("phase::"):] if phases else None
        feat = any(not r[2].startswith("phase::") for r in containing)
        cat = classify(coll, phase, feat, stage)
        a = acc.setdefault((cat, coll), {"category": cat, "collective": coll, "calls": 0, "input_bytes": 0,
                                         "size_bytes": 0, "wire_bytes": 0.0, "time_ms": 0.0})
        a["calls"] += 1
        a["input_bytes"] += nbytes
        size = nbytes * size_factor(coll, world)
        a["size_bytes"] += size
        a["wire_bytes"] += size * wire_factor(coll, world)
        a["time_ms"] += e.duration_ns() / 1e6
    rows = []
    for a in sorted(acc.values(), key=lambda r: (CATEGORIES.index(r["category"]), r["collective"])):
        rows.append({**a, **{k: a[k] / steps for k in ("calls", "input_bytes", "size_bytes", "wire_bytes", "time_ms")}})
    return rows


# ----------------------------------------------------------------------------- the ranks
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_config(shards: str, n_samples: int, batch: int, stage: int, model: str, global_size: int | None,
                local_size: int, extra=()):
    over = [f"data.train_shards={shards}", "data.val_shards=", f"data.train_num_samples={n_samples}",
            f"data.batch_size={batch}", "data.num_workers=0", "data.shuffle_buffer=16", "data.shuffle_initial=4",
            f"data.local_size={local_size}", f"model.name={model}", "train.progress=false",
            "train.tensorboard=false", "train.auto_resume=false", "train.save_every_steps=0",
            "distributed.backend=deepspeed", f"distributed.zero_stage={stage}", "optim.warmup=2", "optim.epochs=1000"]
    if global_size:
        over.append(f"data.global_size={global_size}")
    return load_config("tiny-cpu", over + list(extra))


def _batches(trainer):
    """The trainer's loader forever (epoch after epoch), yielding (batch, seconds waited)."""
    epoch = 0
    while True:
        trainer.loader.set_epoch(epoch)
        tick = time.perf_counter()
        for b in trainer.loader:
            yield b, time.perf_counter() - tick
            tick = time.perf_counter()
        epoch += 1


def _worker(rank, world, port, job):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"
                                                                           if not torch.cuda.is_available() else "cuda"))
    torch.set_num_threads(job["threads"])
    import logging

    logging.getLogger("deepspeed").setLevel(logging.WARNING)
    cfg = make_config(job["shards"], job["n_samples"], job["batch"], job["stage"], job["model"], job["global_size"],
                      job["local_size"], job.get("extra", ()))
    out = Path(job["out"])
    t = Trainer(cfg, out)
    t.timer = RecordingTimer(True, t.device)
    it = _batches(t)
    for _ in range(job["warmup"]):
        batch, _ = next(it)
        t.train_step(batch)
    t.timer.reset()
    times = []
    for _ in range(job["steps"]):
        batch, waited = next(it)
        t.timer.add("data_wait", waited)
        if t.device.type == "cuda":
            torch.cuda.synchronize(t.device)
        t0 = time.perf_counter()
        t.train_step(batch)
        if t.device.type == "cuda":
            torch.cuda.synchronize(t.device)
        times.append(time.perf_counter() - t0)
    phases = {k: v * 1e3 for k, v in t.timer.mean().items()}
    comm, trace = [], None
    if job["profile_steps"]:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if t.device.type == "cuda" else [])
        batches = [next(it)[0] for _ in range(job["profile_steps"])]
        with profile(activities=acts, record_shapes=True) as prof:
            for batch in batches:
                t.train_step(batch)
        comm = collectives_from_profile(prof, world, job["profile_steps"], t.stage)
        if job["trace"]:
            raw = out / f"trace_rank{rank}.json"
            prof.export_chrome_trace(str(raw))
            trace = out / f"trace_rank{rank}.json.gz"
            with open(raw, "rb") as src, gzip.open(trace, "wb") as dst:
                shutil.copyfileobj(src, dst)
            raw.unlink()
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in t.student.parameters())
    result = {"rank": rank, "world": world, "stage": t.stage, "step_times_s": times, "phases_ms": phases,
              "comm": comm, "trace": str(trace) if trace else None, "n_params": n_params,
              "batch": job["batch"], "device": str(t.device)}
    (out / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    t.close()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def launch(world: int, stage: int, out: Path, *, shards: str, n_samples: int, batch: int, steps: int, warmup: int,
           profile_steps: int, model: str = "tiny", global_size: int | None = None, local_size: int = 32,
           threads: int = 1, trace: bool = True, extra=()) -> list[dict]:
    """Run ``world`` ranks; returns each rank's result dict (also written to ``out/rank<r>.json``)."""
    import torch.multiprocessing as mp

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    job = dict(shards=shards, n_samples=n_samples, batch=batch, stage=stage, steps=steps, warmup=warmup,
               profile_steps=profile_steps, model=model, global_size=global_size, local_size=local_size,
               threads=threads, out=str(out), trace=trace, extra=list(extra))
    mp.spawn(_worker, args=(world, free_port(), job), nprocs=world, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def demo_shards(folder: Path, n: int, image_size: int = 96) -> str:
    return write_demo_data(folder, n_train=n, n_val=1, samples_per_shard=max(1, n // 2), image_size=image_size)["train"]


# ----------------------------------------------------------------------------- report
def summarize(results: list[dict], out: Path, args) -> tuple[list[dict], list[dict], str]:
    world, stage = results[0]["world"], results[0]["stage"]
    phase_rows, comm_rows = [], []
    for r in results:
        st = sorted(r["step_times_s"])
        phase_rows.append({"world": world, "zero_stage": stage, "B": r["batch"], "rank": r["rank"],
                           "step_median_ms": statistics.median(st) * 1e3, "step_p20_ms": st[round(0.2 * (len(st) - 1))] * 1e3,
                           "step_p80_ms": st[round(0.8 * (len(st) - 1))] * 1e3,
                           **{f"t_{p}_ms": r["phases_ms"].get(p, 0.0) for p in PHASES}})
        for c in r["comm"]:
            comm_rows.append({"world": world, "zero_stage": stage, "B": r["batch"], "rank": r["rank"], **c})
    lines = [f"# Profile: ZeRO-{stage}, {world} rank(s), B={results[0]['batch']} per rank, "
             f"{results[0]['n_params'] / 1e6:.2f}M parameters", "",
             "Per-phase means (ms per step), every rank:", "",
             "| rank | step median | " + " | ".join(PHASES) + " |", "|---" * (len(PHASES) + 2) + "|"]
    for p in phase_rows:
        lines.append(f"| {p['rank']} | {p['step_median_ms']:.1f} | " +
                     " | ".join(f"{p[f't_{ph}_ms']:.1f}" for ph in PHASES) + " |")
    lines += ["", "Communication per step (rank 0; bytes as described in benchmarks/profile_train.py):", "",
              "| category | collective | calls | input MB | size MB | wire MB | time ms |", "|---|---|---|---|---|---|---|"]
    for c in (c for c in comm_rows if c["rank"] == 0):
        lines.append(f"| {c['category']} | {c['collective']} | {c['calls']:.1f} | {c['input_bytes'] / 1e6:.3f} | "
                     f"{c['size_bytes'] / 1e6:.3f} | {c['wire_bytes'] / 1e6:.3f} | {c['time_ms']:.2f} |")
    try:                                         # the formula volumes of comm_model.py, for comparison
        f = comm_volume(results[0]["n_params"], stage, world, batch=results[0]["batch"], dim=args.embed_dim,
                        param_bytes=4, grad_bytes=4, feature_bytes=4, teacher_partitioned=True,
                        reduce_scatter=results[0]["device"].startswith("cuda"))
        meas = defaultdict(float)
        for c in (c for c in comm_rows if c["rank"] == 0):
            meas[c["category"]] += c["wire_bytes"]
        lines += ["", "Measured vs formula (benchmarks/comm_model.py comm_volume) wire bytes per step and rank "
                  "(fp32 on CPU, where gloo all-reduces in place of reduce-scatter):", "",
                  "| category | measured MB | formula MB |", "|---|---|---|"]
        for k in sorted(set(meas) | set(f)):
            lines.append(f"| {k} | {meas.get(k, 0) / 1e6:.3f} | {f.get(k, 0) / 1e6:.3f} |")
    except Exception as e:                       # pragma: no cover - informative only
        lines.append(f"\n(formula comparison unavailable: {e})")
    traces = [r["trace"] for r in results if r["trace"]]
    if traces:
        lines += ["", "Chrome traces (open in chrome://tracing or ui.perfetto.dev): " +
                  ", ".join(Path(t).name for t in traces)]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return phase_rows, comm_rows, text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3])
    ap.add_argument("--model", default="tiny", help="model name of the config (tiny, ViT-B-16, ViT-B-32)")
    ap.add_argument("--embed-dim", type=int, default=64, help="feature width D (for the formula comparison)")
    ap.add_argument("--batch", type=int, default=4, help="per-rank batch")
    ap.add_argument("--global-size", type=int, default=0, help="global crop px (0: the model's image size)")
    ap.add_argument("--local-size", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (phase timers)")
    ap.add_argument("--profile-steps", type=int, default=2, help="steps under torch.profiler (chrome trace)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--shards", default="", help="webdataset shards (default: synthetic, written to the run folder)")
    ap.add_argument("--output-dir", default="", help="run folder (default bench_results/profile/<device>_..._zero<S>_w<W>)")
    ap.add_argument("--results-dir", default=None)
    ap.add_argument("--no-trace", action="store_true")
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = env_info(device)
    root = results_dir(args.results_dir)
    out = Path(args.output_dir or root / "profile" /
               f"{info['device']}_{info['date']}_{info['commit']}_zero{args.zero_stage}_w{args.world}")
    n = args.batch * args.world * (args.warmup + args.steps + args.profile_steps + 1)
    shards = args.shards or demo_shards(out / "data", n)
    t0 = time.perf_counter()
    results = launch(args.world, args.zero_stage, out, shards=shards, n_samples=n, batch=args.batch,
                     steps=args.steps, warmup=args.warmup, profile_steps=args.profile_steps, model=args.model,
                     global_size=args.global_size or None, local_size=args.local_size, threads=args.threads,
                     trace=not args.no_trace)
    if not args.shards:
        shutil.rmtree(out / "data", ignore_errors=True)
    phase_rows, comm_rows, text = summarize(results, out, args)
    print(text)
    print(f"run folder {out} ({time.perf_counter() - t0:.0f} s)")
    if not args.no_csv:
        print("wrote", write_csv("profile_phases", phase_rows, device, root=root,
                                  case=("world", "zero_stage", "B", "rank")))
        if comm_rows:
            print("wrote", write_csv("profile_comm", comm_rows, device, root=root,
                                    case=("world", "zero_stage", "B", "rank", "category", "collective")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
