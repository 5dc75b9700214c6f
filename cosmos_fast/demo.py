"""``cosmos-fast demo``: the embedded default, a few CPU minutes of real COSMOS training.

Makes the synthetic scene shards if absent, trains the ``tiny`` model with the ``tiny-cpu`` preset,
evaluates image↔text retrieval on the held-out split for student and teacher before and after, and
the teacher's zero-shot segmentation (CSA, cosmos_method.md §6.5) of the same held-out images against
their ground-truth label maps (``data/val_seg/``, classes = the shape colours) before and after,
prints both, and writes ``metrics.json``, ``demo.png`` (losses and R@1) and ``segmentation.png`` (a
few held-out images, their ground truth and the predicted masks before and after) to the output folder.

The demo's segmentation settings: the images are segmented at their own size (short side = the
image size, no resize) in windows of the model's input size every half window (as 224/112 for the
224-px models), with §6.5's default post-processing (logit scale 40, no probability or area
threshold): background is a class with its own queries (the captions' background words), so no
threshold is needed to predict it.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import load_config
from .data.synthetic import SEG_CLASSES, SEG_PALETTE, write_demo_data
from .eval.seg_datasets import voc_layout_set
from .eval.seg_types import IGNORE_INDEX, SegmentationSet, SegSettings
from .eval.segmentation import Segmentor, evaluate_segmentation
from .trainer import Trainer

log = logging.getLogger("cosmos_fast.demo")

N_TRAIN, N_VAL, PER_SHARD, IMAGE_SIZE = 2048, 128, 256, 128
N_SEG_SHOWN = 4                                   # held-out images in segmentation.png


def ensure_demo_data(data_dir: Path, seed: int = 0) -> dict:
    done = data_dir / "DONE"
    if done.is_file():
        info = json.loads(done.read_text())
        if (info.get("seed") == seed and info.get("n_train") == N_TRAIN and info.get("n_val") == N_VAL
                and info.get("val_seg") and Path(info["val_seg"]).is_dir()):
            return {"train": info["train"], "val": info["val"], "val_seg": info["val_seg"]}
    log.info("writing the synthetic demo data set to %s", data_dir)
    return write_demo_data(data_dir, n_train=N_TRAIN, n_val=N_VAL, samples_per_shard=PER_SHARD, seed=seed,
                           image_size=IMAGE_SIZE)


def demo_seg_set(seg_root, model_image_size: int) -> SegmentationSet:
    """The held-out split as a segmentation set: segmented at its own size in windows of the model's
    input size, half a window apart; §6.5's default post-processing (see the module docstring)."""
    settings = SegSettings(short_side=IMAGE_SIZE, max_long_side=IMAGE_SIZE, slide_crop=model_image_size,
                           slide_stride=model_image_size // 2)
    root = Path(seg_root)
    return voc_layout_set(root, "synthetic", root / "classes.txt", settings)


def segment_held_out(model: nn.Module, seg_set: SegmentationSet, device, n_shown: int = N_SEG_SHOWN):
    """The model's zero-shot segmentation (CSA) of ``seg_set``: (evaluate_segmentation's dict, the
    predicted label maps of the first ``n_shown`` images); the model's train/eval mode is restored."""
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            result = evaluate_segmentation(model, seg_set, csa=True, device=device)
            segmentor = Segmentor(model, seg_set.class_file, seg_set.settings, csa=True, device=device)
            shown = [segmentor.predict(seg_set.load(i)[0]).cpu().numpy() for i in range(min(n_shown, len(seg_set)))]
    finally:
        model.train(training)
    return result, shown


def colour_labels(labels: np.ndarray) -> np.ndarray:
    """H×W class indices → H×W×3 uint8 in the label maps' palette (ignore = VOC's cream)."""
    lut = np.full((256, 3), (224, 224, 192), dtype=np.uint8)
    lut[:len(SEG_PALETTE)] = SEG_PALETTE
    return lut[np.asarray(labels, dtype=np.int64).clip(0, 255)]


def plot_segmentation(out: Path, seg_set: SegmentationSet, before: list, after: list, seg: dict) -> Path:
    """A row per held-out image: the image, its ground truth, the teacher's prediction before and
    after training (mIoU of the whole set in the column titles); the class colours in a legend."""
    import matplotlib                     # optional, heavy: only the demo's plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    n = len(before)
    fig, axes = plt.subplots(n, 4, figsize=(8.4, 2.1 * n + 0.8), squeeze=False)
    titles = ("held-out image", "ground truth", f"before training\n(mIoU {seg['before']['mIoU']:.3f})",
              f"after training\n(mIoU {seg['after']['mIoU']:.3f})")
    for i in range(n):
        img, truth = seg_set.load(i)
        panels = (np.asarray(img), colour_labels(truth), colour_labels(before[i]), colour_labels(after[i]))
        for j, panel in enumerate(panels):
            ax = axes[i][j]
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[j], fontsize=9)
    handles = [Patch(facecolor=np.asarray(rgb) / 255, edgecolor="k", linewidth=0.5, label=name)
               for name, rgb in zip(SEG_CLASSES, SEG_PALETTE)]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles) // 2 + 1, fontsize=8, frameon=False)
    fig.suptitle(f"teacher's zero-shot segmentation (CSA) of the held-out scenes ({seg['n_images']} images)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path = out / "segmentation.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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
    seg_set = demo_seg_set(patterns["val_seg"], cfg.data.global_size or trainer.student.cfg.vision_cfg.image_size)
    try:
        before = trainer.evaluate()
        seg_before, shown_before = segment_held_out(trainer.teacher, seg_set, trainer.device)
        trainer.train()
        after = trainer.evaluate()
        seg_after, shown_after = segment_held_out(trainer.teacher, seg_set, trainer.device)
    finally:
        trainer.close()
    n_images = before["student"]["n_images"]
    seg = {"model": "teacher", "csa": True, "n_images": len(seg_set), "classes": list(SEG_CLASSES),
           "ignore_index": IGNORE_INDEX, "settings": asdict(seg_set.settings), "before": seg_before, "after": seg_after}
    results = {"before": before, "after": after, "chance_r1": 1.0 / n_images,
               "steps": trainer.step, "train_samples_seen": trainer.step * cfg.data.batch_size, "segmentation": seg}
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    results["plot"] = str(plot(out, rows, results))
    results["segmentation_plot"] = str(plot_segmentation(out, seg_set, shown_before, shown_after, seg))
    chance = results["chance_r1"]
    print(f"\nheld-out retrieval on {n_images} images (chance R@1 = {chance:.4f}; target >= 5× chance = {5 * chance:.4f})")
    print(f"{'':10s} {'i2t R@1':>16s} {'t2i R@1':>16s} {'i2t R@5':>16s} {'t2i R@5':>16s}")
    for model in ("student", "teacher"):
        b, a = before[model], after[model]
        print(f"{model:10s} " + " ".join(f"{b[k]:7.3f} -> {a[k]:5.3f}" for k in ("i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5")))
    print(f"\nheld-out zero-shot segmentation, teacher with CSA ({len(seg_set)} images, {len(SEG_CLASSES)} classes: "
          f"background and the shape colours): mIoU {seg_before['mIoU']:.3f} -> {seg_after['mIoU']:.3f}")
    print("  per-class IoU after training: " + ", ".join(
        f"{name} {'-' if iou is None else f'{iou:.2f}'}" for name, iou in seg_after["per_class_iou"].items()))
    ok = all(after[m][k] >= 5 * chance for m in ("student", "teacher") for k in ("i2t_r1", "t2i_r1"))
    results["above_5x_chance"] = ok
    print(f"{'PASS' if ok else 'BELOW TARGET'}: R@1 after training is {'at least' if ok else 'not'} 5× chance "
          f"for student and teacher in both directions; metrics.json, {results['plot']} and "
          f"{results['segmentation_plot']} written")
    return results
