"""Regenerate bench_results/README.md (and the PNG plots) from the benchmark CSVs.

For every benchmark folder ``<results>/<bench>/`` and every device in it, the newest CSV (by the
date in its name, then modification time) becomes one table: device, date, commit and versions in
its heading, the columns that matter for that benchmark, and its ratio against the reference
(speedup and memory ratio, loader speedup over torchvision, scaling efficiency). Each table gets a
plot written beside its CSV (same name, ``.png``). Benchmarks this script does not know are shown
with their first columns. Nothing is measured here.

    .venv/bin/python benchmarks/report.py                       # bench_results/ → bench_results/README.md
    .venv/bin/python benchmarks/report.py --results-dir OUT --readme OUT/README.md --no-plots
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = ("device", "torch", "triton", "cuda", "commit", "date")
PHASES = ("data_wait", "student_forward", "teacher_forward", "loss", "backward", "ema", "optimizer")

# bench -> (columns shown, ratio columns, row filter, plot kind)
SPECS = {
    "contrastive": (["B", "mode", "provider", "median_s", "p20_s", "p80_s", "peak_mem_bytes", "max_rel_err_vs_truth"],
                    ["speedup_vs_reference", "memory_reduction_vs_reference"], None, "ratio"),
    "cross_pool": (["pooler", "L", "B", "mode", "provider", "dtype", "median_ms", "p20_ms", "p80_ms", "peak_mib",
                    "max_rel_err_vs_ref"], ["speedup_vs_ref", "mem_ratio_vs_ref"], None, "ratio"),
    "train": (["model", "B", "precision", "path", "pool_impl", "loss_impl", "median_ms", "p20_ms", "p80_ms",
               "samples_per_s"] + [f"t_{p}_ms" for p in PHASES] + ["peak_mib", "flops_step", "mfu", "peak_source",
                                                                     "loss_rel_err"],
              ["speedup_vs_ref", "mem_ratio_vs_ref"], None, "phases"),
    "train_data": (["model", "backend", "batches_on", "workers", "B", "global_size", "local_size", "samples",
                    "samples_per_s", "train_fast_samples_per_s", "loader_over_train"],
                   ["speedup_vs_torchvision"], None, "ratio"),
    "profile_phases": (["world", "zero_stage", "B", "rank", "step_median_ms"] + [f"t_{p}_ms" for p in PHASES],
                       [], None, "phases"),
    "profile_comm": (["world", "zero_stage", "rank", "category", "collective", "calls", "size_bytes", "wire_bytes",
                      "time_ms"], [], lambda r: r.get("rank") == "0", "comm"),
    "scaling": (["kind", "gpus", "zero_stage", "B", "t_step_ms", "samples_per_s", "wire_mb"], ["efficiency"],
                lambda r: r.get("kind") == "measured", "scaling"),
}
RATIO_HINTS = ("speedup_vs", "mem_ratio_vs", "memory_reduction_vs", "ratio_vs", "efficiency")
METRIC_HINTS = ("per_s", "_ms", "_s", "ratio", "speedup", "err", "mib", "tflops", "bytes")


# ----------------------------------------------------------------------------- reading
def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def latest_per_device(folder: Path) -> dict[str, Path]:
    """{device: newest CSV} in one benchmark folder (date from the name, then mtime)."""
    best: dict[str, tuple] = {}
    for p in folder.glob("*.csv"):
        m = re.match(r"(.+)_(\d{4}-\d{2}-\d{2})_([0-9a-zA-Z]+)", p.stem)
        device, date = (m.group(1), m.group(2)) if m else (p.stem, "")
        key = (date, p.stat().st_mtime)
        if device not in best or key > best[device][0]:
            best[device] = (key, p)
    return {d: v[1] for d, v in sorted(best.items())}


def _fmt(v) -> str:
    if v is None or v == "":
        return ""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return str(v)
    if x != x:
        return "–"
    if x == int(x) and abs(x) < 1e6:
        return str(int(x))
    if abs(x) >= 1e6 or (abs(x) < 1e-3 and x != 0):
        return f"{x:.3g}"
    return f"{x:.4g}"


def _label(col: str) -> str:
    if col.endswith("_bytes"):
        return col[:-6] + " MiB"
    return col


def _cell(col: str, v) -> str:
    if col.endswith("_bytes") and v not in ("", None):
        try:
            return _fmt(float(v) / 2 ** 20)
        except ValueError:
            return str(v)
    if col == "mfu" and v not in ("", None):
        return f"{100 * float(v):.2f}%"
    return _fmt(v)


def markdown_table(rows: list[dict], cols: list[str]) -> str:
    cols = [c for c in cols if any(r.get(c, "") != "" for r in rows)]
    out = ["| " + " | ".join(_label(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_cell(c, r.get(c, "")) for c in cols) + " |")
    return "\n".join(out)


def table_for(bench: str, rows: list[dict]) -> tuple[list[dict], list[str]]:
    if bench in SPECS:
        cols, ratios, keep, _ = SPECS[bench]
        sel = [r for r in rows if keep is None or keep(r)]
        return sel, cols + ratios
    keys = [k for k in rows[0] if k not in ENV]
    ratios = [k for k in keys if k.startswith(RATIO_HINTS)]
    rest = [k for k in keys if k not in ratios]
    if len(rest) > 14:             # descriptors first, then whatever looks like a measurement
        rest = rest[:8] + [k for k in rest[8:] if any(h in k for h in METRIC_HINTS)]
    return rows, rest + ratios


def scaling_pivot(rows: list[dict]) -> str:
    proj = [r for r in rows if r.get("kind") == "projection"]
    if not proj:
        return ""
    gpus = sorted({int(r["gpus"]) for r in proj if int(r["gpus"]) > 1})
    keys = sorted({(r["zero_stage"], r["ib"], r["overlap"]) for r in proj})
    first = proj[0]
    out = [f"Projection ({first.get('model', '')}, B={first.get('B', '')} per GPU, compute "
           f"{first.get('compute_source', '')}, volumes {first.get('volume_source', '')}, MFU {first.get('mfu', '')}): "
           "efficiency / exposed-communication share", "",
           "| ZeRO | IB | overlap | " + " | ".join(f"{g} GPUs" for g in gpus) + " |", "|---|---|---|" + "---|" * len(gpus)]
    for key in keys:
        sel = {int(r["gpus"]): r for r in proj if (r["zero_stage"], r["ib"], r["overlap"]) == key}
        out.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(
            f"{float(sel[g]['efficiency']):.3f} / {100 * float(sel[g]['comm_share']):.1f}%" if g in sel else ""
            for g in gpus) + " |")
    return "\n".join(out)


# ----------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, png: Path, ax=None, bench: str = "", row: dict | None = None) -> bool:
    """Title ``bench — device (date, commit)`` on ``ax`` when given, then write the PNG and close."""
    if ax is not None:
        ax.set_title(f"{bench} — {row['device']} ({row['date']}, {row['commit']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


def _case(r: dict, cols: list[str]) -> str:
    return " ".join(f"{r[c]}" for c in cols if r.get(c, "") != "")


def plot_ratio(rows: list[dict], bench: str, png: Path) -> bool:
    cols, ratios, keep, _ = SPECS.get(bench, ([], [], None, ""))
    rows = [r for r in rows if keep is None or keep(r)]
    ratio = next((c for c in (ratios or list(rows[0])) if c.startswith(RATIO_HINTS) and any(r.get(c) for r in rows)), None)
    if ratio is None:
        return False
    sel = [r for r in rows if r.get(ratio) not in ("", None)]
    label_cols = [c for c in cols if not c.endswith(("_ms", "_s", "_bytes", "_mib", "err", "_ref", "samples",
                                                      "per_s", "_train"))][:5]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(sel) + 2), 4))
    ax.bar(range(len(sel)), [float(r[ratio]) for r in sel], color="tab:blue")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(sel)))
    ax.set_xticklabels([_case(r, label_cols) for r in sel], rotation=70, ha="right", fontsize=7)
    ax.set_ylabel(ratio)
    return _save(plt, fig, png, ax, bench, sel[0])


def plot_phases(rows: list[dict], bench: str, png: Path) -> bool:
    """Stacked share of each phase in the step (linear, so cases of very different size compare),
    with the summed phase time written above each bar."""
    label_cols = ["model", "B", "path"] if bench == "train" else ["world", "zero_stage", "rank"]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows) + 3), 4))
    totals = [sum(float(r.get(f"t_{ph}_ms") or 0) for ph in PHASES) or 1.0 for r in rows]
    bottom = [0.0] * len(rows)
    for ph in PHASES:
        vals = [100 * float(r.get(f"t_{ph}_ms") or 0) / t for r, t in zip(rows, totals)]
        ax.bar(range(len(rows)), vals, bottom=bottom, label=ph)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, t in enumerate(totals):
        ax.text(i, 101, f"{t:.4g} ms", ha="center", fontsize=7)
    ax.set_ylim(0, 110)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([_case(r, label_cols) for r in rows], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("% of step (phase means)")
    ax.legend(fontsize=7, loc="lower right")
    return _save(plt, fig, png, ax, bench, rows[0])


def plot_comm(rows: list[dict], bench: str, png: Path) -> bool:
    groups = defaultdict(lambda: defaultdict(float))
    for r in rows:
        if r.get("rank") == "0":
            groups[f"ZeRO-{r['zero_stage']} W={r['world']}"][r["category"]] += float(r["wire_bytes"]) / 2 ** 20
    if not groups:
        return False
    cats = sorted({c for g in groups.values() for c in g})
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(groups)
    bottom = [0.0] * len(names)
    for c in cats:
        vals = [groups[n].get(c, 0.0) for n in names]
        ax.bar(names, vals, bottom=bottom, label=c)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("wire MiB per step (rank 0)")
    ax.legend(fontsize=7)
    return _save(plt, fig, png, ax, bench, rows[0])


def plot_scaling(csv_path, png) -> bool:
    """Efficiency vs GPUs: projections (per ZeRO stage, IB variant, overlap) and measured points."""
    rows = read_csv(Path(csv_path))
    proj = [r for r in rows if r.get("kind") == "projection"]
    meas = [r for r in rows if r.get("kind") == "measured"]
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"0": "tab:blue", "1": "tab:orange", "2": "tab:green", "3": "tab:red"}
    for (stage, ib, overlap) in sorted({(r["zero_stage"], r["ib"], r["overlap"]) for r in proj}):
        sel = sorted((r for r in proj if (r["zero_stage"], r["ib"], r["overlap"]) == (stage, ib, overlap)),
                     key=lambda r: int(r["gpus"]))
        x = [int(r["gpus"]) for r in sel]
        style = "-" if overlap == "none" else "--"
        marker = "o" if ib == "hdr4" else "s"
        for ax, key in zip(axes, ("efficiency", "comm_share")):
            ax.plot(x, [float(r[key]) for r in sel], style, marker=marker, ms=3, color=colors.get(stage, "k"),
                    label=f"ZeRO-{stage} {ib} {overlap}")
    for stage in sorted({r["zero_stage"] for r in meas}):
        sel = sorted((r for r in meas if r["zero_stage"] == stage), key=lambda r: int(r["gpus"]))
        axes[0].plot([int(r["gpus"]) for r in sel], [float(r["efficiency"]) for r in sel], "k*", ms=9,
                     label=f"measured here ZeRO-{stage} ({sel[0]['device']})")
    for ax, title in zip(axes, ("weak-scaling efficiency", "exposed communication share")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("GPUs (8 per node)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, ncol=2, loc="center right")
    if rows:
        fig.suptitle(f"scaling — {rows[0]['device']} ({rows[0]['date']}, {rows[0]['commit']}); "
                     "solid: no overlap, dashed: overlap; o 4×HDR, s 8×HDR", fontsize=9)
    return _save(plt, fig, png)


def make_plot(bench: str, rows: list[dict], csv_path: Path) -> Path | None:
    png = csv_path.with_suffix(".png")
    kind = SPECS.get(bench, (None, None, None, "ratio"))[3]
    try:
        ok = {"ratio": plot_ratio, "phases": plot_phases, "comm": plot_comm}.get(kind, lambda *a: False)(rows, bench, png) \
            if kind != "scaling" else plot_scaling(csv_path, png)
    except Exception as e:            # a plot must not stop the README
        print(f"note: no plot for {csv_path.name} ({type(e).__name__}: {e})")
        return None
    return png if ok else None


# ----------------------------------------------------------------------------- README
def build_readme(root: Path, plots: bool = True) -> str:
    root = Path(root)
    parts = ["# Benchmark results", "",
             "Generated by `benchmarks/report.py` from the CSVs below (do not edit by hand). One table per "
             "benchmark and device: its newest CSV. Ratios (speedup, memory ratio, efficiency) are measured within "
             "one process run; absolute times only mean something on the device that produced them.", ""]
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        latest = latest_per_device(folder)
        if not latest:
            continue
        parts += [f"## {folder.name}", ""]
        for device, path in latest.items():
            rows = read_csv(path)
            if not rows:
                continue
            r0 = rows[0]
            parts += [f"**{r0.get('device', device)}** — date {r0.get('date', '?')}, commit {r0.get('commit', '?')}, "
                      f"torch {r0.get('torch', '?')}, triton {r0.get('triton', '?')}, CUDA {r0.get('cuda', '?')} "
                      f"(`{path.relative_to(root)}`)", ""]
            sel, cols = table_for(folder.name, rows)
            if sel:
                parts += [markdown_table(sel, cols), ""]
            if folder.name == "scaling":
                pivot = scaling_pivot(rows)
                if pivot:
                    parts += [pivot, ""]
                md = path.with_suffix(".md")
                if md.exists():
                    parts += [f"Full report: `{md.relative_to(root)}`", ""]
            if plots:
                png = make_plot(folder.name, rows, path)
                if png is not None:
                    parts += [f"![{folder.name} {device}]({png.relative_to(root).as_posix()})", ""]
    return "\n".join(parts).rstrip() + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results-dir", default=str(REPO / "bench_results"))
    ap.add_argument("--readme", default=None, help="default: <results-dir>/README.md")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    root = Path(args.results_dir)
    text = build_readme(root, plots=not args.no_plots)
    out = Path(args.readme) if args.readme else root / "README.md"
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
