"""Zero-shot segmentation (cosmos_method.md §6.5): the CSA block against a per-head loop in fp64, the
tower run block by block equal to its forward, sliding-window placement and assembly, the
post-processing thresholds, the confusion-matrix mIoU against torchmetrics, class files and query
embeddings, and evaluate_segmentation end to end, in one process and on 2 gloo ranks."""
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cosmos_fast import create_model
from cosmos_fast.eval import (OPENAI_TEMPLATES, ConfusionMatrix, SegmentationSet, Segmentor, SegSettings,
                              dense_features, evaluate_segmentation, query_embeddings, read_class_queries)
from cosmos_fast.eval.dense import tower_tokens
from cosmos_fast.eval.segmentation import class_names, postprocess, resized_size, slide_windows
from cosmos_fast.eval.sharding import Shards
from cosmos_fast.eval.zeroshot import build_zero_shot_classifier
from utils import TINY_MODEL_16, assert_close

# two vision layers (the CSA block is the last, the first runs as usual), 2 heads of 8
TINY_CSA = {**TINY_MODEL_16, "vision_cfg": {**TINY_MODEL_16["vision_cfg"], "layers": 2}}
# the real tokenizer's vocabulary, for the text side
TINY_TEXT = {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 32, "layers": 2, "head_width": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
SMALL = SegSettings(logit_scale=50.0, prob_thd=0.0, short_side=32, max_long_side=64, slide_crop=32, slide_stride=16)


def tiny(cfg, seed=0, dtype=None):
    torch.manual_seed(seed)
    return create_model(cfg, dtype=dtype).eval()


# ------------------------------------------------------------------------------------------ CSA
def _csa_reference(block, x):
    """The replaced block written out head by head (fp64)."""
    w = x.shape[-1]
    heads = block.attn.heads
    d = w // heads
    y = F.layer_norm(x, (w,), block.ln_1.weight, block.ln_1.bias, block.ln_1.eps)
    wq, wk, wv = block.attn.in_proj_weight.split(w)
    bq, bk, bv = block.attn.in_proj_bias.split(w)
    q, k, v = y @ wq.T + bq, y @ wk.T + bk, y @ wv.T + bv
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        per_head = []
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            qh, kh, vh = q[n, :, sl], k[n, :, sl], v[n, :, sl]
            a = torch.softmax(qh @ qh.T / math.sqrt(d), dim=-1) + torch.softmax(kh @ kh.T / math.sqrt(d), dim=-1)
            per_head.append(a @ vh)
        out[n] = torch.cat(per_head, dim=-1) @ block.attn.out_proj.weight.T + block.attn.out_proj.bias
    x = x + out
    return x + block.mlp(F.layer_norm(x, (w,), block.ln_2.weight, block.ln_2.bias, block.ln_2.eps))


@pytest.mark.parametrize("size", [16, 32])         # native grid, and the resampled positional table
def test_csa_dense_features_equal_a_per_head_loop_fp64(size):
    model = tiny(TINY_CSA, dtype=torch.float64)
    visual = model.visual
    seen = {}
    hook = visual.transformer.resblocks[-1].register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        model.encode_image(x)                          # the last block's input, from the model's own forward
        hook.remove()
        tokens = visual.ln_post(_csa_reference(visual.transformer.resblocks[-1], seen["x"]))[:, 1:]
        want = F.normalize(tokens @ visual.proj, dim=-1)
        got = dense_features(model, x, csa=True)
        plain = dense_features(model, x, csa=False)
    g = size // 8
    assert got.shape == (2, g, g, 16) and got.dtype == torch.float64
    assert_close(got, want.reshape(2, g, g, 16))
    assert (got - plain).abs().max() > 1e-3          # CSA does change the features


def test_tower_run_block_by_block_is_the_tower_forward():
    """dense.tower_tokens without CSA repeats VisionTower.forward bit for bit (any width / heads /
    patch, native and resampled sizes), and dense_features(csa=False) is today's formula."""
    for cfg, sizes in ((TINY_CSA, (16, 24, 40)), (TINY_TEXT, (32, 64))):
        model = tiny(cfg)
        for size in sizes:
            x = torch.randn(2, 3, size, size)
            with torch.no_grad():
                _, tokens = model.encode_image(x, normalize=False, return_tokens=True)
                assert torch.equal(tower_tokens(model.visual, x), tokens)
                d = dense_features(model, x)
            g = size // model.visual.patch_size
            want = F.normalize(tokens @ model.visual.proj, dim=-1).reshape(2, g, g, -1)
            assert torch.equal(d, want)


def test_dense_features_through_a_wrapper():
    class Wrapper(nn.Module):                          # DDP / DeepSpeed expose the model as .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = tiny(TINY_CSA)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(dense_features(Wrapper(model), x, csa=True), dense_features(model, x, csa=True))


# -------------------------------------------------------------------------------- sliding windows
def _count_map(h, w, windows):
    count = np.zeros((h, w), dtype=int)
    for y1, y2, x1, x2 in windows:
        count[y1:y2, x1:x2] += 1
    return count


@pytest.mark.parametrize("h,w,crop,stride", [(50, 37, 16, 12), (16, 16, 16, 8), (10, 41, 16, 8), (7, 5, 16, 8),
                                             (336, 500, 224, 112)])
def test_slide_windows_as_mmseg_places_them(h, w, crop, stride):
    windows = slide_windows(h, w, crop, stride)
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    assert len(windows) == rows * cols
    for y1, y2, x1, x2 in windows:
        assert 0 <= y1 < y2 <= h and 0 <= x1 < x2 <= w
        assert (y2 - y1, x2 - x1) == (min(crop, h), min(crop, w))
    assert windows[-1][1] == h and windows[-1][3] == w               # the last row / column ends at the border
    count = _count_map(h, w, windows)
    assert count.min() >= 1                                           # every pixel covered
    if (h, w, crop, stride) == (336, 500, 224, 112):
        # rows at 0, 112 (224 + 112 > 336: moved back to 112); columns at 0, 112, 224, 276
        assert sorted({(y1, x1) for y1, _, x1, _ in windows}) == [(y, x) for y in (0, 112) for x in (0, 112, 224, 276)]
        assert count[0, 0] == 1 and count[150, 250] == 2 * 2 and count[150, 300] == 2 * 3


class PositionSegmentor(Segmentor):
    """A Segmentor whose window "logits" are the window's own channels: row, column, 1 and a
    window counter. Correct assembly gives back the image's channels exactly."""

    def __init__(self, settings, window_batch):
        self.settings, self.window_batch, self.device = settings, window_batch, torch.device("cpu")
        self.model = nn.Identity()
        self.queries = ["row", "col", "one", "calls"]
        self.batches = []

    def _window_logits(self, windows):
        self.batches.append(windows.shape[0])
        return windows


@pytest.mark.parametrize("h,w", [(45, 38), (12, 30)])
def test_sliding_window_assembly_reproduces_position(h, w):
    settings = SegSettings(slide_crop=16, slide_stride=12)
    seg = PositionSegmentor(settings, window_batch=3)
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
    image = torch.stack([rows, cols, torch.ones(h, w), torch.zeros(h, w)])
    out = seg.logits(image, (h, w))
    assert torch.equal(out, image)                                   # every overlap averaged back to itself
    n = len(slide_windows(h, w, 16, 12))
    assert sum(seg.batches) == n and max(seg.batches) <= 3 and len(seg.batches) == math.ceil(n / 3)
    # resized to the original size: one bilinear resize of the assembled logits (align_corners=False)
    big = seg.logits(image, (2 * h + 1, 3 * w))
    assert torch.equal(big, F.interpolate(image[None], size=(2 * h + 1, 3 * w), mode="bilinear",
                                          align_corners=False)[0])


def test_overlapping_windows_are_averaged_by_the_count_map():
    h, w = 30, 28
    settings = SegSettings(slide_crop=16, slide_stride=6)

    class Ones(PositionSegmentor):
        def _window_logits(self, windows):
            return torch.ones_like(windows) * torch.arange(1, windows.shape[0] + 1).view(-1, 1, 1, 1).float()

    seg = Ones(settings, window_batch=100)                            # one batch: window k gives the value k
    windows = slide_windows(h, w, 16, 6)
    total = np.zeros((h, w))
    for k, (y1, y2, x1, x2) in enumerate(windows, 1):
        total[y1:y2, x1:x2] += k
    want = total / _count_map(h, w, windows)
    out = seg.logits(torch.zeros(4, h, w), (h, w))
    np.testing.assert_allclose(out[0].numpy(), want, rtol=1e-6)


def test_window_logits_with_the_real_model_and_padding():
    model = tiny(TINY_TEXT)
    seg = Segmentor.__new__(Segmentor)
    seg.model, seg.csa, seg.patch_size, seg.device = model, True, 16, torch.device("cpu")
    seg.query_features = F.normalize(torch.randn(5, 32), dim=-1)
    windows = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = (dense_features(model, windows, csa=True) @ seg.query_features.T).permute(0, 3, 1, 2)
        want = F.interpolate(want, size=(32, 32), mode="bilinear", align_corners=False)
        assert_close(seg._window_logits(windows), want)
        small = torch.randn(1, 3, 20, 9)                 # an image smaller than the crop: padded, centred, to 32×32
        padded = F.pad(small, (11, 12, 6, 6))
        full = (dense_features(model, padded, csa=True) @ seg.query_features.T).permute(0, 3, 1, 2)
        full = F.interpolate(full, size=(32, 32), mode="bilinear", align_corners=False)
        assert_close(seg._window_logits(small), full[:, :, 6:26, 11:20])


def test_preprocess_keeps_the_ratio_and_normalises():
    assert resized_size(500, 375, SegSettings()) == (448, 336)
    assert resized_size(375, 500, SegSettings(short_side=448)) == (448, 597)
    assert resized_size(4000, 100, SegSettings()) == (2048, 51)       # the long side caps the scale
    seg = Segmentor.__new__(Segmentor)
    seg.settings = SegSettings(short_side=20)
    seg._mean = 255 * torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(3, 1, 1)
    seg._std = 255 * torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(3, 1, 1)
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    x = seg.preprocess(Image.fromarray(arr))
    assert x.shape == (3, 20, 33)
    resized = F.interpolate(torch.from_numpy(arr).permute(2, 0, 1)[None].float(), size=(20, 33), mode="bilinear",
                            align_corners=False)[0].round()
    assert_close(x * seg._std + seg._mean, resized, atol=1e-3)
    same = Segmentor.__new__(Segmentor)
    same.settings, same._mean, same._std = SegSettings(short_side=30), seg._mean, seg._std
    assert_close(same.preprocess(Image.fromarray(arr)) * seg._std + seg._mean,
                 torch.from_numpy(arr).permute(2, 0, 1).float(), atol=1e-3)   # no resize at the target size


# -------------------------------------------------------------------------------- post-processing
def _logits_for(probs, scale):
    """Q×H×W logits whose softmax at ``scale`` is ``probs``."""
    return torch.log(torch.as_tensor(probs, dtype=torch.float64)) / scale


def test_postprocess_synonyms_and_prob_threshold():
    query_class = torch.tensor([0, 1, 1, 2])         # class 1 has two synonyms
    probs = torch.tensor([[0.40, 0.10, 0.25],        # one column per pixel, one row per query
                          [0.30, 0.10, 0.30],
                          [0.15, 0.50, 0.35],
                          [0.15, 0.30, 0.10]]).view(4, 1, 3)
    logits = _logits_for(probs, 10.0)
    pred = postprocess(logits, query_class, 3, SegSettings(logit_scale=10.0))
    # pixel 0: class 0 (0.40) beats class 1's best synonym (0.30; their sum 0.45 would win);
    # pixels 1 and 2: class 1 through its second synonym
    assert pred.tolist() == [[0, 1, 1]] and pred.dtype == torch.int64
    pred = postprocess(logits, query_class, 3, SegSettings(logit_scale=10.0, prob_thd=0.34))
    assert pred.tolist() == [[0, 1, 1]]
    pred = postprocess(logits, query_class, 3, SegSettings(logit_scale=10.0, prob_thd=0.36))
    assert pred.tolist() == [[0, 1, 0]]              # 0.35 < 0.36 → background 0
    probs = torch.tensor([[0.10, 0.2], [0.60, 0.5], [0.30, 0.3]]).view(3, 1, 2)
    pred = postprocess(_logits_for(probs, 40.0), torch.arange(3), 3, SegSettings(logit_scale=40.0, prob_thd=0.55))
    assert pred.tolist() == [[1, 0]]                 # 0.5 < 0.55 → background 0


def test_postprocess_area_threshold():
    """Class 2 wins 5 of the 65 non-background pixels: at area_thd 0.1 (≤ 6.5) it is dropped and its
    pixels go to their next best class; at 0.05 (> 3.25) it stays."""
    h, w = 10, 10
    probs = torch.full((3, h, w), 0.1)
    probs[0, :, :] = 0.2
    probs[1, :, :] = 0.1
    probs[0].view(-1)[:35] = 0.8                     # 35 background pixels
    probs[1].view(-1)[35:95] = 0.8                   # 60 pixels of class 1
    probs[2].view(-1)[95:] = 0.7                     # 5 pixels of class 2; there class 0 has 0.2, class 1 0.1
    probs = probs / probs.sum(0, keepdim=True)
    logits = _logits_for(probs, 40.0)
    base = postprocess(logits, torch.arange(3), 3, SegSettings(logit_scale=40.0))
    assert (base == 2).sum() == 5 and (base == 1).sum() == 60
    kept = postprocess(logits, torch.arange(3), 3, SegSettings(logit_scale=40.0, area_thd=0.05))
    assert torch.equal(kept, base)
    dropped = postprocess(logits, torch.arange(3), 3, SegSettings(logit_scale=40.0, area_thd=0.1))
    assert (dropped == 2).sum() == 0 and torch.equal(dropped.view(-1)[95:], torch.zeros(5, dtype=torch.long))
    assert torch.equal(dropped.view(-1)[:95], base.view(-1)[:95])
    # with a probability threshold the dropped class's pixels compare their remaining best probability
    thd = postprocess(logits, torch.arange(3), 3, SegSettings(logit_scale=40.0, area_thd=0.1, prob_thd=0.5))
    assert (thd.view(-1)[35:95] == 1).all() and (thd.view(-1)[95:] == 0).all()


# --------------------------------------------------------------------------------------- metric
def test_confusion_matrix_equals_torchmetrics():
    from torchmetrics.classification import MulticlassJaccardIndex

    rng = np.random.default_rng(0)
    n_cls = 7                                          # class 6 never occurs: no IoU
    cm = ConfusionMatrix(n_cls)
    metric = MulticlassJaccardIndex(num_classes=n_cls, average=None, ignore_index=255)
    for _ in range(4):
        h, w = rng.integers(5, 30, size=2)
        target = rng.integers(0, n_cls - 1, (h, w))
        target[rng.random((h, w)) < 0.2] = 255
        pred = rng.integers(0, n_cls - 2, (h, w))      # class 5 only in the target: IoU 0
        cm.update(torch.from_numpy(pred), torch.from_numpy(target))
        metric.update(torch.from_numpy(pred), torch.from_numpy(target))
    ours, theirs = cm.iou(), metric.compute().double()
    assert math.isnan(ours[6]) and ours[5] == 0
    present = ~ours.isnan()
    torch.testing.assert_close(ours[present], theirs[present], rtol=1e-6, atol=1e-7)
    assert theirs[6] == 0                              # torchmetrics' 0 for an absent class; ours is left out
    assert cm.miou() == pytest.approx(float(theirs[:6].mean()), rel=1e-6)
    assert cm.miou() == pytest.approx(float(np.nanmean(ours.numpy())))


def test_confusion_matrix_rejects_labels_out_of_range():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="class 7"):
        cm.update(torch.zeros(2, 2, dtype=torch.long), torch.tensor([[0, 7], [1, 255]]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long))
    cm.update(torch.tensor([[0, 2], [1, 1]]), torch.tensor([[0, 255], [1, 2]]))
    assert cm.matrix.sum() == 3 and cm.matrix[2, 1] == 1


# ----------------------------------------------------------------------------------- text side
def test_read_class_queries(tmp_path):
    f = tmp_path / "cls.txt"
    f.write_text("sky, wall,tree\naeroplane, airplane\ncat\n\n")
    assert read_class_queries(f) == (["sky", "wall", "tree", "aeroplane", "airplane", "cat"], [0, 0, 0, 1, 1, 2])
    assert class_names(f) == ["sky", "aeroplane", "cat"]
    f.write_text("dog\n\ncat\n")
    with pytest.raises(ValueError, match="line 2"):
        read_class_queries(f)


def test_query_embeddings_are_the_zero_shot_classifier():
    assert len(OPENAI_TEMPLATES) == 80 and all(callable(t) for t in OPENAI_TEMPLATES)
    model = tiny(TINY_TEXT)
    queries = ["cat", "dog", "aeroplane"]
    q = query_embeddings(model, queries, templates=OPENAI_TEMPLATES[:5])
    assert q.shape == (3, 32)
    assert_close(q.norm(dim=-1), torch.ones(3))
    assert torch.equal(q, build_zero_shot_classifier(model, queries, OPENAI_TEMPLATES[:5]).T)


# ------------------------------------------------------------------------------- end to end
def write_seg_set(root: Path, n=5) -> SegmentationSet:
    """``n`` random images of different sizes with label maps (0, 1, 2 and 255; 'P' and 'L')."""
    rng = np.random.default_rng(1)
    images, masks = [], []
    for i in range(n):
        h, w = int(rng.integers(20, 50)), int(rng.integers(20, 50))
        img = root / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(img)
        labels = rng.integers(0, 3, (h, w)).astype(np.uint8)
        labels[:2] = 255
        mask = Image.fromarray(labels, mode="L")
        if i % 2:
            mask = mask.convert("P")
        mask.save(root / f"{i}_mask.png")
        images.append(img)
        masks.append(root / f"{i}_mask.png")
    (root / "classes.txt").write_text("sky, wall\ncat\ndog, puppy\n")
    return SegmentationSet("tiny", images, masks, root / "classes.txt", SMALL)


def test_evaluate_segmentation_end_to_end(tmp_path):
    seg_set = write_seg_set(tmp_path)
    model = tiny(TINY_TEXT)
    model.train()
    result = evaluate_segmentation(model, seg_set, progress=True, window_batch=2)
    assert model.training                               # mode restored
    assert result["n_images"] == 5 and result["csa"] is True
    assert set(result["per_class_iou"]) == {"sky", "cat", "dog"}
    # the same from Segmentor.predict and a confusion matrix by hand
    model.eval()
    seg = Segmentor(model, seg_set.class_file, SMALL, window_batch=2)
    cm = ConfusionMatrix(3)
    for i in range(len(seg_set)):
        img, labels = seg_set.load(i)
        pred = seg.predict(img)
        assert pred.shape == labels.shape and pred.dtype == torch.int64
        cm.update(pred, torch.from_numpy(labels.copy()))
    assert result["mIoU"] == pytest.approx(cm.miou(), abs=1e-12)
    assert list(result["per_class_iou"].values()) == [None if math.isnan(v) else v for v in cm.iou().tolist()]
    plain = evaluate_segmentation(model, seg_set, csa=False)
    assert plain["csa"] is False and plain["n_images"] == 5


def _rank_worker(rank, world, init_file, root, out_dir, zero3):
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        seg_set = write_seg_set(Path(root))
        out = {"result": evaluate_segmentation(tiny(TINY_TEXT), seg_set, shards=Shards())}
        if zero3:
            import deepspeed

            os.environ.update(LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
            teacher = tiny(TINY_TEXT)                  # partitioned, no engine (the teacher)
            ds = {"train_micro_batch_size_per_gpu": 1,
                  "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
            deepspeed.zero.Init(module=teacher, config_dict_or_path=ds, dtype=torch.float32)
            out["zero3"] = evaluate_segmentation(teacher, seg_set, shards=Shards())
            out["partitioned_after"] = teacher.visual.proj.numel() == 0
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


def test_two_rank_gloo_equals_single_process(tmp_path):
    """2 ranks each segment their part and sum the confusion matrices: both return the single-process
    result. With DeepSpeed, the same for a ZeRO-3 partitioned teacher (gathered for the evaluation)."""
    import torch.multiprocessing as mp

    data = tmp_path / "data"
    data.mkdir()
    seg_set = write_seg_set(data)
    try:
        import deepspeed  # noqa: F401
        zero3 = True
    except ImportError:
        zero3 = False
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(data), str(tmp_path), zero3), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["result"] == ranks[1]["result"]
    single = evaluate_segmentation(tiny(TINY_TEXT), seg_set)
    got = ranks[0]["result"]
    assert got["n_images"] == single["n_images"] == 5
    assert got["mIoU"] == pytest.approx(single["mIoU"], abs=1e-12)
    for name, v in single["per_class_iou"].items():
        assert got["per_class_iou"][name] == (None if v is None else pytest.approx(v, abs=1e-12))
    if not zero3:
        pytest.skip("deepspeed is not installed: the ZeRO-3 part did not run")
    assert ranks[0]["zero3"] == ranks[1]["zero3"] == got
    assert ranks[0]["partitioned_after"] and ranks[1]["partitioned_after"]
