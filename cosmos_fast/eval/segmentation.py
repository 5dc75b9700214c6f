"""Zero-shot semantic segmentation, SCLIP protocol (cosmos_method.md §6.5).

* **Text**: each class line of a class file holds comma-separated synonyms; every synonym is a query
  (:func:`read_class_queries`). A query's embedding is the zero-shot classifier's
  (:mod:`cosmos_fast.eval.zeroshot`): the 80 OpenAI templates, each prompt encoded and L2-normalised,
  averaged, normalised again.
* **Image** (:class:`Segmentor`): keep-ratio resize to the benchmark's short side (long side capped),
  OpenAI mean / std; windows of ``slide_crop`` every ``slide_stride`` pixels as mmseg's
  ``slide_inference`` places them; per window the cosine of the dense features
  (:func:`cosmos_fast.eval.dense.dense_features`, CSA by default) to every query, on the patch grid,
  bilinearly upsampled to the window; overlaps averaged; bilinearly resized to the original image.
* **Post-processing**: × ``logit_scale``, softmax over queries, max over each class's synonyms,
  optional ``area_thd``, argmax, pixels whose best probability is below ``prob_thd`` → class 0.
* **Metric** (:class:`ConfusionMatrix`): one confusion matrix accumulated over all images, pixels
  labelled 255 skipped; per-class IoU = TP / (TP + FP + FN); a class absent from both ground truth
  and prediction has no IoU and is left out of the mean (mmseg ``IoUMetric``).

The model is the teacher, in fp32 without autocast. The decisions where §6.5 is silent are in
cosmos_fast/eval/README.md ("Segmentation").
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip import OPENAI_IMAGENET_TEMPLATES
from PIL import Image
from torch import nn
from tqdm import tqdm

from ..data.captions import Tokenizer
from ..data.normalize import OPENAI_MEAN, OPENAI_STD
from ..engine import gathered
from .dense import dense_features
from .seg_types import IGNORE_INDEX, SegmentationSet, SegSettings, class_names, read_class_queries
from .sharding import Shards, unwrap
from .zeroshot import build_classifiers

OPENAI_TEMPLATES = tuple(OPENAI_IMAGENET_TEMPLATES)


# ------------------------------------------------------------------------------------------ text
@torch.no_grad()
def query_embeddings(model: nn.Module, queries, templates=OPENAI_TEMPLATES, tokenizer=None, device="cpu",
                     batch_size: int = 256) -> torch.Tensor:
    """Q×D text embeddings of ``queries`` (template-averaged, unit norm), fp32."""
    m = unwrap(model)
    tokenizer = tokenizer or Tokenizer("ViT-B-16", m.context_length)
    with gathered(m):
        w = build_classifiers({"model": m}, list(queries), templates, tokenizer, device=torch.device(device),
                              batch_size=batch_size)["model"]
    return w.T.contiguous()


# ----------------------------------------------------------------------------------------- image
def resized_size(width: int, height: int, settings: SegSettings) -> tuple[int, int]:
    """(w, h) after mmcv's keep-ratio rescale to ``(max_long_side, short_side)``: the scale is the
    largest that keeps the short side ≤ ``short_side`` and the long side ≤ ``max_long_side``;
    sizes round half up."""
    scale = min(settings.max_long_side / max(width, height), settings.short_side / min(width, height))
    return int(width * scale + 0.5), int(height * scale + 0.5)


def slide_windows(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """(y1, y2, x1, x2) of mmseg's ``slide_inference`` windows: a grid every ``stride`` pixels,
    the last row / column moved back to end at the border, every window ``min(crop, size)`` long."""
    if crop <= 0 or stride <= 0:
        raise ValueError(f"slide crop {crop} and stride {stride} must be positive")
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    out = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, height), min(c * stride + crop, width)
            out.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return out


class Segmentor:
    """Zero-shot segmentation of single images with ``model`` (the teacher) and the queries of
    ``class_file``, per ``settings`` (module docstring)."""

    def __init__(self, model: nn.Module, class_file, settings: SegSettings, *, csa: bool = True,
                 device="cpu", window_batch: int = 8, tokenizer=None):
        if window_batch < 1:
            raise ValueError(f"window_batch must be at least 1, got {window_batch}")
        self.model = model
        self.settings = settings
        self.csa = csa
        self.device = torch.device(device)
        self.window_batch = window_batch
        self.queries, owner = read_class_queries(class_file)
        self.query_class = torch.tensor(owner, dtype=torch.long, device=self.device)
        self.num_classes = owner[-1] + 1
        self.patch_size = unwrap(model).visual.patch_size
        with _eval_mode(model):
            self.query_features = query_embeddings(model, self.queries, tokenizer=tokenizer, device=self.device)
        mean, std = torch.tensor(OPENAI_MEAN), torch.tensor(OPENAI_STD)
        self._mean, self._std = (255 * mean).view(3, 1, 1), (255 * std).view(3, 1, 1)

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        """3×h×w fp32: keep-ratio resize (bilinear without antialiasing, rounded to 8 bits, as mmcv's
        cv2 default does) and (x − 255·mean) / (255·std) with the OpenAI statistics."""
        x = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float()
        w, h = resized_size(img.width, img.height, self.settings)
        if (h, w) != tuple(x.shape[-2:]):
            x = F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False, antialias=False)[0]
            x = x.round().clamp(0, 255)
        return (x - self._mean) / self._std

    def _window_logits(self, windows: torch.Tensor) -> torch.Tensor:
        """B×3×h×w windows (all the same size) → B×Q×h×w cosine logits. A window that is not a
        square multiple of the patch size (an image smaller than the crop) is zero-padded, centred,
        to one and the padding cut off the upsampled logits."""
        h, w = windows.shape[-2:]
        side = math.ceil(max(h, w) / self.patch_size) * self.patch_size
        top, left = (side - h) // 2, (side - w) // 2
        if (side, side) != (h, w):
            windows = F.pad(windows, (left, side - w - left, top, side - h - top))
        feats = dense_features(self.model, windows.to(self.device), csa=self.csa)    # B × g × g × D
        logits = (feats @ self.query_features.T).permute(0, 3, 1, 2)                 # B × Q × g × g
        logits = F.interpolate(logits, size=(side, side), mode="bilinear", align_corners=False)
        return logits[:, :, top:top + h, left:left + w]

    @torch.no_grad()
    def logits(self, image: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """Q×H×W cosine logits of a preprocessed 3×h×w image: sliding windows, overlaps averaged,
        bilinearly resized to ``out_size`` (H, W)."""
        h, w = image.shape[-2:]
        windows = slide_windows(h, w, self.settings.slide_crop, self.settings.slide_stride)
        total = torch.zeros(len(self.queries), h, w, device=self.device)
        count = torch.zeros(1, h, w, device=self.device)
        image = image.to(self.device)
        with _eval_mode(self.model):
            for s in range(0, len(windows), self.window_batch):
                boxes = windows[s:s + self.window_batch]
                batch = torch.stack([image[:, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes])
                for (y1, y2, x1, x2), out in zip(boxes, self._window_logits(batch)):
                    total[:, y1:y2, x1:x2] += out
                    count[:, y1:y2, x1:x2] += 1
        logits = total / count
        if tuple(out_size) != (h, w):
            logits = F.interpolate(logits[None], size=tuple(out_size), mode="bilinear", align_corners=False)[0]
        return logits

    def postprocess(self, logits: torch.Tensor) -> torch.Tensor:
        """Q×H×W cosine logits → H×W int64 classes (§6.5 post-processing)."""
        return postprocess(logits, self.query_class, self.num_classes, self.settings)

    @torch.no_grad()
    def predict(self, img: Image.Image) -> torch.Tensor:
        """H×W int64 class indices of ``img`` at its original size."""
        return self.postprocess(self.logits(self.preprocess(img), (img.height, img.width)))


def postprocess(logits: torch.Tensor, query_class: torch.Tensor, num_classes: int,
                settings: SegSettings) -> torch.Tensor:
    """Q×H×W cosine logits → H×W int64 classes: ``logit_scale`` ×, softmax over the queries, max
    over each class's synonyms; with ``area_thd`` (as SCLIP applies it) a non-background class whose
    argmax area is not above ``area_thd`` × the area of all non-background argmax pixels gets its
    probabilities zeroed everywhere, so its pixels go to their next best class; then the argmax,
    and pixels whose best (remaining) probability is below ``prob_thd`` become class 0."""
    probs = (logits.float() * settings.logit_scale).softmax(dim=0)
    q, h, w = probs.shape
    index = query_class.to(probs.device).view(q, 1, 1).expand(q, h, w)
    cls = torch.zeros(num_classes, h, w, dtype=probs.dtype, device=probs.device)
    cls = cls.scatter_reduce(0, index, probs, reduce="amax", include_self=False)
    if settings.area_thd is not None:
        area = torch.bincount(cls.argmax(dim=0).flatten(), minlength=num_classes)[1:]
        keep = (area > settings.area_thd * area.sum()).to(cls.dtype)
        cls[1:] *= keep.view(-1, 1, 1)
    best, pred = cls.max(dim=0)
    pred[best < settings.prob_thd] = 0
    return pred


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """eval() for the block, the previous mode restored after."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


# ---------------------------------------------------------------------------------------- metric
class ConfusionMatrix:
    """``matrix[t, p]`` = pixels of ground-truth class t predicted as p, accumulated over images;
    pixels whose target is ``ignore_index`` are skipped."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred, target) -> None:
        pred, target = torch.as_tensor(pred).cpu().long(), torch.as_tensor(target).cpu().long()
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        valid = target != self.ignore_index
        pred, target = pred[valid], target[valid]
        for name, t in (("target", target), ("prediction", pred)):
            bad = t[(t < 0) | (t >= self.num_classes)]
            if bad.numel():
                raise ValueError(f"{name} holds class {int(bad[0])}, outside [0, {self.num_classes}) and not "
                                 f"the ignore index {self.ignore_index}")
        self.matrix += torch.bincount(target * self.num_classes + pred,
                                      minlength=self.num_classes ** 2).view(self.num_classes, self.num_classes)

    def iou(self) -> torch.Tensor:
        """Per-class IoU (fp64), NaN for a class absent from both ground truth and prediction."""
        m = self.matrix.double()
        tp = m.diagonal()
        union = m.sum(0) + m.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))

    def miou(self) -> float:
        """Mean IoU over the classes that have one (NaN if none has)."""
        iou = self.iou()
        present = ~iou.isnan()
        return float(iou[present].mean()) if present.any() else math.nan

    def all_reduce(self, shards: Shards) -> None:
        """Sum the matrices of every rank (a collective)."""
        if shards.world == 1:
            return
        comm = self.matrix.cuda() if dist.get_backend(shards.group) == "nccl" else self.matrix.clone()
        dist.all_reduce(comm, op=dist.ReduceOp.SUM, group=shards.group)
        self.matrix = comm.cpu()


# -------------------------------------------------------------------------------------- evaluate
def evaluate_segmentation(model: nn.Module, seg_set: SegmentationSet, *, csa: bool = True, device="cpu",
                          shards: Shards | None = None, progress: bool = False, window_batch: int = 8) -> dict:
    """mIoU of ``model`` (the teacher) on ``seg_set``. With ``shards`` every rank segments its
    contiguous part of the images (the padding copies of :meth:`Shards.indices` are not counted) and
    the confusion matrices are summed, so every rank returns the same; call it on every rank. The
    model runs in eval mode, fp32, no autograd, its ZeRO-3 weights gathered; its mode is restored."""
    shards = shards or Shards(False)
    n = len(seg_set)
    per = shards.per_rank(n)
    mine = shards.indices(n)[:max(0, min(per, n - shards.rank * per))]
    m = unwrap(model)
    names = list(seg_set.class_names or class_names(seg_set.class_file))
    cm = ConfusionMatrix(len(names))
    with _eval_mode(model), torch.no_grad(), gathered(m):
        segmentor = Segmentor(m, seg_set.class_file, seg_set.settings, csa=csa, device=device,
                              window_batch=window_batch)
        for i in tqdm(mine, desc=f"segmentation {seg_set.name}", unit="image",
                      disable=not progress or shards.rank != 0, dynamic_ncols=True):
            img, labels = seg_set.load(i)
            cm.update(segmentor.predict(img), torch.from_numpy(labels.copy()))   # load() may give a read-only view
    cm.all_reduce(shards)
    iou = cm.iou()
    return {"mIoU": cm.miou(),
            "per_class_iou": {name: None if math.isnan(v) else v for name, v in zip(names, iou.tolist())},
            "n_images": n, "csa": bool(csa)}
