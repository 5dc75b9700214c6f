"""What this device reaches, measured now: the ceilings the kernel benchmarks are read against.

    python benchmarks/ceilings.py                 # GPU: copy bandwidth, bf16/fp16/TF32 GEMM, fp64 atomics
    python benchmarks/ceilings.py --quick         # smaller sizes (CPU or a smoke run)

* ``copy``: a device-to-device copy of a large buffer; bandwidth counts the bytes read plus written.
* ``gemm``: an n³ matmul per dtype (bf16, fp16, fp32 under TF32 on CUDA; fp32 on CPU).
* ``atomic_add_fp64``: ``index_add_`` of fp64 values into a small table from many rows (the column
  sums of the fused loss's forward go through fp64 atomics).
Every quantity is the median of ``--reps`` timed runs after warm-up; rows go to
``<results>/ceilings/<device>_<date>_<sha>.csv`` (``--results-dir``, default bench_results/).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import env_info, save_results, time_fn  # noqa: E402


def measure(device: torch.device, quick: bool, reps: int) -> list[dict]:
    rows = []
    gpu = device.type == "cuda"
    nbytes = (1 << 28 if not quick else 1 << 24) if gpu else (1 << 26 if not quick else 1 << 22)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup=3, reps=reps)
    rows.append({"what": "copy", "dtype": "float32", "size": nbytes, **t,
                 "gb_per_s": 2 * nbytes / t["median_s"] / 1e9})
    n = (8192 if not quick else 2048) if gpu else (1024 if not quick else 256)
    dtypes = [torch.bfloat16, torch.float16, torch.float32] if gpu else [torch.float32]
    for dt in dtypes:
        a = torch.randn(n, n, device=device, dtype=dt)
        b = torch.randn(n, n, device=device, dtype=dt)
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = dt == torch.float32 and gpu
        try:
            t = time_fn(lambda: a @ b, device, warmup=3, reps=reps)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
        name = str(dt).split(".")[-1] + ("_tf32" if dt == torch.float32 and gpu else "")
        rows.append({"what": "gemm", "dtype": name, "size": n, **t, "tflops": 2 * n ** 3 / t["median_s"] / 1e12})
    m = (1 << 24 if not quick else 1 << 20) if gpu else 1 << 18
    vals = torch.rand(m, device=device, dtype=torch.float64)
    idx = torch.randint(0, 4096, (m,), device=device)
    table = torch.zeros(4096, device=device, dtype=torch.float64)
    t = time_fn(lambda: table.index_add_(0, idx, vals), device, warmup=3, reps=reps)
    rows.append({"what": "atomic_add_fp64", "dtype": "float64", "size": m, **t,
                 "g_adds_per_s": m / t["median_s"] / 1e9})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--results-dir", default=None)
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = env_info(device)
    print(f"device {info['device']}, torch {info['torch']}, triton {info['triton']}, commit {info['commit']}")
    rows = measure(device, args.quick, args.reps)
    for r in rows:
        rate = next((f"{r[k]:.1f} {k}" for k in ("gb_per_s", "tflops", "g_adds_per_s") if k in r), "")
        print(f"  {r['what']:16s} {r['dtype']:10s} size {r['size']:>10d}  median {1e3 * r['median_s']:.3f} ms  {rate}")
    if not args.no_csv:
        save_results("ceilings", rows, device, case=("what", "dtype", "size"),
                     root=Path(args.results_dir) if args.results_dir else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
