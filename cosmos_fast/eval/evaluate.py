"""Zero-shot evaluation of one or more models: retrieval (COCO, Flickr30k) and classification
(ImageNet, SUN397), standalone or inside training (cosmos_method.md §6.1-§6.4). The one evaluator:
``cosmos-fast eval`` and the trainer's held-out (``data.val_shards``) and zero-shot evaluations all
run :func:`evaluate_models`.

Features are the unimodal L2-normalised embeddings (no poolers). Each data set is read once and
every batch is fed to every model, so the features are computed once per model and shared by both
retrieval directions. When ``torch.distributed`` is initialised (or ``distributed=True``) the images,
captions and classes are split across ranks, encoded on all ranks and all-gathered, so every rank
returns the same metrics (see :mod:`cosmos_fast.eval.sharding`); call it on every rank.

Results: ``{model_name: {dataset: {metric: value, ..., n_images, n_texts | n_classes, split, ...}}}``
for :func:`evaluate_models`, ``{dataset: {...}}`` for :func:`evaluate_model`. Retrieval metrics:
``i2t_r{1,5,10}``, ``t2i_r{1,5,10}``, 1-based mean / median ranks; classification: ``top1``, ``top5``.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data.captions import Tokenizer
from ..engine import gathered
from ..data.torchvision_loader import worker_loader_kwargs
from ..data.transforms import eval_transform
from .datasets import (RETRIEVAL_SETS, ClassificationSet, ImageListDataset, RetrievalSet,
                       load_imagenet, load_present, load_retrieval_set, load_shard_retrieval_set, load_sun397)
from .retrieval import retrieval_metrics
from .sharding import Shards, autocast, unwrap
from .zeroshot import build_classifiers, classification_metrics

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _inference(models: Mapping[str, nn.Module]):
    """eval() mode, no autograd and (under ZeRO-3) the weights gathered; restored after."""
    modes = {name: m.training for name, m in models.items()}
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            for m in models.values():
                m.eval()
                stack.enter_context(gathered(m))
            yield
    finally:
        for name, m in models.items():
            m.train(modes[name])


def _encode_images(models, paths, transform, shards: Shards, *, batch_size, num_workers, device, amp,
                   progress, desc) -> dict:
    mine = shards.indices(len(paths))
    loader = DataLoader(ImageListDataset([paths[i] for i in mine], transform), batch_size=batch_size,
                        shuffle=False, num_workers=num_workers, pin_memory=device.type == "cuda",
                        **worker_loader_kwargs(num_workers))
    parts = {name: [] for name in models}
    for x in tqdm(loader, desc=desc, unit="batch", disable=not progress or shards.rank != 0, dynamic_ncols=True):
        x = x.to(device, non_blocking=True)
        for name, m in models.items():
            with autocast(device, amp):
                f = m.encode_image(x, normalize=False)
            parts[name].append(F.normalize(f.float(), dim=-1))
    return {name: shards.gather(torch.cat(p), len(paths)) for name, p in parts.items()}


def _encode_texts(models, captions, tokenizer, shards: Shards, *, batch_size, device, amp, progress,
                  desc) -> dict:
    mine = shards.indices(len(captions))
    parts = {name: [] for name in models}
    for s in tqdm(range(0, len(mine), batch_size), desc=desc, unit="batch",
                  disable=not progress or shards.rank != 0, dynamic_ncols=True):
        tokens = tokenizer([captions[i] for i in mine[s:s + batch_size]]).to(device)
        for name, m in models.items():
            with autocast(device, amp):
                g = m.encode_text(tokens, normalize=False)
            parts[name].append(F.normalize(g.float(), dim=-1))
    return {name: shards.gather(torch.cat(p), len(captions)) for name, p in parts.items()}


def load_eval_sets(*, retrieval_root=None, retrieval_sets: Sequence[str] | str | None = None, split: str = "official",
                   imagenet_val=None, imagenet_classnames=None, sun397_root=None, sun397_seed: int = 0,
                   val_shards: str | None = None) -> list:
    """Read (and check) every requested annotation file before anything is encoded.

    ``retrieval_sets=None`` means every set in :data:`RETRIEVAL_SETS` whose annotation file exists
    under ``retrieval_root``; the absent ones are logged as skipped (a root without any is an error).
    A set named explicitly must exist. ``val_shards`` adds the held-out webdataset shards."""
    sets = []
    if retrieval_root is not None:
        if isinstance(retrieval_sets, str):
            retrieval_sets = [s.strip() for s in retrieval_sets.split(",") if s.strip()]
        if retrieval_sets is None:
            sets += load_present(RETRIEVAL_SETS, lambda name: load_retrieval_set(name, retrieval_root, split),
                                 "retrieval", f"retrieval root {retrieval_root} holds none of the {split} retrieval sets: ")
        else:
            sets += [load_retrieval_set(name, retrieval_root, split) for name in retrieval_sets]
    if val_shards:
        sets.append(load_shard_retrieval_set(val_shards))
    if imagenet_val is not None:
        sets.append(load_imagenet(imagenet_val, imagenet_classnames))
    if sun397_root is not None:
        sets.append(load_sun397(sun397_root, seed=sun397_seed))
    if not sets:
        raise ValueError("nothing to evaluate: give a retrieval root, held-out shards, an ImageNet folder or a "
                         "SUN397 root")
    return sets


def evaluate_models(models: Mapping[str, nn.Module], *, retrieval_root=None,
                    retrieval_sets: Sequence[str] | None = None, split: str = "official", imagenet_val=None,
                    imagenet_classnames=None, sun397_root=None, sun397_seed: int = 0, batch_size: int = 256,
                    device=None, num_workers: int = 0, image_size: int | None = None,
                    distributed: bool | None = None, group=None, autocast_dtype: torch.dtype | None = None,
                    progress: bool = True, tokenizer=None, sets: Sequence | None = None) -> dict:
    """Evaluate every model of ``{name: model}`` on the requested sets; see the module docstring.

    ``device`` defaults to the first model's; ``image_size`` to its ``vision_cfg.image_size``
    (resize-shortest-side bicubic + center crop, §4.4). ``distributed=None`` shards across ranks
    exactly when ``torch.distributed`` is initialised. ``autocast_dtype`` (e.g. ``torch.bfloat16``)
    runs the towers under autocast; features and metrics are fp32. ``sets`` may pass data sets
    already read with :func:`load_eval_sets` (periodic evaluation reads them once).
    """
    if isinstance(models, nn.Module) or not isinstance(models, Mapping) or not models:
        raise TypeError("models must be a non-empty {name: model} mapping (use evaluate_model for one model)")
    models = {name: unwrap(m) for name, m in models.items()}
    first = next(iter(models.values()))
    for name, m in models.items():
        if m.context_length != first.context_length:
            raise ValueError(f"model {name!r} has context length {m.context_length}, "
                             f"not {first.context_length}: evaluate it separately")
    device = torch.device(device) if device is not None else next(first.parameters()).device
    image_size = image_size or first.cfg.vision_cfg.image_size
    if sets is None:
        sets = load_eval_sets(retrieval_root=retrieval_root, retrieval_sets=retrieval_sets, split=split,
                              imagenet_val=imagenet_val, imagenet_classnames=imagenet_classnames,
                              sun397_root=sun397_root, sun397_seed=sun397_seed)
    shards = Shards(distributed, group)
    tokenizer = tokenizer or Tokenizer("ViT-B-16", first.context_length)
    transform = eval_transform(image_size)
    common = dict(shards=shards, device=device, amp=autocast_dtype, progress=progress)
    results = {name: {} for name in models}
    with _inference(models):
        for ds in sets:
            images = _encode_images(models, ds.image_paths, transform, batch_size=batch_size,
                                    num_workers=num_workers, desc=f"{ds.name} images", **common)
            if isinstance(ds, RetrievalSet):
                texts = _encode_texts(models, ds.captions, tokenizer, batch_size=batch_size,
                                      desc=f"{ds.name} captions", **common)
                for name in models:
                    metrics = retrieval_metrics(images[name], texts[name], ds.text_to_image)
                    results[name][ds.name] = {**metrics, **ds.info()}
            elif isinstance(ds, ClassificationSet):
                classifiers = build_classifiers(models, ds.classnames, ds.templates, tokenizer,
                                                device=device, batch_size=batch_size, shards=shards,
                                                autocast_dtype=autocast_dtype, progress=progress,
                                                desc=f"{ds.name} classifier")
                for name in models:
                    metrics = classification_metrics(images[name], classifiers[name], ds.labels)
                    results[name][ds.name] = {**metrics, **ds.info()}
            else:
                raise TypeError(f"unknown evaluation set type {type(ds).__name__}")
    return results


def evaluate_model(model: nn.Module, **kwargs) -> dict:
    """:func:`evaluate_models` for one model: ``{dataset: {metric: value, ...}}``."""
    return evaluate_models({"model": model}, **kwargs)["model"]


def scalar_metrics(results: Mapping, prefix: str = "eval") -> dict:
    """``{model: {dataset: {metric: v}}}`` → ``{"eval/<model>/<dataset>/<metric>": v}``: the metrics
    only (no counts, no strings), e.g. for TensorBoard."""
    out = {}
    for model, per_set in results.items():
        for dataset, metrics in per_set.items():
            for k, v in metrics.items():
                if isinstance(v, float) and not k.startswith("n_"):
                    out[f"{prefix}/{model}/{dataset}/{k}"] = v
    return out


def log_to_tensorboard(writer, results: Mapping, step: int, prefix: str = "eval") -> None:
    """Write :func:`scalar_metrics` to a ``SummaryWriter`` (call on rank 0 only; it does no
    collective)."""
    for tag, value in scalar_metrics(results, prefix).items():
        writer.add_scalar(tag, value, step)


def format_results(results: Mapping) -> str:
    """A plain-text table: one row per (model, data set)."""
    lines = []
    for model, per_set in results.items():
        for dataset, m in per_set.items():
            if "i2t_r1" in m:
                body = (f"i2t R@1/5/10 {100 * m['i2t_r1']:.2f} {100 * m['i2t_r5']:.2f} {100 * m['i2t_r10']:.2f}  "
                        f"t2i R@1/5/10 {100 * m['t2i_r1']:.2f} {100 * m['t2i_r5']:.2f} {100 * m['t2i_r10']:.2f}  "
                        f"({m['n_images']} images, {m['n_texts']} captions)")
            elif "mIoU" in m:
                body = (f"mIoU {100 * m['mIoU']:.2f}  ({m['n_images']} images, {len(m['per_class_iou'])} classes, "
                        f"CSA {'on' if m['csa'] else 'off'})")
            else:
                body = (f"top-1 {100 * m['top1']:.2f}  top-5 {100 * m['top5']:.2f}  "
                        f"({m['n_images']} images, {m['n_classes']} classes)")
            lines.append(f"{model:>8} {dataset:<10} {body}")
    return "\n".join(lines)
