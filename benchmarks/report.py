"""Regenerate bench_results/README.md (and the PNG plots) from the benchmark CSVs.

Each benchmark folder ``<results>/<bench>/`` gets one table per device: the headline CSV that
``<results>/manifest.json`` names for it (a benchmark run with ``--record`` writes that entry), so a
smoke run never replaces a recorded table. Only a benchmark absent from the manifest falls back to
its newest CSV per device (date in the name, then modification time), and the README says so.
Tables show device, date, commit and versions, the columns that matter for that benchmark, and
its ratios against the reference. The CSVs are in ``benchmarks/harness.py``'s long format (one row
per case and quantity, one unit per quantity); :func:`read_csv` turns them back into one row per
case, with the few quantities that a table shows in another unit converted (:data:`SHOWN_AS`). Every CSV gets a plot beside it (same name, ``.png``), drawn
with matplotlib's default style and no version metadata, so the same CSVs give the same bytes.
Nothing is measured here.

    .venv/bin/python benchmarks/report.py                       # bench_results/ → bench_results/README.md
    .venv/bin/python benchmarks/report.py --results-dir OUT --readme OUT/README.md --no-plots
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MANIFEST = "manifest.json"
ENV = ("device", "torch", "triton", "cuda", "commit", "date")
LONG_COLUMNS = ("quantity", "value")        # benchmarks/harness.py's long format
# bench -> {stored quantity: (column the table shows, factor)}: the unit these tables have always used
SHOWN_AS = {
    "contrastive": {"median_ms": ("median_s", 1e-3), "p20_ms": ("p20_s", 1e-3), "p80_ms": ("p80_s", 1e-3)},
    "cross_pool": {"peak_bytes": ("peak_mib", 2 ** -20)},
    "train": {"peak_bytes": ("peak_mib", 2 ** -20)},
    "data": {"startup_ms": ("startup_s", 1e-3)},
    "scaling": {"wire_bytes": ("wire_mb", 1e-6)},
    "rank": {"peak_bytes": ("peak_mib", 2 ** -20), "comm_total_bytes": ("comm_total_mb", 1e-6)},
}
PHASES = ("data_wait", "student_forward", "teacher_forward", "loss", "backward", "ema", "optimizer")

# bench -> (columns shown, ratio columns, row filter, plot kind; "table": no plot)
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
    "rank": (["model", "B", "world", "path", "precision", "pool_impl", "loss_impl", "compile", "median_ms",
              "samples_per_s"] + [f"t_{p}_ms" for p in ("towers_fwd", "pooling", "teacher_fwd", "loss", "backward",
                                                         "ema", "optimizer")]
             + ["first_step_ms", "peak_mib", "mfu_official", "util_executed", "comm_total_mb",
                "loss_rel_err_vs_official_fp32"], ["speedup_vs_official", "speedup_vs_generic"], None, "table"),
}
RATIO_HINTS = ("speedup_vs", "mem_ratio_vs", "memory_reduction_vs", "ratio_vs", "efficiency")
METRIC_HINTS = ("per_s", "_ms", "_s", "ratio", "speedup", "err", "mib", "tflops", "bytes")

# Ratio plots: which column names the provider, which provider is the 1× reference (left out of
# speed-up panels: its bars would all be 1), how a group of bars is labelled, and one panel per
# (ratio column, y label, whether the reference provider is drawn too).
RATIO_PLOTS = {
    "contrastive": dict(provider="provider", reference="reference", group=(("B", "B={}"), ("mode", "{}")),
                        xlabel="batch size B, pass",
                        what="COSMOS loss (80 InfoNCE pairs) against the plain-PyTorch reference, same run",
                        panels=(("speedup_vs_reference", "speed-up over reference (×)", False),
                                ("memory_reduction_vs_reference", "peak-memory reduction (×)", False))),
    "cross_pool": dict(provider="provider", reference="reference",
                       group=(("pooler", "{}"), ("L", "L={}"), ("B", "B={}"), ("mode", "{}")),
                       xlabel="pooler, context length L, batch size B, pass",
                       what="cross-attention pooler against the reference pooler, same run",
                       panels=(("speedup_vs_ref", "speed-up over reference (×)", False),
                               ("mem_ratio_vs_ref", "peak-memory reduction (×)", False))),
    "data": dict(provider="provider", reference="torchvision",
                 group=(("batch_size", "B={}"), ("image_size", "{} px"), ("crops_per_image", "{} crops"),
                        ("threads", "{} threads")),
                 xlabel="loader setting",
                 what="multi-crop loader images/s against the torchvision loader, same run",
                 panels=(("ratio_vs_torchvision", "images/s relative to torchvision (×)", False),)),
    "train_data": dict(provider="backend", reference="torchvision",
                       group=lambda r: (f"{r.get('model', '')}\n{r.get('global_size', '?')}/"
                                        f"{r.get('local_size', '?')} px crops\n{r.get('workers', '?')} workers"),
                       xlabel="model, global/local crop size, loader workers",
                       what="whole training loader on small synthetic images (not the data benchmark's 500×375 "
                            "JPEGs)\nsamples/s against torchvision and against the fast training step, same run",
                       panels=(("speedup_vs_torchvision", "samples/s relative to torchvision (×)", False),
                               ("loader_over_train", "loader ÷ training-step samples/s\n(>1: loader keeps up)",
                                True))),
}

# fixed colours, so a provider (or phase, or communication category) looks the same in every plot
PROVIDER_COLORS = {
    "reference": "#7f7f7f", "torchvision": "#7f7f7f", "blockwise": "#1f77b4", "fused": "#ff7f0e",
    "compile": "#bcbd22", "absorbed": "#2ca02c", "shared": "#9467bd", "torchvision-fused": "#17becf",
    "dali": "#d62728", "dali-float-hue": "#e377c2", "dali-linear-hue": "#8c564b", "fast": "#ff7f0e",
}
SPARE_COLORS = ("#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354")
PHASE_COLORS = dict(zip(PHASES, ("#c7c7c7", "#1f77b4", "#aec7e8", "#ff7f0e", "#d62728", "#2ca02c", "#9467bd")))
STAGE_COLORS = {"0": "#1f77b4", "1": "#ff7f0e", "2": "#2ca02c", "3": "#d62728"}


def color_for(name: str, known: dict = PROVIDER_COLORS) -> str:
    """The fixed colour of a provider; unknown names get a spare colour chosen from the name itself."""
    if name in known:
        return known[name]
    return SPARE_COLORS[sum(name.encode()) % len(SPARE_COLORS)]


# ----------------------------------------------------------------------------- reading
def read_csv(path: Path) -> list[dict]:
    """One dict per case (the environment and case columns, then every quantity in order) from a
    long-format results CSV, with :data:`SHOWN_AS`'s quantities of its benchmark (the folder name)
    in the unit the table shows."""
    path = Path(path)
    with open(path, newline="") as fh:
        long = list(csv.DictReader(fh))
    shown = SHOWN_AS.get(path.parent.name, {})
    rows, quantities = [], []
    for r in long:
        head = {k: v for k, v in r.items() if k not in LONG_COLUMNS}
        name, value = r["quantity"], r["value"]
        if name in shown:
            name, factor = shown[name]
            value = "" if value == "" else repr(float(value) * factor)
        if not rows or rows[-1][0] != head or name in rows[-1][1]:
            rows.append((head, {}))
        rows[-1][1][name] = value
        if name not in quantities:
            quantities.append(name)
    return [{**head, **{q: values.get(q, "") for q in quantities}} for head, values in rows]


def _device_of(p: Path) -> str:
    m = re.match(r"(.+)_(\d{4}-\d{2}-\d{2})_([0-9a-zA-Z+]+)", p.stem)
    return m.group(1) if m else p.stem


def latest_per_device(folder: Path) -> dict[str, Path]:
    """{device: newest CSV} in one benchmark folder (date from the name, then mtime)."""
    best: dict[str, tuple] = {}
    for p in folder.glob("*.csv"):
        m = re.match(r"(.+)_(\d{4}-\d{2}-\d{2})_([0-9a-zA-Z+]+)", p.stem)
        device, date = (m.group(1), m.group(2)) if m else (p.stem, "")
        key = (date, p.stat().st_mtime)
        if device not in best or key > best[device][0]:
            best[device] = (key, p)
    return {d: v[1] for d, v in sorted(best.items())}


def read_manifest(root: Path) -> dict[str, dict[str, str]]:
    """``{bench: {device: CSV path relative to root}}`` from ``root/manifest.json`` ({} if absent)."""
    path = Path(root) / MANIFEST
    if not path.exists():
        return {}
    return json.loads(path.read_text()).get("headline", {})


def headline_per_device(root: Path, bench: str, manifest: dict) -> tuple[dict[str, Path], bool]:
    """({device: headline CSV}, whether it came from the manifest). A manifest entry whose file is
    missing is an error: the README must not silently show another run."""
    if bench not in manifest:
        return latest_per_device(Path(root) / bench), False
    out = {}
    for device, rel in sorted(manifest[bench].items()):
        path = Path(root) / rel
        if not path.exists():
            raise SystemExit(f"{Path(root) / MANIFEST}: headline {rel!r} for {bench}/{device} does not exist "
                             "(restore it, or rerun the benchmark with --record)")
        out[device] = path
    return out, True


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


def _title(bench: str, what: str, row: dict) -> str:
    return f"{bench}: {what}\n{row.get('device', '?')} ({row.get('date', '?')}, commit {row.get('commit', '?')})"


def _save(plt, fig, png: Path) -> bool:
    """Write the PNG with nothing that varies between runs (no software/version text) and close."""
    fig.savefig(png, dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return True


def _legend_outside(ax, **kw):
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False, **kw)


def _num(v: str) -> str:
    return _fmt(v) if v not in ("", None) else ""


def _group_label(r: dict, group) -> str:
    """``"B=2048 fwd"``-style label from the group columns (two per line), or ``group(r)``."""
    if callable(group):
        return group(r)
    words = [fmt.format(_num(r[c])) for c, fmt in group if r.get(c, "") != ""]
    return "\n".join(" ".join(words[i:i + 2]) for i in range(0, len(words), 2))


def _ratio_axis(ax, vals: list[float]):
    """Log scale when the ratios span more than 6×, ticks written as ``2×``."""
    from matplotlib import ticker

    if vals and max(vals) / max(min(vals), 1e-9) > 6:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}×"))


def _generic_ratio_spec(rows: list[dict]) -> dict | None:
    """A ratio-plot spec guessed from the columns of a benchmark this script does not know."""
    ratio = next((c for c in rows[0] if c.startswith(RATIO_HINTS) and any(r.get(c) for r in rows)), None)
    if ratio is None:
        return None
    provider = next((c for c in ("provider", "backend", "path", "impl") if c in rows[0]), None)
    desc = [c for c in rows[0] if c not in ENV and c != provider and c != ratio
            and not any(h in c for h in METRIC_HINTS) and len({r.get(c) for r in rows}) > 1][:3]
    return dict(provider=provider, reference=None, group=tuple((c, f"{c}={{}}") for c in desc), xlabel="case",
                what=f"{ratio}, same run", panels=((ratio, f"{ratio} (×)", True),))


def plot_ratio(rows: list[dict], bench: str, png: Path) -> bool:
    """Grouped bars of each ratio against the reference: one group per case, one bar per provider in
    its fixed colour, bars drawn from the dashed 1× line (so slower reads as a bar going down)."""
    spec = RATIO_PLOTS.get(bench) or _generic_ratio_spec(rows)
    if spec is None:
        return False
    prov_col, ref = spec["provider"], spec["reference"]
    panels = [p for p in spec["panels"] if any(r.get(p[0], "") != "" for r in rows)]
    if not panels:
        return False
    cases = []                        # groups with at least one bar, in CSV order
    for r in rows:
        if not any(r.get(c, "") != "" and (w or r.get(prov_col) != ref) for c, _, w in panels):
            continue
        g = _group_label(r, spec["group"])
        if g not in cases:
            cases.append(g)
    plt = _plt()
    n_bars = max(1, len({r.get(prov_col, "") for r in rows}))
    width = min(16, max(6.5, 0.32 * n_bars * len(cases) + 3, 1.2 * len(cases) + 2.5))
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, 2.9 * len(panels) + 0.6), sharex=True, squeeze=False)
    for ax, (col, ylabel, with_ref) in zip(axes[:, 0], panels):
        sel = [r for r in rows if r.get(col, "") != "" and (with_ref or r.get(prov_col) != ref)]
        providers = list(dict.fromkeys(r.get(prov_col, "") for r in sel))
        width = 0.8 / max(1, len(providers))
        _ratio_axis(ax, [float(r[col]) for r in sel])
        for k, prov in enumerate(providers):
            pts = [(cases.index(_group_label(r, spec["group"])), float(r[col])) for r in sel
                   if r.get(prov_col, "") == prov]
            xs = [i - 0.4 + width * (k + 0.5) for i, _ in pts]
            ax.bar(xs, [v - 1.0 for _, v in pts], width=width * 0.92, bottom=1.0, color=color_for(prov),
                   label=prov or col)
            for x, (_, v) in zip(xs, pts):
                ax.annotate(f"{v:.3g}×", (x, v), xytext=(0, 2 if v >= 1 else -2), textcoords="offset points",
                            ha="center", va="bottom" if v >= 1 else "top", fontsize=6)
        ax.axhline(1.0, color="k", ls="--", lw=0.8, label=f"{ref} = 1×" if ref and not with_ref else "1×")
        ax.margins(y=0.15)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(axis="y", alpha=0.3)
        _legend_outside(ax)
    axes[-1, 0].set_xticks(range(len(cases)))
    axes[-1, 0].set_xticklabels(cases, fontsize=7)
    axes[-1, 0].set_xlabel(spec["xlabel"], fontsize=8)
    fig.suptitle(_title(bench, spec["what"], rows[0]), fontsize=9)
    fig.tight_layout()
    return _save(plt, fig, png)


def _phase_case(bench: str, r: dict) -> str:
    if bench == "train":
        path = r.get("path", "")
        impl = f" ({r['pool_impl']}, {r['loss_impl']})" if path != "reference" and r.get("pool_impl") else ""
        speed = f"\n{float(r['speedup_vs_ref']):.3g}× vs reference" if r.get("speedup_vs_ref") else ""
        return f"{r.get('model', '')} B={r.get('B', '')}\n{path}{impl}{speed}"
    if bench == "profile_phases":
        return f"ZeRO-{r.get('zero_stage', '?')} W={r.get('world', '?')}\nB={r.get('B', '?')} rank {r.get('rank', '?')}"
    return " ".join(str(v) for k, v in r.items() if k not in ENV and not k.startswith("t_"))[:30]


def plot_phases(rows: list[dict], bench: str, png: Path) -> bool:
    """Stacked share of each phase in the step (linear, so cases of very different size compare),
    with the summed phase time written above each bar."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.5, 1.5 * len(rows) + 3), 4.2))
    totals = [sum(float(r.get(f"t_{ph}_ms") or 0) for ph in PHASES) or 1.0 for r in rows]
    bottom = [0.0] * len(rows)
    for ph in PHASES:
        vals = [100 * float(r.get(f"t_{ph}_ms") or 0) / t for r, t in zip(rows, totals)]
        ax.bar(range(len(rows)), vals, bottom=bottom, label=ph.replace("_", " "), color=PHASE_COLORS[ph], width=0.6)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, t in enumerate(totals):
        ax.text(i, 101.5, f"{t:.4g} ms", ha="center", fontsize=7)
    ax.set_ylim(0, 110)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([_phase_case(bench, r) for r in rows], fontsize=7)
    ax.set_xlabel("model, per-device batch B, path" if bench == "train" else "ZeRO stage, world size W, batch, rank",
                  fontsize=8)
    ax.set_ylabel("% of step (phase means)", fontsize=8)
    ax.tick_params(labelsize=7)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], labels[::-1], loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    what = ("where the training step's time goes (phase means; summed time above each bar)" if bench == "train"
            else "where each rank's step time goes (phase means; summed time above each bar)")
    ax.set_title(_title(bench, what, rows[0]), fontsize=9)
    fig.tight_layout()
    return _save(plt, fig, png)


def plot_comm(rows: list[dict], bench: str, png: Path) -> bool:
    """Stacked bytes on the wire per step and collective category (rank 0), one bar per ZeRO setting."""
    groups = defaultdict(lambda: defaultdict(float))
    for r in rows:
        if r.get("rank") == "0":
            groups[f"ZeRO-{r['zero_stage']}\nW={r['world']}"][r["category"]] += float(r["wire_bytes"]) / 2 ** 20
    if not groups:
        return False
    cats = sorted({c for g in groups.values() for c in g})
    palette = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
               "#17becf")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    names = list(groups)
    bottom = [0.0] * len(names)
    for i, c in enumerate(cats):
        vals = [groups[n].get(c, 0.0) for n in names]
        ax.bar(names, vals, bottom=bottom, label=c.replace("_", " "), color=palette[i % len(palette)], width=0.5)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, t in enumerate(bottom):
        ax.text(i, t, f"{t:.3g} MiB", ha="center", va="bottom", fontsize=7)
    ax.margins(y=0.1)
    ax.set_xlabel("DeepSpeed ZeRO stage, world size W", fontsize=8)
    ax.set_ylabel("MiB on the wire per step (rank 0)", fontsize=8)
    ax.tick_params(labelsize=7)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], labels[::-1], loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    ax.set_title(_title(bench, "communication per training step by category", rows[0]), fontsize=9)
    fig.tight_layout()
    return _save(plt, fig, png)


def plot_scaling(csv_path, png) -> bool:
    """Efficiency and exposed-communication share vs GPUs: colour = ZeRO stage, line style =
    overlap, marker = InfiniBand variant (one legend entry per meaning), stars = measured here."""
    from matplotlib.lines import Line2D

    rows = read_csv(Path(csv_path))
    proj = [r for r in rows if r.get("kind") == "projection"]
    meas = [r for r in rows if r.get("kind") == "measured"]
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (stage, ib, overlap) in sorted({(r["zero_stage"], r["ib"], r["overlap"]) for r in proj}):
        sel = sorted((r for r in proj if (r["zero_stage"], r["ib"], r["overlap"]) == (stage, ib, overlap)),
                     key=lambda r: int(r["gpus"]))
        x = [int(r["gpus"]) for r in sel]
        for ax, key, scale in zip(axes, ("efficiency", "comm_share"), (1, 100)):
            ax.plot(x, [scale * float(r[key]) for r in sel], "-" if overlap == "none" else "--",
                    marker="o" if ib == "hdr4" else "s", ms=3, lw=1, color=STAGE_COLORS.get(stage, "k"))
    for stage in sorted({r["zero_stage"] for r in meas}):
        sel = sorted((r for r in meas if r["zero_stage"] == stage), key=lambda r: int(r["gpus"]))
        axes[0].plot([int(r["gpus"]) for r in sel], [float(r["efficiency"]) for r in sel], "*", ms=10,
                     color=STAGE_COLORS.get(stage, "k"), markeredgecolor="k")
    gpus = sorted({int(r["gpus"]) for r in rows})
    for ax, ylabel in zip(axes, ("weak-scaling efficiency (1 = linear)", "exposed communication (% of step)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(gpus, [str(g) for g in gpus])
        ax.minorticks_off()
        ax.set_xlabel("GPUs (8 per node)", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    stages = sorted({r["zero_stage"] for r in proj} | {r["zero_stage"] for r in meas})
    handles = [Line2D([], [], color=STAGE_COLORS.get(s, "k"), lw=3, label=f"ZeRO-{s}") for s in stages]
    handles += [Line2D([], [], color="k", ls="-", label="no overlap"), Line2D([], [], color="k", ls="--", label="overlap"),
                Line2D([], [], color="k", ls="", marker="o", ms=4, label="projection, 4×HDR IB"),
                Line2D([], [], color="k", ls="", marker="s", ms=4, label="projection, 8×HDR IB")]
    if meas:
        handles.append(Line2D([], [], color="w", ls="", marker="*", ms=10, markeredgecolor="k",
                              label=f"measured here ({meas[0]['device']})"))
    axes[1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False)
    if rows:
        fig.suptitle(_title("scaling", "projected multi-node weak scaling of a training step (curves of equal "
                            "value overlap; later stages drawn on top), and the points measured here", rows[0]),
                     fontsize=9)
    fig.tight_layout()
    return _save(plt, fig, png)


def make_plot(bench: str, rows: list[dict], csv_path: Path) -> Path | None:
    """Draw the plot of one CSV beside it (matplotlib's default style, whatever the user's rc)."""
    png = csv_path.with_suffix(".png")
    kind = SPECS.get(bench, (None, None, None, "ratio"))[3]
    plt = _plt()
    try:
        with plt.style.context("default"):
            ok = {"ratio": plot_ratio, "phases": plot_phases, "comm": plot_comm}.get(kind, lambda *a: False)(
                rows, bench, png) if kind != "scaling" else plot_scaling(csv_path, png)
    except Exception as e:            # a plot must not stop the README
        plt.close("all")
        print(f"note: no plot for {csv_path.name} ({type(e).__name__}: {e})")
        return None
    return png if ok else None


# ----------------------------------------------------------------------------- README
def build_readme(root: Path, plots: bool = True) -> str:
    """The README text; with ``plots``, also (re)draws the PNG of every CSV under ``root``."""
    root = Path(root)
    manifest = read_manifest(root)
    parts = ["# Benchmark results", "",
             "Generated by `benchmarks/report.py` from the CSVs below (do not edit by hand). One table per "
             f"benchmark and device: the headline run that `{MANIFEST}` names (a benchmark run with `--record` "
             "writes it). Ratios (speedup, memory ratio, efficiency) are measured within "
             "one process run; absolute times only mean something on the device that produced them.", ""]
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if not any(folder.glob("*.csv")):
            continue
        chosen, recorded = headline_per_device(root, folder.name, manifest)
        parts += [f"## {folder.name}", ""]
        if not recorded:
            print(f"note: {folder.name} has no headline in {MANIFEST}; showing its newest CSV per device")
            parts += [f"*No headline recorded in `{MANIFEST}`: the newest CSV per device is shown.*", ""]
        for device, path in chosen.items():
            rows = read_csv(path)
            if not rows:
                continue
            r0 = rows[0]
            parts += [f"**{r0.get('device', device)}** — date {r0.get('date', '?')}, commit {r0.get('commit', '?')}, "
                      f"torch {r0.get('torch', '?')}, triton {r0.get('triton', '?')}, CUDA {r0.get('cuda', '?')} "
                      f"(`{path.relative_to(root).as_posix()}`)", ""]
            sel, cols = table_for(folder.name, rows)
            if sel:
                parts += [markdown_table(sel, cols), ""]
            if folder.name == "scaling":
                pivot = scaling_pivot(rows)
                if pivot:
                    parts += [pivot, ""]
                md = path.with_suffix(".md")
                if md.exists():
                    parts += [f"Full report: `{md.relative_to(root).as_posix()}`", ""]
            if plots:
                png = make_plot(folder.name, rows, path)
                if png is not None:
                    parts += [f"![{folder.name} {device}]({png.relative_to(root).as_posix()})", ""]
        if plots:                      # the other runs' plots, so every PNG comes from this script
            for other in sorted(set(folder.glob("*.csv")) - set(chosen.values())):
                rows = read_csv(other)
                if rows:
                    make_plot(folder.name, rows, other)
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
