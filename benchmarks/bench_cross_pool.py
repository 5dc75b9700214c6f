"""Cross-attention pooling: the official repeat-the-context reference vs shared K/V vs absorbed vs fused.

Providers
  reference     cosmos_fast.reference.cross_pool.cross_pool_reference (context repeated n times, LN_k
                and K/V projections on every copy, nn.MultiheadAttention), the spec
  absorbed      cosmos_fast.ops.cross_pool(..., impl="absorbed"): LN_k once per sample, W_k folded into
                the queries and W_v applied to the pooled context, no K/V tensors (the CPU default)
  shared        cosmos_fast.ops.cross_pool(..., impl="shared"): LN_k and K/V once per sample, PyTorch SDPA
  fused         cosmos_fast.ops.cross_pool(..., impl="fused"): the absorbed formulation with LN_k and the
                pooling in the Triton kernel of kernels/cross_pool.py (CUDA only)
  fused-kernel  that kernel alone (ln_attention_pool on a (B, L, D) context and (B, n·H, D) fp32
                queries), checked against the same formula in torch; no speed-up column (it is not a
                whole pooler)

Shapes: ViT-B/16 poolers, n = 8 queries per sample, D = 512, 8 heads; the image pooler attends over
L = 196 patch tokens, the text pooler over L = 77 tokens; B = 32, 64, 128 by default (on a shared
CPU pass smaller --batch-sizes). Modes: ``fwd`` (a training forward, autograd recording) and
``fwd+bwd`` (forward, then gradients of <out, w> for the context, the queries and every pooler
parameter).

Every provider's features and gradients are checked against the reference before it is timed.
Reported: median and p20/p80 time, extra peak memory, effective TFLOP/s (useful FLOPs of the shared
formulation / time, the same numerator for every provider), ratios vs the reference measured in the
same run, and memory bandwidth against its floor: ``context_gb_per_s`` is the context traffic no
implementation can avoid (B·L·D·elem bytes read in ``fwd``; in ``fwd+bwd`` also read again and its
gradient written, 3× that) divided by the time, next to ``device_copy_gb_per_s``, the bandwidth of a
large device-to-device copy measured at the start of the same run (bytes read + written / time),
and their ratio ``context_bw_frac_of_copy``. Rows go to bench_results/cross_pool/<device>_<date>_<sha>.csv.

    .venv/bin/python benchmarks/bench_cross_pool.py                  # B = 32, 64, 128
    .venv/bin/python benchmarks/bench_cross_pool.py --quick          # one small size, smoke test
    .venv/bin/python benchmarks/bench_cross_pool.py --threads 1      # CPU shared with other work
    .venv/bin/python benchmarks/bench_cross_pool.py --compile-check 90   # no GPU: kernels' smem/regs/spills

On a CPU that other processes are also using, multi-threaded torch timings swing by up to ~10×
(threads wait on a busy core); --threads 1 gives stable ratios there.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.harness import add_record_arg, env_info, peak_memory, save_results, time_fn  # noqa: E402
from cosmos_fast.model.pooler import CrossAttentionPooler  # noqa: E402
from cosmos_fast.ops.cross_pool import cross_pool  # noqa: E402
from cosmos_fast.reference.cross_pool import cross_pool_reference  # noqa: E402

CONTEXT_LEN = {"image": 196, "text": 77}          # ViT-B/16: 14×14 patches; 77 text tokens
MODES = ("fwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _shared(pooler, context, queries):
    return cross_pool(pooler, context, queries, impl="shared")


def _absorbed(pooler, context, queries):
    return cross_pool(pooler, context, queries, impl="absorbed")


def _fused(pooler, context, queries):
    return cross_pool(pooler, context, queries, impl="fused")


def available_providers(device: torch.device) -> dict:
    out = {"reference": cross_pool_reference, "absorbed": _absorbed, "shared": _shared}
    if device.type == "cuda":
        out["fused"] = _fused
    return out


def context_floor_bytes(b: int, length: int, d: int, dtype: torch.dtype, mode: str) -> int:
    """Context bytes every implementation moves: read once in fwd; fwd+bwd also reads it again and
    writes its gradient (3×)."""
    one = b * length * d * torch.finfo(dtype).bits // 8
    return one * (3 if mode == "fwd+bwd" else 1)


def device_copy_bandwidth(device: torch.device, mib: int = 1024, reps: int = 10) -> float:
    """GB/s of a large device-to-device copy (bytes read + written / median time): the device's
    attainable memory bandwidth, the ceiling for ``context_gb_per_s``."""
    n = mib * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup=2, reps=reps)
    return 2 * n * 4 / t["median_s"] / 1e9


def compile_check(cc: int, width: int, queries: int) -> list[dict]:
    """Compile the fused kernels for sm_<cc> without a GPU (``triton.compile`` to PTX, then the
    ptxas bundled with triton, ``-v``) with the launchers' block sizes for this width and each
    context dtype: shared memory, registers and spill bytes per kernel. Catches a kernel that would
    not fit the device before a GPU run. Needs TRITON_INTERPRET unset."""
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from cosmos_fast.kernels import cross_pool as kc                  # lazy: triton is optional

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    kernels = {"fwd": (kc._ln_attention_pool_fwd_kernel, kc._fwd_config(queries, width)),
               "bwd_dx": (kc._ln_attention_pool_bwd_dx_kernel, kc._bwd_config(width)),
               "bwd_dq": (kc._ln_attention_pool_bwd_dq_kernel, kc._fwd_config(queries, width))}

    def arg_type(arg: str, dtype: str) -> str:
        if arg.startswith("BLOCK") or arg == "DOT_PRECISION":
            return "constexpr"
        if arg.startswith("stride_") or arg in ("M", "L", "D"):
            return "i32"
        if arg == "eps":
            return "fp32"
        return f"*{dtype}" if arg in ("X", "DX") else "*fp32"      # the context and its gradient

    out = []
    for dtype in ("bf16", "fp16", "fp32"):
        for name, (fn, cfg) in kernels.items():
            sig = {a: arg_type(a, dtype) for a in fn.arg_names}
            consts = {k: v for k, v in cfg.items() if k.startswith("BLOCK")}
            consts["DOT_PRECISION"] = "ieee" if dtype == "fp32" else "tf32"
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", cc, 32),
                               options={"num_warps": cfg["num_warps"]})
            with tempfile.TemporaryDirectory() as tmp:
                ptx = Path(tmp) / "k.ptx"
                ptx.write_text(k.asm["ptx"])
                arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
                log = subprocess.run([str(ptxas), "-v", f"--gpu-name={arch}", str(ptx), "-o", str(ptx) + ".o"],
                                     capture_output=True, text=True, check=True).stderr
            regs = re.search(r"Used (\d+) registers", log)
            spills = re.search(r"(\d+) bytes spill stores", log)
            out.append({"kernel": name, "dtype": dtype, **cfg, "shared_bytes": k.metadata.shared,
                        "registers": int(regs.group(1)) if regs else -1,
                        "spill_store_bytes": int(spills.group(1)) if spills else -1})
    return out


def useful_flops(b: int, n: int, length: int, d: int, mode: str) -> float:
    """Matmul FLOPs of the shared-K/V formulation (Q, K, V, out projections + attention); bwd = 2× fwd."""
    fwd = 2 * b * n * d * d * 2 + 2 * b * length * d * d * 2 + 2 * b * n * length * d * 2
    return fwd * (3 if mode == "fwd+bwd" else 1)


def _call(fn, pooler, ctx, q, w, mode):
    params = list(pooler.parameters())

    def run():
        out = fn(pooler, ctx, q)
        if mode == "fwd":
            return out
        return out, torch.autograd.grad(out, [ctx, q] + params, w)
    return run


def _max_rel_err(got, want) -> float:
    """max |got − want| / max |want| over the features and every gradient."""
    pairs = [(got[0], want[0])] + list(zip(got[1], want[1])) if isinstance(got, tuple) else [(got, want)]
    return max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
               for a, b in pairs)


def run_case(pooler_name, length, b, n, d, heads, mode, providers, device, dtype, args):
    torch.manual_seed(0)
    pooler = CrossAttentionPooler(d, d, n_head=heads).to(device=device, dtype=dtype)
    ctx = torch.randn(b, length, d, device=device, dtype=dtype, requires_grad=True)
    q = torch.randn(b, n, d, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(b, n, d, device=device, dtype=dtype)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    calls = {name: _call(fn, pooler, ctx, q, w, mode) for name, fn in providers.items()}
    # the reference always runs once as the truth; above --max-reference-batch it is not timed
    skip_ref = bool(args.max_reference_batch) and b > args.max_reference_batch
    want = calls["reference"]() if "reference" in calls else None
    rows = []
    for name, call in calls.items():
        if name == "reference" and skip_ref:
            print(f"  note: reference not timed at B={b} (> --max-reference-batch {args.max_reference_batch})")
            continue
        err = float("nan")
        if want is not None:
            err = _max_rel_err(call(), want) if name != "reference" else 0.0
            if not err <= tol:
                raise SystemExit(f"{name} differs from the reference: max rel err {err:.3e} > {tol:.0e} "
                                 f"({pooler_name} B={b} {mode})")
        rows.append(_row(call, name, err, pooler_name, length, b, n, d, heads, mode, device, dtype, args))
    if "fused" in providers:
        rows.append(_kernel_row(pooler_name, length, b, n, d, heads, mode, device, dtype, args))
    ref = next((r for r in rows if r["provider"] == "reference"), None)
    for r in rows:
        if r["provider"] == "fused-kernel":          # not a whole pooler: no ratio to the reference's time
            r["speedup_vs_ref"] = r["mem_ratio_vs_ref"] = ""
            continue
        r["speedup_vs_ref"] = ref["median_ms"] / r["median_ms"] if ref else float("nan")
        r["mem_ratio_vs_ref"] = ref["peak_mib"] / r["peak_mib"] if ref and r["peak_mib"] > 0 else float("nan")
    return rows


def _row(call, name, err, pooler_name, length, b, n, d, heads, mode, device, dtype, args) -> dict:
    """Time ``call`` and measure its peak memory: one CSV row."""
    t = time_fn(call, device, warmup=args.warmup, reps=args.reps)
    mem = peak_memory(call, device)
    copy_gbps = getattr(args, "device_copy_gb_per_s", float("nan"))
    context_gbps = context_floor_bytes(b, length, d, dtype, mode) / t["median_s"] / 1e9
    return {"pooler": pooler_name, "L": length, "B": b, "n": n, "D": d, "heads": heads,
            "dtype": str(dtype).replace("torch.", ""), "mode": mode, "provider": name,
            "median_ms": t["median_s"] * 1e3, "p20_ms": t["p20_s"] * 1e3, "p80_ms": t["p80_s"] * 1e3,
            "peak_mib": mem / 2**20,
            "eff_tflops": useful_flops(b, n, length, d, mode) / t["median_s"] / 1e12,
            "context_gb_per_s": context_gbps, "device_copy_gb_per_s": copy_gbps,
            "context_bw_frac_of_copy": context_gbps / copy_gbps,
            "max_rel_err_vs_ref": err}


def _kernel_row(pooler_name, length, b, n, d, heads, mode, device, dtype, args) -> dict:
    """The fused kernel alone on the pooler's shapes, checked against its formula in fp32 torch first
    (its max_rel_err_vs_ref is against that formula, not against the reference pooler)."""
    from cosmos_fast.kernels.cross_pool import ln_attention_pool   # lazy: triton is optional

    torch.manual_seed(1)
    ctx = torch.randn(b, length, d, device=device, dtype=dtype, requires_grad=True)
    q = (torch.randn(b, n * heads, d, device=device) * d ** -0.5).requires_grad_()
    w = torch.randn(b, n * heads, d, device=device)

    def torch_formula(x, qq):
        xh = torch.nn.functional.layer_norm(x.float(), x.shape[-1:])
        return torch.softmax(qq @ xh.transpose(1, 2), -1) @ xh

    def kernel_call():
        out = ln_attention_pool(ctx, q)
        return out if mode == "fwd" else (out, torch.autograd.grad(out, [ctx, q], w))

    want = torch_formula(ctx, q)
    if mode != "fwd":
        want = (want, torch.autograd.grad(want, [ctx, q], w))
    err = _max_rel_err(kernel_call(), want)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    if not err <= tol:
        raise SystemExit(f"fused-kernel differs from its torch formula: max rel err {err:.3e} > {tol:.0e} "
                         f"({pooler_name} B={b} {mode})")
    return _row(kernel_call, "fused-kernel", err, pooler_name, length, b, n, d, heads, mode, device, dtype, args)


def print_table(rows):
    head = (f"{'pooler':6s} {'L':>4s} {'B':>4s} {'mode':8s} {'provider':12s} {'median ms':>10s} "
            f"{'p20':>9s} {'p80':>9s} {'peak MiB':>9s} {'TFLOP/s':>8s} {'ctx GB/s':>9s} {'of copy':>8s} "
            f"{'rel err':>9s} {'speedup':>8s} {'mem ×':>8s}")
    print(head)
    print("-" * len(head))

    def ratio(v):
        return f"{v:7.1f}x" if v != "" else f"{'-':>8s}"

    for r in rows:
        print(f"{r['pooler']:6s} {r['L']:4d} {r['B']:4d} {r['mode']:8s} {r['provider']:12s} "
              f"{r['median_ms']:10.2f} {r['p20_ms']:9.2f} {r['p80_ms']:9.2f} {r['peak_mib']:9.1f} "
              f"{r['eff_tflops']:8.3f} {r['context_gb_per_s']:9.1f} {r['context_bw_frac_of_copy']:8.1%} "
              f"{r['max_rel_err_vs_ref']:9.1e} {ratio(r['speedup_vs_ref'])} {ratio(r['mem_ratio_vs_ref'])}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-sizes", default="32,64,128", help="comma-separated B values")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {MODES}")
    ap.add_argument("--poolers", default="image,text", help="comma-separated, from image (L=196), text (L=77)")
    ap.add_argument("--image-len", type=int, default=CONTEXT_LEN["image"], help="image context length "
                    "(196 for ViT-B/16, 49 for ViT-B/32)")
    ap.add_argument("--providers", default="reference,absorbed,shared,fused",
                    help="comma-separated; fused needs CUDA and is dropped without it (with it come the "
                         "fused-kernel rows)")
    ap.add_argument("--queries", type=int, default=8, help="n, queries per sample")
    ap.add_argument("--width", type=int, default=512, help="D")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dtype", choices=("auto",) + tuple(DTYPES), default="auto",
                    help="auto: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-reference-batch", type=int, default=0,
                    help="do not time the reference above this B; it still runs once as the truth "
                         "(0: always time it)")
    ap.add_argument("--quick", action="store_true", help="B=8, 3 reps: a smoke test of the whole script")
    ap.add_argument("--no-csv", action="store_true", help="print only")
    ap.add_argument("--compile-check", type=int, metavar="SM", default=0,
                    help="only compile the fused kernels for sm_SM (e.g. 90, 80) without a GPU and print their "
                         "shared memory, registers and spills (TRITON_INTERPRET must be unset)")
    add_record_arg(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.reps, args.warmup = "8", 3, 1

    if args.compile_check:
        for r in compile_check(args.compile_check, args.width, args.queries * args.heads):
            print(" ".join(f"{k}={v}" for k, v in r.items()))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    have = available_providers(device)
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        have["fused"] = _fused          # a smoke test of the fused rows; interpreted timings mean nothing
    wanted = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = set(wanted) - {"reference", "absorbed", "shared", "fused"}
    if unknown:
        ap.error(f"unknown providers {sorted(unknown)}")
    for p in wanted:
        if p not in have:
            print(f"note: provider {p!r} needs CUDA; skipped on {device}")
    providers = {p: have[p] for p in wanted if p in have}
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if set(modes) - set(MODES):
        ap.error(f"unknown modes {sorted(set(modes) - set(MODES))}")
    lengths = {"image": args.image_len, "text": CONTEXT_LEN["text"]}

    info = env_info(device)
    print(" ".join(f"{k}={v}" for k, v in info.items()), f"dtype={dtype}")
    args.device_copy_gb_per_s = device_copy_bandwidth(device, mib=1024 if device.type == "cuda" else 256)
    print(f"device copy bandwidth: {args.device_copy_gb_per_s:.1f} GB/s (read + write)")
    rows = []
    for pooler_name in [p.strip() for p in args.poolers.split(",") if p.strip()]:
        for b in [int(x) for x in args.batch_sizes.split(",")]:
            for mode in modes:
                print(f"[{pooler_name} L={lengths[pooler_name]} B={b} {mode}]", flush=True)
                rows += run_case(pooler_name, lengths[pooler_name], b, args.queries, args.width, args.heads,
                                 mode, providers, device, dtype, args)
    print()
    print_table(rows)
    if not args.no_csv and rows:
        save_results('cross_pool', rows, device, record_run=args.record,
                     case=("pooler", "L", "B", "n", "D", "heads", "dtype", "mode", "provider"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
