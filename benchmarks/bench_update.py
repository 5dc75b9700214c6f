"""Two levers of the fast step, each on and off, in one run: caption truncation
(``model.truncate_captions``) and the EMA + AdamW in one pass over flat buffers (``optim.fused_update``).

Providers: the four combinations ``trunc{0,1}_fused{0,1}`` of a full COSMOS training step
(``cosmos_fast.step.cosmos_train_step``: student and teacher forward, loss, backward, EMA, AdamW) on
the same weights and the same pre-built batch (``bench_train.make_batch``: caption end-of-text
positions drawn in [4, 30), so the truncated length is 32 of 77), plus the update alone (``update``:
EMA + AdamW over the model's parameters with fixed gradients, separate passes vs the fused pass).

Equality first: one step of every provider from the same weights; losses must agree (rel. ≤ 1e-5)
and, between fused and separate with the same truncation, the updated student and teacher must be
equal (bitwise on CPU, ≤ 1e-5 relative on CUDA). Then the providers' steps are interleaved
(ABCD…, order rotating) and each reports median / p20 / p80 step time and samples/s; the update rows
report the update alone. Rows go to ``<results>/update/<device>_<date>_<sha>.csv``.

    .venv/bin/python benchmarks/bench_update.py --model tiny --batch 8 --reps 10
    python benchmarks/bench_update.py --model ViT-B-16 --batch 64 --reps 10      # GPU
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.bench_train import make_batch, parse_model, results_dir  # noqa: E402
from benchmarks.harness import env_info, save_results, time_fn  # noqa: E402
from cosmos_fast.ema import build_teacher, ema_update  # noqa: E402
from cosmos_fast.engine import AMP_DTYPES  # noqa: E402
from cosmos_fast.fused_update import FusedEmaAdamW  # noqa: E402
from cosmos_fast.model import create_model  # noqa: E402
from cosmos_fast.model.config import resolve_model_config  # noqa: E402
from cosmos_fast.model.cosmos import executed_text_tokens  # noqa: E402
from cosmos_fast.ops.contrastive import CosmosLoss  # noqa: E402
from cosmos_fast.optim import build_adamw  # noqa: E402
from cosmos_fast.step import cosmos_train_step  # noqa: E402

MOMENTUM = 0.999


class Provider:
    def __init__(self, student, teacher, truncate: bool, fused: bool, device, amp_dtype):
        self.name = f"trunc{int(truncate)}_fused{int(fused)}"
        self.student, self.teacher = copy.deepcopy(student), copy.deepcopy(teacher)
        self.student.truncate_captions = self.teacher.truncate_captions = truncate
        if fused:
            self.opt = FusedEmaAdamW(self.student, self.teacher, lr=1e-5, weight_decay=0.5)
        else:
            self.opt = build_adamw(self.student, lr=1e-5, weight_decay=0.5,
                                   **({"fused": True} if device.type == "cuda" else {}))
        self.loss_fn = CosmosLoss("fused" if device.type == "cuda" else "blockwise")
        self.device, self.amp_dtype, self.times = device, amp_dtype, []

    def step(self, crops, caps):
        amp = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else None
        return cosmos_train_step(self.student, self.teacher, self.loss_fn, self.opt, crops, caps,
                                 momentum=MOMENTUM, autocast=amp)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_equal(providers, crops, caps, cuda: bool) -> None:
    losses = {p.name: float(p.step(crops, caps)["loss"]) for p in providers}
    ref = losses[providers[0].name]
    for name, v in losses.items():
        if abs(v - ref) > 1e-5 * abs(ref):
            raise SystemExit(f"refusing to time: loss of {name} {v} differs from {providers[0].name} {ref}")
    by = {p.name: p for p in providers}
    for t in (0, 1):
        a, b = by[f"trunc{t}_fused0"], by[f"trunc{t}_fused1"]
        for m in ("student", "teacher"):
            sa, sb = getattr(a, m).state_dict(), getattr(b, m).state_dict()
            for k in sa:
                same = (torch.allclose(sa[k], sb[k], rtol=1e-5, atol=1e-7) if cuda else torch.equal(sa[k], sb[k]))
                if not same:
                    raise SystemExit(f"refusing to time: {m} {k} differs between {a.name} and {b.name}")
    print("equality: losses agree; fused and separate updates equal" + (" (≤ 1e-5)" if cuda else " (bitwise)"))


def time_update(student, device, reps: int) -> list[dict]:
    """The update alone on fixed random gradients: foreach EMA + torch AdamW vs the fused pass."""
    rows = []
    for fused in (False, True):
        s = copy.deepcopy(student)
        t = build_teacher(s)
        opt = (FusedEmaAdamW(s, t, lr=1e-5, weight_decay=0.5) if fused else
               build_adamw(s, lr=1e-5, weight_decay=0.5, **({"fused": True} if device.type == "cuda" else {})))
        for p in s.parameters():
            g = torch.randn_like(p)
            if p.grad is None:
                p.grad = g
            else:                       # the fused optimizer's gradients are views into its flat buffer
                p.grad.copy_(g)

        def update():
            if fused:
                opt.set_ema(MOMENTUM)
            else:
                ema_update(t, s, MOMENTUM)
            opt.step()

        r = time_fn(update, device, warmup=2, reps=reps)
        rows.append({"provider": "update_fused" if fused else "update_separate", "median_ms": r["median_s"] * 1e3,
                     "p20_ms": r["p20_s"] * 1e3, "p80_ms": r["p80_s"] * 1e3})
    return rows


def run(args) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    amp = AMP_DTYPES["amp_bf16" if cuda else "fp32"]
    spec = parse_model(args.model)
    mcfg = resolve_model_config(spec)
    size = mcfg.vision_cfg.image_size
    local = 96 if size >= 224 else max(mcfg.vision_cfg.patch_size, size // 2)
    ctx = mcfg.text_cfg.context_length
    print(" ".join(f"{k}={v}" for k, v in env_info(device).items()), f"model={args.model} B={args.batch}")
    torch.manual_seed(args.seed)
    base = create_model(spec, pool_impl="shared" if cuda else "absorbed").to(device)
    teacher = build_teacher(base)
    providers = [Provider(base, teacher, tr, fu, device, amp) for tr in (False, True) for fu in (False, True)]
    batch = make_batch(args.batch, size, local, mcfg.text_cfg.vocab_size, ctx, seed=args.seed)
    crops = [c.to(device) for c in batch["crops"]]
    caps = batch["captions"].to(device)
    tokens = executed_text_tokens(caps, args.batch, ctx)
    print("text tokens per step: executed student {student} / teacher {teacher}, official {official_student} / "
          "{official_teacher}".format(**tokens))
    check_equal(providers, crops, caps, cuda)
    for _ in range(args.warmup):
        for p in providers:
            p.step(crops, caps)
    for i in range(args.reps):                     # interleaved, rotating order
        for p in providers[i % 4:] + providers[:i % 4]:
            _sync(device)
            t0 = time.perf_counter()
            p.step(crops, caps)
            _sync(device)
            p.times.append(time.perf_counter() - t0)
    rows = []
    for p in providers:
        ts = sorted(p.times)
        q = lambda f: ts[min(len(ts) - 1, int(f * len(ts)))]          # noqa: E731
        med = ts[len(ts) // 2] if len(ts) % 2 else 0.5 * (ts[len(ts) // 2 - 1] + ts[len(ts) // 2])
        rows.append({"provider": p.name, "median_ms": med * 1e3, "p20_ms": q(0.2) * 1e3, "p80_ms": q(0.8) * 1e3,
                     "samples_per_s": args.batch / med})
    rows += time_update(providers[0].student, device, max(args.reps, 5))
    base_ms = rows[0]["median_ms"]
    for r in rows[:4]:
        r["speedup_vs_trunc0_fused0"] = base_ms / r["median_ms"]
    for r in rows:
        r.update(model=args.model, batch=args.batch)
    print(f"\n{'provider':18s} {'median ms':>10s} {'p20':>8s} {'p80':>8s} {'speed-up':>9s}")
    for r in rows:
        print(f"{r['provider']:18s} {r['median_ms']:10.2f} {r['p20_ms']:8.2f} {r['p80_ms']:8.2f} "
              f"{r.get('speedup_vs_trunc0_fused0', float('nan')):9.3f}")
    save_results("update", rows, device, case=("provider", "model", "batch"), root=results_dir(args.results_dir))
    return rows


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results-dir", default=None)
    return ap.parse_args(argv)


if __name__ == "__main__":
    run(parse_args())
