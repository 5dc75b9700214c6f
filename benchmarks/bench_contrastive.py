"""Benchmark of the full 80-pair COSMOS loss: reference vs blockwise (CPU) / torch.compile / Triton (GPU).

    python benchmarks/bench_contrastive.py                      # CPU defaults: B 1024, 2048, 4096
    python benchmarks/bench_contrastive.py --sizes 1024 4096 16384 32768   # GPU

For every size, each provider's loss values are first checked against the reference (where the
reference fits: CPU up to 2048, else against the blockwise path), and every gradient is checked at
the first size; then fwd, bwd and fwd+bwd are timed (median, p20, p80) and their extra peak memory
is measured (on CPU by a dispatch-level tracker of tensor storages; on GPU by the allocator).
bwd and fwd+bwd memory include the gradients of the inputs — the floor of any implementation; their
size is reported beside it (``input_grad_bytes``). Rows go to
bench_results/contrastive/<device>_<date>_<sha>.csv.
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


def loss_fn(provider):
    if provider == "compile":
        ref = CosmosLoss("reference")
        return torch.compile(lambda **kw: ref(**kw))
    return CosmosLoss(provider)


def forward(fn, x, p, b):
    out = fn(logit_scale=p[0].exp(), distill_logit_scale=p[1].exp(), batch_size=b, output_dict=True, **x)
    return out


def grads(fn, x, p, b):
    out = forward(fn, x, p, b)
    leaves = [v for v in x.values() if v.requires_grad] + [p]
    return out, torch.autograd.grad(out["distill_loss"] + out["clip_loss"], leaves)


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=None)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs first (the first large CPU "
                    "allocations page-fault and are several times slower)")
    ap.add_argument("--ref-max", type=int, default=None, help="largest B for the reference (CPU 2048, GPU 4096)")
    ap.add_argument("--blockwise-max", type=int, default=4096)
    ap.add_argument("--providers", nargs="+", default=None)
    ap.add_argument("--no-csv", action="store_true")
    add_record_arg(ap)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype)
    sizes = args.sizes or ([1024, 4096, 16384, 32768] if gpu else [1024, 2048, 4096])
    ref_max = args.ref_max or (4096 if gpu else 2048)
    providers = args.providers or (["reference", "compile", "fused"] if gpu else ["reference", "blockwise"])
    info = env_info(device)
    print(f"device {info['device']}, torch {info['torch']}, triton {info['triton']}, commit {info['commit']}; "
          f"D={args.dim}, {args.dtype}, {N_CROPS} crops × {N_CAPS} captions = 16 CLIP + 64 distillation pairs")
    rows, grads_checked = [], False
    for b in sizes:
        active = [p for p in providers if (p not in ("reference", "compile") or b <= ref_max)
                  and (p != "blockwise" or b <= args.blockwise_max)]
        if not active:
            continue
        x, p = make_inputs(b, args.dim, device, dtype)
        fns = {name: loss_fn(name) for name in active}
        # ---- equality first
        truth_name = "reference" if "reference" in active else ("blockwise" if "blockwise" in active else None)
        errs = {}
        with torch.no_grad():
            truth = forward(fns[truth_name], x, p, b) if truth_name else None
        for name in active:
            if truth is None or name == truth_name:
                errs[name] = 0.0
                continue
            with torch.no_grad():
                out = forward(fns[name], x, p, b)
            errs[name] = max(rel_err(out[k], truth[k]) for k in truth)
            if errs[name] > (1e-4 if dtype == torch.float32 else 2e-2):
                raise SystemExit(f"{name} differs from {truth_name} at B={b}: rel err {errs[name]:.2e}")
        if not grads_checked and truth_name == "reference":
            _, g_ref = grads(fns["reference"], x, p, b)
            for name in active:
                if name != "reference":
                    _, g = grads(fns[name], x, p, b)
                    worst = max(rel_err(a, r) for a, r in zip(g, g_ref))
                    if worst > (1e-3 if dtype == torch.float32 else 5e-2):
                        raise SystemExit(f"{name} gradients differ from the reference at B={b}: {worst:.2e}")
                    print(f"  gradients of {name} equal the reference at B={b} (max rel err {worst:.1e})")
            grads_checked = True
        # ---- timing and memory
        leaves = [v for v in x.values() if v.requires_grad] + [p]
        grad_floor = sum(v.numel() * v.element_size() for v in leaves)   # the gradients any path must hold

        def zero():
            for leaf in leaves:
                leaf.grad = None

        for name in active:
            fn = fns[name]

            def fwd():
                return forward(fn, x, p, b)

            def fwd_bwd():
                out = forward(fn, x, p, b)
                (out["distill_loss"] + out["clip_loss"]).backward()

            def setup_bwd():
                zero()
                out = forward(fn, x, p, b)
                return out["distill_loss"] + out["clip_loss"]

            modes = {"fwd": (lambda _=None: fwd(), None), "bwd": (lambda loss: loss.backward(), setup_bwd),
                     "fwd+bwd": (lambda _=None: fwd_bwd(), None)}
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
                print(f"  {name:10s} {mode:8s} B={b:6d} median {timing['median_s']:.3f} s, "
                      f"peak {mem / 2**20:.1f} MiB (input-gradient floor {floor / 2**20:.1f} MiB)", flush=True)
                rows.append({"bench": "cosmos_loss_80_pairs", "provider": name, "mode": mode, "B": b,
                             "D": args.dim, "dtype": args.dtype, **timing, "peak_mem_bytes": mem,
                             "input_grad_bytes": floor,
                             "max_rel_err_vs_" + "truth": errs[name]})
    # ratios against the reference measured in this run
    ref = {(r["B"], r["mode"]): r for r in rows if r["provider"] == "reference"}
    print(f"\n{'provider':10s} {'mode':8s} {'B':>6s} {'median s':>10s} {'p20':>8s} {'p80':>8s} "
          f"{'peak MiB':>10s} {'grads MiB':>10s} {'speedup':>8s} {'mem ÷':>8s} {'rel err':>8s}")
    for r in rows:
        base = ref.get((r["B"], r["mode"]))
        r["speedup_vs_reference"] = base["median_s"] / r["median_s"] if base else ""
        r["memory_reduction_vs_reference"] = base["peak_mem_bytes"] / max(r["peak_mem_bytes"], 1) if base else ""
        sp = f"{r['speedup_vs_reference']:.2f}" if base else "-"
        mr = f"{r['memory_reduction_vs_reference']:.1f}" if base else "-"
        print(f"{r['provider']:10s} {r['mode']:8s} {r['B']:6d} {r['median_s']:10.3f} {r['p20_s']:8.3f} "
              f"{r['p80_s']:8.3f} {r['peak_mem_bytes'] / 2**20:10.1f} {r['input_grad_bytes'] / 2**20:10.1f} "
              f"{sp:>8s} {mr:>8s} "
              f"{r['max_rel_err_vs_truth']:8.1e}")
    if not args.no_csv and rows:
        save_results('contrastive', rows, device, record_run=args.record,
                     case=("bench", "provider", "mode", "B", "D", "dtype"))


if __name__ == "__main__":
    main()
