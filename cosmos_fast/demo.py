"""``cosmos-fast demo``: the embedded default, a few CPU minutes of real COSMOS training.

Makes the synthetic scene shards if absent, trains the ``tiny`` model with the ``tiny-cpu`` preset,
evaluates image↔text retrieval on the held-out split for student and teacher before and after,
prints the table, and writes ``metrics.json`` and ``demo.png`` (losses and R@1) to the output folder.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from .config import load_config
from .data.synthetic import write_demo_data
from .trainer import Trainer

log = logging.getLogger("cosmos_fast.demo")

N_TRAIN, N_VAL, PER_SHARD = 2048, 128, 256


def ensure_demo_data(data_dir: Path, seed: int = 0) -> dict:
    done = data_dir / "DONE"
    if done.is_file():
        info = json.loads(done.read_text())
        if info.get("seed") == seed and info.get("n_train") == N_TRAIN and info.get("n_val") == N_VAL:
            return {"train": info["train"], "val": info["val"]}
    log.info("writing the synthetic demo data set to %s", data_dir)
    return write_demo_data(data_dir, n_train=N_TRAIN, n_val=N_VAL, samples_per_shard=PER_SHARD, seed=seed)


def plot(out: Path, metrics_rows: list, results: dict) -> Path:
    """Losses per step, and held-out R@1 / R@5 before and after training for both models, each bar
    labelled with its value (a zero bar shows its 0.000), chance levels drawn, legends outside."""
    import matplotlib                     # optional, heavy: only the demo's plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1.6]})
    steps = [r["step"] for r in metrics_rows]
    for key in ("loss", "clip_loss", "distill_loss"):
        ax1.plot(steps, [r[key] for r in metrics_rows], label=key)
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("loss")
    ax1.set_title("training losses")
    ax1.legend(loc="upper right", frameon=False)
    metrics = ("i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5")
    labels = [f"{model}\n{k.replace('_r', ' R@')}" for model in ("student", "teacher") for k in metrics]
    before = [results["before"][model][k] for model in ("student", "teacher") for k in metrics]
    after = [results["after"][model][k] for model in ("student", "teacher") for k in metrics]
    x = range(len(labels))
    for offset, values, name, colour in ((-0.2, before, "before training", "#9e9e9e"),
                                         (0.2, after, "after training", "#1f77b4")):
        bars = ax2.bar([i + offset for i in x], values, width=0.4, label=name, color=colour)
        ax2.bar_label(bars, labels=[f"{v:.3f}" for v in values], fontsize=7, padding=1)
    chance = results["chance_r1"]
    ax2.axhline(chance, color="k", linestyle=":", linewidth=1, label=f"chance R@1 ({chance:.3f})")
    ax2.axhline(5 * chance, color="k", linestyle="--", linewidth=1, label=f"chance R@5 ({5 * chance:.3f})")
    ax2.set_xticks(list(x), labels, fontsize=8)
    ax2.set_ylabel("recall on the held-out split")
    ax2.set_ylim(0, max(max(after), max(before), 5 * chance) * 1.18)
    ax2.set_title(f"held-out image↔text retrieval ({results['before']['student']['n_images']} images)")
    ax2.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)
    fig.tight_layout()
    path = out / "demo.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_demo(output_dir="runs/demo", overrides=(), seed: int = 0) -> dict:
    out = Path(output_dir)
    load_config("tiny-cpu", list(overrides))          # a bad override fails before the data set is drawn
    patterns = ensure_demo_data(out / "data", seed)
    cfg = load_config("tiny-cpu", [f"data.train_shards={patterns['train']}", f"data.val_shards={patterns['val']}",
                                   f"train.seed={seed}", "train.auto_resume=false", *overrides])
    trainer = Trainer(cfg, out, overwrite=True)     # the demo always starts anew in its folder
    try:
        before = trainer.evaluate()
        trainer.train()
        after = trainer.evaluate()
    finally:
        trainer.close()
    n_images = before["student"]["n_images"]
    results = {"before": before, "after": after, "chance_r1": 1.0 / n_images,
               "steps": trainer.step, "train_samples_seen": trainer.step * cfg.data.batch_size}
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    results["plot"] = str(plot(out, rows, results))
    chance = results["chance_r1"]
    print(f"\nheld-out retrieval on {n_images} images (chance R@1 = {chance:.4f}; target >= 5× chance = {5 * chance:.4f})")
    print(f"{'':10s} {'i2t R@1':>16s} {'t2i R@1':>16s} {'i2t R@5':>16s} {'t2i R@5':>16s}")
    for model in ("student", "teacher"):
        b, a = before[model], after[model]
        print(f"{model:10s} " + " ".join(f"{b[k]:7.3f} -> {a[k]:5.3f}" for k in ("i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5")))
    ok = all(after[m][k] >= 5 * chance for m in ("student", "teacher") for k in ("i2t_r1", "t2i_r1"))
    results["above_5x_chance"] = ok
    print(f"{'PASS' if ok else 'BELOW TARGET'}: R@1 after training is {'at least' if ok else 'not'} 5× chance "
          f"for student and teacher in both directions; metrics.json and {results['plot']} written")
    return results
