"""The GPU run's verdict: every speed target of the GPU issues next to what this run measured.

    python benchmarks/gpu_summary.py OUTPUT_DIR          # the folder benchmarks/gpu_suite.sh wrote

Reads the CSVs under OUTPUT_DIR (``<bench>/*.csv``, the long format of benchmarks/harness.py) and prints
one line per target: the measured value, the target and "met" / "MISSED" / "not measured". A target
whose rows are absent (a phase failed or ran out of time) is reported as not measured, never guessed.
The table is also written to OUTPUT_DIR/summary.md. Exit status 0 whatever the verdicts: this is a
report, the suite's status file says which phases failed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.report import read_csv  # noqa: E402


def rows_of(out: Path, bench: str) -> list[dict]:
    rows = []
    for path in sorted((out / bench).glob("*.csv")):
        rows += read_csv(path)
    return rows


def num(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def pick(rows, **match):
    """The last row whose columns equal ``match`` (values compared as strings)."""
    found = [r for r in rows if all(str(r.get(k, "")) == str(v) for k, v in match.items())]
    return found[-1] if found else None


def ratio(a, b, key="median_ms"):
    if a is None or b is None or num(a.get(key)) is None or not num(b.get(key)):
        return None
    return num(b[key]) / num(a[key])


def targets(out: Path) -> list[tuple[str, float | None, str, bool | None]]:
    """(what, measured, target text, met?) for every target of issues 15, 16 and 17."""
    res = []

    def add(what, value, op, goal, fmt="{:.2f}"):
        met = None if value is None else (value >= goal if op == ">=" else value <= goal)
        res.append((what, value, f"{op} {fmt.format(goal)}", met))

    loss = rows_of(out, "contrastive")
    ref = pick(loss, provider="reference", mode="fwd+bwd", B=4096)
    fused = pick(loss, provider="fused", mode="fwd+bwd", B=4096)
    add("loss fwd+bwd B=4096: fused ÷ reference speed (×)", ratio(fused, ref), ">=", 3.0)
    big = pick(loss, provider="fused", mode="fwd+bwd", B=16384)
    add("loss fwd+bwd B=16384: fraction of the bf16 GEMM rate (256 passes)",
        num(big.get("frac_of_gemm_ceiling")) if big else None, ">=", 0.5)
    mem = pick(loss, provider="fused", mode="fwd+bwd memory", B=32768)
    add("loss B=32768: GB beyond inputs and their gradients", num(mem["extra_mem_bytes"]) / 1e9 if mem else None,
        "<=", 0.5)
    pool = rows_of(out, "cross_pool")
    case = dict(pooler="image", L=196, B=64, mode="fwd+bwd")
    f, r, s = (pick(pool, provider=p, **case) for p in ("fused", "reference", "shared"))
    add("pooling fwd+bwd B=64 L=196: fused ÷ repeat reference (×)", ratio(f, r), ">=", 6.0)
    add("pooling fwd+bwd B=64 L=196: fused ÷ shared-K/V SDPA (×)", ratio(f, s), ">=", 2.0)
    train = rows_of(out, "train")
    fast = pick(train, model="ViT-B-16", B=64, path="fast")
    add("ViT-B/16 step B=64: MFU on the official FLOP count", num(fast.get("mfu")) if fast else None, ">=", 0.40,
        "{:.0%}")
    data = [r for r in rows_of(out, "train_data") if num(r.get("loader_over_train")) is not None]
    add("data loader ÷ fast step samples/s (best backend)",
        max((num(r["loader_over_train"]) for r in data), default=None), ">=", 1.5)
    rank = rows_of(out, "rank")
    fr = pick(rank, path="fast")
    add("rank step B=32, B_g=4096: fast ÷ official-style (×)", num(fr.get("speedup_vs_official")) if fr else None,
        ">=", 2.5)
    add("rank step B=32, B_g=4096: fast ÷ official + generic engineering (×)",
        num(fr.get("speedup_vs_generic")) if fr else None, ">=", 1.5)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    args = ap.parse_args(argv)
    lines = ["| target | measured | goal | verdict |", "|---|---|---|---|"]
    for what, value, goal, met in targets(args.out):
        shown = "—" if value is None else (f"{value:.3g}")
        verdict = "not measured" if met is None else ("met" if met else "MISSED")
        lines.append(f"| {what} | {shown} | {goal} | {verdict} |")
    text = "\n".join(lines) + "\n"
    print(text)
    (args.out / "summary.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
