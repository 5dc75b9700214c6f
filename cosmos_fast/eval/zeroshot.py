"""Zero-shot classification (cosmos_method.md §6.3, §6.4).

Classifier: for each class c, the prompts t(c) for every template t are encoded with the text tower,
each embedding is L2-normalised, the T embeddings are averaged and the mean normalised again:
W ∈ ℝ^{D×C}. Logits = 100 · norm(f(x)) · W, a fixed 100 (not the learned τ). Metrics: top-1 and
top-5 accuracy over all images. ImageNet uses open_clip's ``IMAGENET_CLASSNAMES`` and its 80
``OPENAI_IMAGENET_TEMPLATES`` (callables ``name → prompt``); format strings ``"… {} …"`` work too.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..data.captions import Tokenizer
from .sharding import Shards, autocast, unwrap

LOGIT_SCALE = 100.0


def render_template(template, classname: str) -> str:
    return template(classname) if callable(template) else template.format(classname)


def class_prompts(classnames: Sequence[str], templates: Sequence) -> list[list[str]]:
    """prompts[c][t] = template t applied to class name c."""
    if not templates:
        raise ValueError("zero-shot classification needs at least one prompt template")
    return [[render_template(t, c) for t in templates] for c in classnames]


def average_prompt_embeddings(prompt_features: torch.Tensor) -> torch.Tensor:
    """(C, T, D) prompt embeddings → (D, C) classifier: normalise, mean over T, normalise."""
    w = F.normalize(prompt_features.float(), dim=-1).mean(dim=1)
    return F.normalize(w, dim=-1).T.contiguous()


@torch.no_grad()
def build_classifiers(models: Mapping[str, nn.Module], classnames: Sequence[str], templates: Sequence,
                      tokenizer, *, device, batch_size: int = 256, shards: Shards | None = None,
                      autocast_dtype=None, progress: bool = False, desc: str = "classifier") -> dict:
    """One (D, C) classifier per model. Classes are split across ranks (``shards``); each forward
    holds ``max(1, batch_size // T)`` classes' prompts."""
    shards = shards or Shards(False)
    prompts = class_prompts(classnames, templates)
    n_t = len(templates)
    mine = shards.indices(len(prompts))
    step = max(1, batch_size // n_t)
    parts = {name: [] for name in models}
    for s in tqdm(range(0, len(mine), step), desc=desc, disable=not progress or shards.rank != 0,
                  dynamic_ncols=True):
        chunk = mine[s:s + step]
        tokens = tokenizer([p for c in chunk for p in prompts[c]]).to(device)
        for name, model in models.items():
            with autocast(device, autocast_dtype):
                g = unwrap(model).encode_text(tokens, normalize=False)
            parts[name].append(average_prompt_embeddings(g.float().view(len(chunk), n_t, -1)).T)
    out = {}
    for name, model in models.items():
        dim = unwrap(model).embed_dim
        local = torch.cat(parts[name]) if parts[name] else torch.empty(0, dim, device=device)
        out[name] = shards.gather(local, len(prompts)).T.contiguous()          # D × C
    return out


def build_zero_shot_classifier(model: nn.Module, classnames: Sequence[str], templates: Sequence, tokenizer=None,
                               *, device=None, batch_size: int = 256, autocast_dtype=None) -> torch.Tensor:
    """Single-process (D, C) classifier for ``model``."""
    m = unwrap(model)
    device = device or next(m.parameters()).device
    tokenizer = tokenizer or Tokenizer("ViT-B-16", m.context_length)
    return build_classifiers({"model": m}, classnames, templates, tokenizer, device=device,
                             batch_size=batch_size, autocast_dtype=autocast_dtype)["model"]


@torch.no_grad()
def classification_metrics(image_features: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor,
                           ks=(1, 5), logit_scale: float = LOGIT_SCALE, chunk: int = 4096) -> dict:
    """top-k accuracy of ``logit_scale · image_features @ classifier`` ((N, D) @ (D, C)) vs ``labels``."""
    feats = image_features.float()
    w = classifier.float().to(feats.device)
    labels = labels.to(feats.device).long()
    n, n_cls = feats.shape[0], w.shape[1]
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    correct = {k: 0 for k in ks}
    for s in range(0, n, chunk):
        logits = logit_scale * feats[s:s + chunk] @ w
        top = logits.topk(min(max(ks), n_cls), dim=1).indices
        hit = top == labels[s:s + chunk, None]
        for k in ks:
            correct[k] += int(hit[:, :k].any(dim=1).sum())
    out = {f"top{k}": correct[k] / max(n, 1) for k in ks}
    out["n_images"], out["n_classes"] = n, n_cls
    return out
