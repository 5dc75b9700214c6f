"""Benchmark of the full 80-pair COSMOS loss: reference vs blockwise (CPU) / torch.compile / Triton (GPU).

    python benchmarks/bench_contrastive.py                      # CPU defaults: B 1024, 2048, 4096
    python benchmarks/bench_contrastive.py --providers reference blockwise blockwise:list --sizes 2048
    python benchmarks/bench_contrastive.py --sizes 1024 4096 16384 --memory-sizes 32768 \
        --dtype bfloat16 --gemm-ceiling --kernel-split        # GPU

For every size, each provider's loss values are first checked against the reference (where the
reference fits: CPU up to 2048, else against the blockwise path), and every gradient is checked at
the first size; then fwd, bwd and fwd+bwd are timed (median, p20, p80) and their extra peak memory
is measured (on CPU by a dispatch-level tracker of tensor storages; on GPU by the allocator).
bwd and fwd+bwd memory include the gradients of the inputs — the floor of any implementation; their
size is reported beside it (``input_grad_bytes``) and the rest as ``extra_mem_bytes``.

* ``PROVIDER:list`` passes the features as the official code does — lists of separate B×D tensors —
  instead of the model's (n·B, D) tensors: its memory must match the tensor API's.
* ``tflops_256`` is the work a fused loss must do, divided by the time: 256 similarity passes of
  2·B·N·D FLOP for fwd+bwd (80 forward, 80 backward recompute, 80 dU, 16 dV), 80 for fwd, 176 for bwd.
  ``--gemm-ceiling`` measures the device's bf16 GEMM rate in the same run (``gemm_ceiling`` rows) and
  adds each row's fraction of it.
* ``--memory-sizes``: sizes where only the extra peak memory of fwd+bwd is measured (one run each).
* ``--kernel-split``: one profiled fwd+bwd per provider and size, device time summed per kernel
  (``kernel_split`` rows).
* Ablations (CUDA, or the interpreter): ``fused_sonly`` — the one-pass forward's grid and products
  without the exp/log-sum-exp epilogue (fwd only, not checked: it is not the loss) — and
  ``fused_v1`` — the previous kernels (separate row and column forward passes, separate dU and dV
  kernels, ``kernels/contrastive_v1.py``), checked against the truth like every provider.

Rows go to bench_results/contrastive/<device>_<date>_<sha>.csv.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import add_record_arg, env_info, peak_memory, save_results, time_fn  # noqa: E402
from cosmos_fast import CosmosLoss  # noqa: E402

N_CROPS = N_CAPS = 8
PAIRS = {"fwd": 80, "bwd": 176, "fwd+bwd": 256}     # similarity passes a fused loss must run (docstring)
ABLATIONS = ("fused_sonly", "fused_v1")


def make_inputs(b, d, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def f(n, grad=True):
        x = F.normalize(torch.randn(n * b, d, generator=g), dim=-1).to(device, dtype)
        return x.requires_grad_(grad)

    x = {"s_image_features": f(N_CROPS), "s_text_features": f(N_CAPS), "t_image_features": f(2, False),
         "t_text_features": f(2, False), "s_img_crossmodal_features": f(N_CROPS),
         "s_txt_crossmodal_features": f(N_CAPS)}
    scales = torch.tensor([2.6593, 2.6593], device=device).requires_grad_()
    return x, scales


def as_lists(x: dict, b: int) -> dict:
    """The official calling convention: every argument a list of separate B×D tensors (own storage)."""
    return {k: [blk.detach().clone().requires_grad_(v.requires_grad) for blk in v.split(b)] for k, v in x.items()}


def split_provider(name: str) -> tuple[str, str]:
    impl, _, api = name.partition(":")
    if api not in ("", "list"):
        raise SystemExit(f"provider {name!r}: the only API suffix is ':list'")
    return impl, api or "tensor"


class _V1PairLSE(torch.autograd.Function):
    """The previous kernels' glue on one rank (ablation ``fused_v1``): row-LSE and column max/sum
    kernels, then separate dU and dV kernels."""

    @staticmethod
    def forward(ctx, u, v, tau, p_count, b, q_count, n, need_dv):
        from cosmos_fast.kernels import contrastive_v1 as v1     # lazy: triton is optional

        rlse, cmax, csum = v1.contrastive_fwd(u, v, tau, p_count, b, q_count, n)
        clse = cmax + torch.log(csum)
        ctx.save_for_backward(u, v, tau, rlse, clse)
        ctx.dims = (p_count, b, q_count, n, need_dv)
        return rlse.sum(dim=2) + clse.sum(dim=2)

    @staticmethod
    def backward(ctx, grad):
        from cosmos_fast.kernels import contrastive_v1 as v1

        u, v, tau, rlse, clse = ctx.saved_tensors
        p_count, b, q_count, n, need_dv = ctx.dims
        du, dv, dtau = v1.contrastive_bwd(u, v, tau, rlse, clse, grad.contiguous(), p_count, b, q_count, n, need_dv)
        return du, (dv if need_dv else None), dtau.reshape(tau.shape).to(tau.dtype), None, None, None, None, None


def _groups(kw: dict, b: int):
    """(students, targets, scale, P, Q, need_dv) of the 1 CLIP and 4 distillation groups, tensor API."""
    si, st = kw["s_image_features"][: 2 * b], kw["s_text_features"]
    ti, tt = kw["t_image_features"].detach(), kw["t_text_features"].detach()
    xi, xt = kw["s_img_crossmodal_features"], kw["s_txt_crossmodal_features"]
    tau, tau_d = kw["logit_scale"], kw["distill_logit_scale"]
    out = [("clip", si, st, tau, True)]
    out += [("distill", xs, ts, tau_d, False) for xs in (xi, xt) for ts in (ti, tt)]
    return [(g, u, v, t, u.shape[0] // b, v.shape[0] // b, dv) for g, u, v, t, dv in out]


def _ablation_v1(**kw):
    """The 80-pair loss through the previous kernels (one rank, tensor API)."""
    b = kw["batch_size"]
    loss = {"clip": [], "distill": []}
    for group, u, v, tau, p_count, q_count, need_dv in _groups(kw, b):
        with torch.autocast(u.device.type, enabled=False):
            lse = _V1PairLSE.apply(u, v, tau, p_count, b, q_count, b, need_dv)
            diag = tau * (u.float().reshape(p_count, -1) @ v.float().reshape(q_count, -1).T)
        loss[group].append(((lse - 2 * diag) / (2 * b)).mean())
    return {"distill_loss": sum(loss["distill"]) / 4, "clip_loss": loss["clip"][0]}


def _ablation_s_only(**kw):
    """The one-pass forward's grid and products without the exp epilogue (not a loss: timing only)."""
    from cosmos_fast.kernels import contrastive as kmod     # lazy: triton is optional

    b, total = kw["batch_size"], 0.0
    for _, u, v, tau, _, _, _ in _groups(kw, b):
        _, csum = kmod.contrastive_fwd_s_only([u.detach()], [v.detach()], tau.detach(), b, b)
        total = total + csum.sum()
    return {"distill_loss": total, "clip_loss": torch.zeros_like(total)}


def loss_fn(provider):
    impl, api = split_provider(provider)
    if impl == "compile":
        ref = CosmosLoss("reference")
        return torch.compile(lambda **kw: ref(**kw))
    if impl in ABLATIONS:
        if api == "list":
            raise SystemExit(f"provider {provider!r}: the ablations take the tensor API only")
        return {"fused_v1": _ablation_v1, "fused_sonly": _ablation_s_only}[impl]
    return CosmosLoss(impl)


def forward(fn, x, p, b):
    out = fn(logit_scale=p[0].exp(), distill_logit_scale=p[1].exp(), batch_size=b, output_dict=True, **x)
    return out


def leaves_of(x: dict, p) -> list:
    flat = []
    for v in x.values():
        flat += [t for t in (v if isinstance(v, list) else [v]) if t.requires_grad]
    return flat + [p]


def grads(fn, x, p, b):
    """Loss and the gradients of every input (list arguments' block gradients concatenated)."""
    out = forward(fn, x, p, b)
    keys = [k for k, v in x.items() if (v[0] if isinstance(v, list) else v).requires_grad]
    leaves = leaves_of(x, p)
    # the loss reads only the 2 global crops of s_image_features: the local crops' blocks get no
    # gradient through a list (None) and zeros through a tensor
    flat = torch.autograd.grad(out["distill_loss"] + out["clip_loss"], leaves, allow_unused=True)
    flat = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, flat)]
    res, i = [], 0
    for k in keys:
        n = len(x[k]) if isinstance(x[k], list) else 1
        res.append(torch.cat(flat[i:i + n]))
        i += n
    return out, res + [flat[-1]]


def gradient_bytes(fn, x, p, b, leaves) -> int:
    """Bytes of the input gradients one fwd+bwd leaves behind: the floor of any implementation (a list
    argument's blocks that the loss does not read get none)."""
    out = forward(fn, x, p, b)
    (out["distill_loss"] + out["clip_loss"]).backward()
    total = sum(t.grad.numel() * t.grad.element_size() for t in leaves if t.grad is not None)
    for t in leaves:
        t.grad = None
    return total


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def gemm_ceiling(device, n: int = 8192, reps: int = 10) -> dict:
    """bf16 (GPU) / fp32 (CPU) n³ GEMM rate of this device, measured now."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = n if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: a @ b, device, warmup=3, reps=reps)
    return {"bench": "gemm_ceiling", "provider": f"torch.mm {str(dtype).split('.')[-1]} {n}^3", "mode": "gemm",
            "B": n, **t, "tflops": 2 * n ** 3 / t["median_s"] / 1e12}


def kernel_split(fn, x, p, b, device, top: int = 12) -> list[dict]:
    """One profiled fwd+bwd: device time per kernel (GPU) or self time per op (CPU), largest first."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for leaf in leaves_of(x, p):
        leaf.grad = None
    with profile(activities=acts) as prof:
        out = forward(fn, x, p, b)
        (out["distill_loss"] + out["clip_loss"]).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [(e.key, getattr(e, attr, 0.0)) for e in prof.key_averages()]
    events = sorted((e for e in events if e[1] > 0), key=lambda e: -e[1])
    total = sum(t for _, t in events)
    rows = [{"kernel": name[:80], "time_ms": t / 1e3, "share": t / total} for name, t in events[:top]]
    rows.append({"kernel": "(all)", "time_ms": total / 1e3, "share": 1.0})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=None, help="timed sizes (none: only --memory-sizes)")
    ap.add_argument("--memory-sizes", type=int, nargs="*", default=None,
                    help="sizes where only fwd+bwd peak memory is measured (GPU default 32768; CPU none)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs first (the first large CPU "
                    "allocations page-fault and are several times slower)")
    ap.add_argument("--ref-max", type=int, default=None, help="largest B for the reference (CPU 2048, GPU 4096)")
    ap.add_argument("--blockwise-max", type=int, default=4096)
    ap.add_argument("--providers", nargs="+", default=None,
                    help="reference, compile, blockwise, fused, the ablations fused_sonly / fused_v1; "
                         "PROVIDER:list passes lists of B×D tensors (the official API)")
    ap.add_argument("--gemm-ceiling", action="store_true", help="measure the device's GEMM rate first")
    ap.add_argument("--kernel-split", action="store_true", help="profile one fwd+bwd per provider and size")
    ap.add_argument("--no-csv", action="store_true")
    add_record_arg(ap)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype)
    sizes = args.sizes if args.sizes is not None else ([1024, 4096, 16384] if gpu else [1024, 2048, 4096])
    memory_sizes = args.memory_sizes if args.memory_sizes is not None else ([32768] if gpu else [])
    ref_max = args.ref_max or (4096 if gpu else 2048)
    providers = args.providers or (["reference", "compile", "fused"] if gpu else ["reference", "blockwise"])
    for name in providers:
        split_provider(name)
    info = env_info(device)
    print(f"device {info['device']}, torch {info['torch']}, triton {info['triton']}, commit {info['commit']}; "
          f"D={args.dim}, {args.dtype}, {N_CROPS} crops × {N_CAPS} captions = 16 CLIP + 64 distillation pairs")
    rows, split_rows, grads_checked = [], [], False
    ceiling = None
    if args.gemm_ceiling:
        ceiling = gemm_ceiling(device)
        print(f"  GEMM ceiling: {ceiling['provider']} {ceiling['tflops']:.1f} TFLOP/s")
        rows.append(ceiling)
    for b in sizes:
        active = [p for p in providers if (split_provider(p)[0] not in ("reference", "compile") or b <= ref_max)
                  and (split_provider(p)[0] != "blockwise" or b <= args.blockwise_max)]
        if not active:
            continue
        x, p = make_inputs(b, args.dim, device, dtype)
        xl = as_lists(x, b) if any(split_provider(n)[1] == "list" for n in active) else None
        inputs = {name: (xl if split_provider(name)[1] == "list" else x) for name in active}
        fns = {name: loss_fn(name) for name in active}
        # ---- equality first (ablations are not the loss: fused_sonly is not checked)
        truth_name = next((n for n in ("reference", "blockwise", "fused") if n in active), None)
        errs = {}
        with torch.no_grad():
            truth = forward(fns[truth_name], x, p, b) if truth_name else None
        for name in active:
            if truth is None or name == truth_name or name == "fused_sonly":
                errs[name] = 0.0 if name == truth_name else ""
                continue
            with torch.no_grad():
                out = forward(fns[name], inputs[name], p, b)
            errs[name] = max(rel_err(out[k], truth[k]) for k in truth)
            if errs[name] > (1e-4 if dtype == torch.float32 else 2e-2):
                raise SystemExit(f"{name} differs from {truth_name} at B={b}: rel err {errs[name]:.2e}")
        if not grads_checked and truth_name == "reference":
            _, g_ref = grads(fns["reference"], x, p, b)
            for name in active:
                if name not in ("reference", "fused_sonly"):
                    _, g = grads(fns[name], inputs[name], p, b)
                    worst = max(rel_err(a, r) for a, r in zip(g, g_ref))
                    if worst > (1e-3 if dtype == torch.float32 else 5e-2):
                        raise SystemExit(f"{name} gradients differ from the reference at B={b}: {worst:.2e}")
                    print(f"  gradients of {name} equal the reference at B={b} (max rel err {worst:.1e})")
            grads_checked = True
        # ---- timing and memory
        pass_flop = 2 * b * b * args.dim                  # one similarity pass of one pair (one rank: N = B)
        for name in active:
            fn, xi = fns[name], inputs[name]
            leaves = leaves_of(xi, p)

            def zero():
                for leaf in leaves:
                    leaf.grad = None

            grad_floor = gradient_bytes(fn, xi, p, b, leaves) if name != "fused_sonly" else 0

            def fwd():
                return forward(fn, xi, p, b)

            def fwd_bwd():
                out = forward(fn, xi, p, b)
                (out["distill_loss"] + out["clip_loss"]).backward()

            def setup_bwd():
                zero()
                out = forward(fn, xi, p, b)
                return out["distill_loss"] + out["clip_loss"]

            modes = {"fwd": (lambda _=None: fwd(), None)}
            if name != "fused_sonly":
                modes.update({"bwd": (lambda loss: loss.backward(), setup_bwd),
                              "fwd+bwd": (lambda _=None: fwd_bwd(), None)})
            for mode, (f, setup) in modes.items():
                if setup is None:
                    timing = time_fn(lambda: (zero(), f()), device, warmup=args.warmup, reps=args.reps)
                    zero()
                    mem = peak_memory(f, device)
                else:
                    timing = time_fn(f, device, warmup=args.warmup, reps=args.reps, setup=setup)
                    mem = peak_memory(f, device, setup=setup)
                zero()
                floor = grad_floor if mode != "fwd" else 0
                tflops = PAIRS[mode] * pass_flop / timing["median_s"] / 1e12
                print(f"  {name:14s} {mode:8s} B={b:6d} median {timing['median_s']:.4f} s, {tflops:7.2f} TFLOP/s "
                      f"(256-pass count), peak {mem / 2**20:.1f} MiB (input-gradient floor {floor / 2**20:.1f} "
                      f"MiB)", flush=True)
                row = {"bench": "cosmos_loss_80_pairs", "provider": name, "mode": mode, "B": b,
                       "D": args.dim, "dtype": args.dtype, **timing, "peak_mem_bytes": mem,
                       "input_grad_bytes": floor, "extra_mem_bytes": mem - floor,
                       "max_rel_err_vs_" + "truth": errs[name], "tflops_256": tflops}
                if ceiling:
                    row["frac_of_gemm_ceiling"] = tflops / ceiling["tflops"]
                rows.append(row)
            if args.kernel_split and name != "fused_sonly":
                for r in kernel_split(fn, xi, p, b, device):
                    split_rows.append({"provider": name, "B": b, "D": args.dim, "dtype": args.dtype, **r})
                zero()
    for b in memory_sizes:
        x, p = make_inputs(b, args.dim, device, dtype)
        for name in [n for n in providers if split_provider(n)[0] in ("fused", "blockwise")]:
            fn = loss_fn(name)
            xi = as_lists(x, b) if split_provider(name)[1] == "list" else x
            leaves = leaves_of(xi, p)

            def fwd_bwd():
                out = forward(fn, xi, p, b)
                loss = out["distill_loss"] + out["clip_loss"]
                loss.backward()
                return loss

            mem = peak_memory(fwd_bwd, device)
            floor = sum(t.grad.numel() * t.grad.element_size() for t in leaves if t.grad is not None)
            finite = all(torch.isfinite(leaf.grad).all().item() for leaf in leaves if leaf.grad is not None)
            print(f"  {name:14s} memory   B={b:6d} peak {mem / 2**20:.1f} MiB, beyond inputs' gradients "
                  f"{(mem - floor) / 2**20:.1f} MiB, gradients finite: {finite}", flush=True)
            rows.append({"bench": "cosmos_loss_80_pairs", "provider": name, "mode": "fwd+bwd memory", "B": b,
                         "D": args.dim, "dtype": args.dtype, "peak_mem_bytes": mem, "input_grad_bytes": floor,
                         "extra_mem_bytes": mem - floor, "grads_finite": int(finite)})
            for leaf in leaves:
                leaf.grad = None
            del fn
        del x
    # ratios against the reference measured in this run
    ref = {(r["B"], r["mode"]): r for r in rows if r["provider"] == "reference"}
    print(f"\n{'provider':14s} {'mode':8s} {'B':>6s} {'median s':>10s} {'TFLOP/s':>8s} "
          f"{'peak MiB':>10s} {'extra MiB':>10s} {'speedup':>8s} {'mem ÷':>8s} {'rel err':>8s}")
    for r in rows:
        if r["bench"] != "cosmos_loss_80_pairs" or "median_s" not in r:
            continue
        base = ref.get((r["B"], r["mode"]))
        r["speedup_vs_reference"] = base["median_s"] / r["median_s"] if base else ""
        r["memory_reduction_vs_reference"] = base["peak_mem_bytes"] / max(r["peak_mem_bytes"], 1) if base else ""
        sp = f"{r['speedup_vs_reference']:.2f}" if base else "-"
        mr = f"{r['memory_reduction_vs_reference']:.1f}" if base else "-"
        err = r["max_rel_err_vs_truth"]
        print(f"{r['provider']:14s} {r['mode']:8s} {r['B']:6d} {r['median_s']:10.4f} {r['tflops_256']:8.2f} "
              f"{r['peak_mem_bytes'] / 2**20:10.1f} {r['extra_mem_bytes'] / 2**20:10.1f} "
              f"{sp:>8s} {mr:>8s} {(f'{err:8.1e}' if err != '' else '-'):>8s}")
    if split_rows:
        print("\nper-kernel split of one fwd+bwd (device time on GPU, self CPU time on CPU):")
        for r in split_rows:
            print(f"  {r['provider']:14s} B={r['B']:6d} {r['time_ms']:9.3f} ms {100 * r['share']:5.1f} %  {r['kernel']}")
    if not args.no_csv and rows:
        save_results('contrastive', rows, device, record_run=args.record,
                     case=("bench", "provider", "mode", "B", "D", "dtype"))
    if not args.no_csv and split_rows:
        save_results('contrastive_split', split_rows, device, case=("provider", "B", "D", "dtype", "kernel"))


if __name__ == "__main__":
    main()
