"""The DALI backend of the COSMOS loader: same interface and batch layout as
:class:`~cosmos_fast.data.loader.WebDatasetLoader`.

A loader is an iterable of batches ``{"crops": [2 global + n_local × (B,3,H,W) float32, normalised],
"captions": (K·B, L) int64 caption-major, "keys": [B keys], "skipped": {reason: count}}`` with
``set_epoch``, ``steps_per_epoch``, ``consumed``, ``skipped``, ``state_dict`` / ``load_state_dict``.

Pipeline (one per rank and epoch). ``fn.readers.webdataset`` reads image + json through validated
index files (:mod:`.shards`) with a shuffle buffer of ``shuffle_buffer`` samples; each image is decoded
once (``device="mixed"`` on CUDA, CPU otherwise; EXIF orientation ignored, as PIL does) and cut into
the crops of cosmos_method.md §4.4, every random choice drawn per crop by DALI's random operators
(the same laws as torchvision's). The crops are then made in one of two ways:

**CPU, exact (the default on DALI's CPU backend, with numba).** One fused Numba operator per crop
(:mod:`.pil_crop`) takes the decoded image and the crop's parameter vector and returns the normalised
CHW crop, *equal bit for bit* to what torchvision's PIL pipeline (the torchvision backend) makes from
the same image with the same parameters: Pillow's resampling, blends, luma, 8-bit HSV round trip,
box-blur approximation of the Gaussian and torchvision's float32 normalisation, each re-implemented
with Pillow's arithmetic. DALI's CPU JPEG decoder gives PIL's pixels, so the whole CPU pipeline
equals the torchvision backend given the same random draws (tests/test_dali.py, test_pil_crop.py).
Numba compiles the kernel once and caches it on disk (next to the module, or in
``NUMBA_CACHE_DIR``): building the first pipeline took 15.5 s here with an empty cache, 6.1 s with it
(most of it DALI linking its operator, once per process).

**Operator graph (the GPU; the CPU with ``hue_mode="float"|"linear"`` or without numba).** Each op is
a DALI operator, gated by DALI conditionals, close to PIL but not equal:

* RandomResizedCrop (area U[s,1]·HW, local U[.05,s]; ratio log-U[3/4,4/3]; 10 tries, then the fallback):
  ``fn.random_crop_generator`` (the same rule; both paths) → ``fn.resize`` of that window, cubic,
  antialiased.
  Same sampling; the resampling filters differ slightly from PIL's bicubic.
* Horizontal flip p .5: ``mirror`` of ``fn.crop_mirror_normalize`` (a flip commutes with every later op).
* ColorJitter(.4, .4, .2, .1) p .8 in torchvision's random order: ``if coin(.8)``, then 4 slots; slot k
  applies the op that a random permutation (1 of 24) puts at k. Per op, against PIL:
  brightness b~U[.6,1.4] ``fn.brightness_contrast`` truncating like PIL (exact); contrast c~U[.6,1.4]
  blend with the rounded mean luma, ``fn.brightness_contrast`` on CPU, arithmetic on GPU (≤ 1 level);
  saturation s~U[.8,1.2] ``fn.hsv(saturation=s)``, the same linear map as PIL's blend with gray (≤ 1
  level, rounding); hue h~U[−.1,.1] shifts H of HSV by int32(255h)/256 of a turn as torchvision does:
  in elementwise float arithmetic (``hue_mode="float"``, and ``"exact"`` on the GPU; PIL's 8-bit HSV
  rounding is the only difference), or ``fn.hsv`` (``"linear"``: a rotation about the gray axis,
  approximate, cheaper).
* Grayscale p .2: ``fn.color_space_conversion`` to GRAY (.299/.587/.114), 3 channels (≤ 1 level).
* Gaussian blur p 1 / .1 / .5 (global 1 / global 2 / local), PIL radius r~U[.1,2]: ``fn.gaussian_blur
  (sigma=r)``; PIL's radius *is* the standard deviation. PIL approximates the Gaussian with 3 box
  passes and clamps at borders, DALI convolves with the Gaussian truncated at 3σ and mirrors.
* Solarize p .2 on global 2 only, threshold 128: arithmetic, x ≥ 128 → 255 − x (exact).
* ToTensor + Normalize (OpenAI mean/std): ``fn.crop_mirror_normalize``, mean·255 and std·255, CHW float32.

Gates are ``fn.random.coin_flip`` predicates of DALI conditionals (``enable_conditionals``), so an op
runs only on the crops it applies to; blur is ``rand <= p`` in PIL and a coin of probability p here
(the same law). Every op of the graph exists on DALI's CPU backend, so the CPU graph is the CUDA one;
only the decoder device, the contrast blend (arithmetic on the GPU) and the output device differ.
``build_pipeline(debug=True)`` also returns every crop's random parameters (:data:`DEBUG_FIELDS`).

Captions. The json of every sample comes out of the pipeline; captions are sampled and tokenised per
sample with :mod:`.captions` exactly as in the torchvision path (seeded by seed, epoch, rank and the
sample's position in the rank's stream), in this process or, with ``caption_workers > 0``, in a
small process pool.

Order. For epoch e the shard list is shuffled with seed + e identically on every rank (as in the
torchvision backend), and rank r reads ``order[r::world]`` (resampled mode: shards drawn with
replacement). The reader reads those tars in order through the shuffle buffer and wraps around when
they run out, until ``steps_per_epoch`` batches are out. ``data.num_workers`` sets DALI's CPU threads.

Bad data (skip-and-count). A corrupt image cannot be skipped inside a DALI pipeline, so:

1. Index time (``cosmos-fast make-shards``, or the loader itself when a shard has no current index):
   every image is decoded, every json parsed, with the torchvision backend's checks
   (:func:`~cosmos_fast.data.loader.decode_image`, :func:`~cosmos_fast.data.loader.parse_json`); a
   sample with a corrupt image or one DALI does not decode (``unsupported_image_format``), no image,
   no json, a json that does not parse or is too large (``bad_json``) or an unusable caption record
   is left out of the index and reported in the index report.
   Each epoch adds those counts (for the rank's shards) to ``skipped`` under the same reason names as
   the torchvision backend. A truncated or unreadable tar is reported (``bad_shard``) and skipped.
2. Run time, captions: a record that cannot be sampled (e.g. ``string_fields="reject"``) is counted
   and that sample alone is dropped; the next samples fill the batch.
3. Run time, images: if the decoder fails anyway (an index made without validation, e.g. by wds2idx,
   or a file changed after indexing), DALI fails the whole pipeline batch. That batch is **dropped**
   and counted as ``decode_error_batch`` (its B samples); the loader goes on with the next one. The
   decoder names no sample, so the log line's shards and keys are read again by a reader-only
   pipeline restored from the last checkpoint (:func:`batch_sources`). Twenty failed or empty
   pipeline batches in a row stop the loader with an error.

Resume. The position is (epoch, batches consumed) plus a DALI checkpoint (``enable_checkpointing``:
reader position, shuffle buffer and RNG states) taken after the pipeline run before the one that fed
the last consumed batch's tail, and how many valid samples of that run were already used.
``load_state_dict`` rebuilds the pipeline from the checkpoint and replays at most one run (plus
failed ones), so nothing consumed is repeated and nothing is skipped. Without a usable checkpoint (a
torchvision-backend state, or a different pipeline graph) the loader replays the epoch from its start
and discards the consumed batches (exact for the sample order; augmentations are exact only for the
same graph).

Remote shards (``pipe:``, ``http(s)://``, ``s3://`` → ``pipe:aws s3 cp URL -``, and other schemes
webdataset's ``gopen`` knows) are copied into ``cache_dir`` with ``retries`` attempts, checked for
completeness and indexed there; a shard that cannot be fetched is counted as ``bad_shard`` and skipped.
``pipe:CMD`` runs CMD in a shell; with ``allow_pipe=False`` in the spec, ``pipe:`` and ``s3://`` URLs
are refused (ValueError) at construction.

Speed (benchmarks/bench_data.py, 2 CPU threads, B = 32, 500×375 JPEGs, after the kernel compiled;
two runs): torchvision 129 / 126 images/s, this backend's exact CPU path 305 / 299 (2.4×); the
operator graph on the CPU is slower than PIL (89 images/s with ``"linear"``, 44 with ``"float"``).
Per image on one core the fused kernel needs ~3.7 ms for the 8 crops where torchvision's PIL ops
take ~11 ms: Pillow's two-pass resampling with each pass one vector operation per output row (the
horizontal pass on a transposed window), the box blur likewise, and the hue from lookup tables
instead of four divisions.

Tested on the DALI 2.4 CPU backend; the CUDA path (mixed decode, GPU ops) is the graph above and has
not been run on a GPU.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import math
import os
import random
import shlex
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..device import resolve_device
from .captions import SampleError, Tokenizer, sample_captions
from .loader import IMAGE_KEYS, StreamSpec, _seed, check_pipe_urls, local_tar_problem, parse_json
from .normalize import OPENAI_MEAN, OPENAI_STD
from .pil_crop import PARAM_FIELDS
from .shards import ShardError, index_path, read_report, write_index

log = logging.getLogger(__name__)

_JITTER_ORDERS = list(itertools.permutations(range(4)))      # torchvision ColorJitter: randperm(4)
HUE_MODES = ("exact", "float", "linear")
_MAX_BAD_RUNS = 20
_LOG_PER_REASON = 10


def dali_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("nvidia.dali") is not None


_WARNED_NO_NUMBA: list = []


def resolve_hue_mode(hue_mode: str, gpu: bool) -> str:
    """How the crops are made: ``pil`` (CPU, numba: one fused Numba operator per crop that equals
    torchvision's PIL pipeline bit for bit, :mod:`.pil_crop`), or the DALI operator graph with the hue
    shift as ``float`` (HSV shift in DALI arithmetic: PIL's 8-bit HSV rounding is the difference) or
    ``linear`` (``fn.hsv``). ``exact`` is ``pil`` on DALI's CPU backend when numba imports, ``float``
    otherwise (the GPU, or no numba: then a warning, once)."""
    from . import pil_hue

    if hue_mode not in HUE_MODES:
        raise ValueError(f"hue_mode must be one of {HUE_MODES}, got {hue_mode!r}")
    if hue_mode != "exact":
        return hue_mode
    if not gpu and pil_hue.available():
        return "pil"
    if not gpu and not _WARNED_NO_NUMBA:
        _WARNED_NO_NUMBA.append(True)
        log.warning("numba is not installed: the DALI CPU pipeline uses DALI's operators (close to torchvision's "
                    "PIL crops, not equal, and slower; pip install numba for the exact fused kernel)")
    return "float"


# ------------------------------------------------------------------------------ augmentation graph
def _coin(p: float):
    from nvidia.dali import fn, types

    return fn.cast(fn.random.coin_flip(probability=p), dtype=types.BOOL)


def _scalar(node, gpu: bool):
    """A per-sample scalar next to the image data for arithmetic (named arguments stay on the CPU)."""
    return node.gpu() if gpu else node


def _float(img):
    from nvidia.dali import fn, types

    return fn.cast(img, dtype=types.FLOAT)


def _u8(x):
    """Back to uint8 as PIL stores a blend: clamp to [0, 255], then truncate."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    return fn.cast(dmath.floor(dmath.clamp(x, 0.0, 255.0)), dtype=types.UINT8)


def _gray(img):
    """PIL ``convert("L")``: luma .299 R + .587 G + .114 B, one channel (HW1), rounded."""
    from nvidia.dali import fn, types

    return fn.color_space_conversion(img, image_type=types.RGB, output_type=types.GRAY)


_TRUNCATE = -0.5 / 255.0     # brightness_shift that turns DALI's rounding into PIL's truncation


def _brightness(img, factor):
    """PIL ImageEnhance.Brightness: blend with black, x · b (truncated)."""
    from nvidia.dali import fn

    return fn.brightness_contrast(img, brightness=factor, brightness_shift=_TRUNCATE)


def _contrast(img, factor, gpu: bool):
    """PIL ImageEnhance.Contrast: blend with a constant image of the mean gray level (rounded)."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    if gpu:      # a GPU mean cannot be an operator argument: the blend in arithmetic
        mean = dmath.floor(fn.reductions.mean(_float(_gray(img))) + 0.5)
        return _u8(mean + _scalar(factor, gpu) * (_float(img) - mean))
    means = fn.reductions.mean(img, axes=[0, 1], dtype=types.FLOAT)
    mean = dmath.floor(means[0] * 0.299 + means[1] * 0.587 + means[2] * 0.114 + 0.5)
    return fn.brightness_contrast(img, contrast=factor, contrast_center=mean, brightness_shift=_TRUNCATE)


def _saturation(img, factor):
    """PIL ImageEnhance.Color: blend with the gray image; ``fn.hsv`` keeps luma and scales chroma
    (the same linear map; DALI rounds where PIL truncates: at most 1 level apart)."""
    from nvidia.dali import fn

    return fn.hsv(img, saturation=factor)


def _grayscale(img):
    """torchvision RandomGrayscale on PIL: L image replicated on 3 channels."""
    from nvidia.dali import fn

    g = _gray(img)
    return fn.cat(g, g, g, axis=2)


def _hue(img, turns, gpu: bool):
    """torchvision adjust_hue on PIL: shift H of HSV by ``turns`` of a full turn, keep S and V.

    Per pixel, exactly: H from the max channel, shifted, and RGB rebuilt as
    V − C·clamp(min(k, 4 − k), 0, 1) with k = (n + H) mod 6 for n = 5, 3, 1 (R, G, B)."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    x = _float(img)
    r, g, b = x[:, :, 0], x[:, :, 1], x[:, :, 2]
    v = dmath.max(dmath.max(r, g), b)
    c = v - dmath.min(dmath.min(r, g), b)
    cs = dmath.max(c, 1e-3)
    is_r = v == r
    is_g = (v == g) & (v != r)
    is_b = (v != r) & (v != g)
    h = (is_r * ((g - b) / cs) + is_g * ((b - r) / cs + 2.0) + is_b * ((r - g) / cs + 4.0)
         + 6.0 * _scalar(turns, gpu))

    def channel(n):
        k = h + n
        k = k - 6.0 * dmath.floor(k / 6.0)
        return v - c * dmath.clamp(dmath.min(k, 4.0 - k), 0.0, 1.0)

    out = fn.stack(channel(5.0), channel(3.0), channel(1.0), axis=2, axis_name="C")
    return fn.cast(dmath.floor(out + 0.5), dtype=types.UINT8)


def _jitter_params():
    """torchvision ColorJitter.get_params: factors b, c, s ~ U, hue ~ U[-0.1, 0.1], a random order."""
    from nvidia.dali import fn, types

    return {"brightness": fn.random.uniform(range=[0.6, 1.4]), "contrast": fn.random.uniform(range=[0.6, 1.4]),
            "saturation": fn.random.uniform(range=[0.8, 1.2]), "hue": fn.random.uniform(range=[-0.1, 0.1]),
            "order": fn.cast(fn.random.uniform(values=[float(i) for i in range(len(_JITTER_ORDERS))]),
                             dtype=types.INT32)}


def _color_jitter(img, params: dict, gpu: bool, hue_mode: str = "float"):
    """ColorJitter(0.4, 0.4, 0.2, 0.1) of the operator graph, with torchvision's random order of the four
    ops: slot k applies op ``_JITTER_ORDERS[order][k]`` (0 brightness, 1 contrast, 2 saturation, 3 hue).

    The hue shift is ``fn.hsv`` (a rotation about the gray axis, which only approximates it) for
    ``hue_mode="linear"``, else the float HSV shift (~60 elementwise ops; PIL's 8-bit HSV rounding is
    the difference). The exact CPU path does not use this graph (:mod:`.pil_crop`)."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    # torchvision adds int8(hue · 255) to PIL's 8-bit H channel (256 steps per turn)
    steps = params["hue"] * 255.0
    whole = dmath.floor(dmath.abs(steps)) * ((steps >= 0) * 2 - 1)           # int8(): toward zero
    turns = whole / 256.0

    def hue_op(x):
        return fn.hsv(x, hue=turns * 360.0) if hue_mode == "linear" else _hue(x, turns, gpu)

    for slot in range(4):
        op = fn.lookup_table(params["order"], keys=list(range(len(_JITTER_ORDERS))),
                             values=[float(o[slot]) for o in _JITTER_ORDERS], dtype=types.INT32)
        if op == 0:
            img = _brightness(img, params["brightness"])
        elif op == 1:
            img = _contrast(img, params["contrast"], gpu)
        elif op == 2:
            img = _saturation(img, params["saturation"])
        else:
            img = hue_op(img)
    return img


def _solarize(img):
    """PIL ImageOps.solarize(threshold=128): values >= 128 become 255 - value."""
    from nvidia.dali import fn, types

    x = fn.cast(img, dtype=types.INT16)
    return fn.cast(x + (x >= 128) * (255 - 2 * x), dtype=types.UINT8)


# per-crop random parameters returned by ``build_pipeline(debug=True)``, in this order: the fused
# kernel's parameter vector (the blur radius is PIL's radius, DALI's sigma), then the image size
DEBUG_FIELDS = PARAM_FIELDS + ("img_h", "img_w")


def _one_crop(images, shape, size: int, area: tuple, blur_p: float, solarize_p: float, gpu: bool,
              hue_mode: str = "exact", debug: bool = False):
    """One crop of §4.4 from decoded HWC uint8 images whose (H, W, C) is ``shape``.

    The random parameters are drawn here, per crop, by DALI's random operators. With the ``pil`` hue
    implementation (CPU, numba) one fused operator (:mod:`.pil_crop`) makes the whole crop from them
    exactly as torchvision does; otherwise each op is a DALI operator, gated by DALI conditionals."""
    from nvidia.dali import fn, types

    # torchvision RandomResizedCrop: area ~ U(area)·H·W, ratio log-uniform, 10 tries, then a fallback
    anchor, extent = fn.random_crop_generator(shape, random_area=list(area), num_attempts=10,
                                              random_aspect_ratio=[3.0 / 4.0, 4.0 / 3.0])
    jitter, gray = _coin(0.8), _coin(0.2)
    blur = _coin(blur_p) if blur_p < 1.0 else None
    solar = _coin(solarize_p) if solarize_p > 0 else None
    flip = fn.random.coin_flip(probability=0.5)
    sigma = fn.random.uniform(range=[0.1, 2.0])            # PIL GaussianBlur radius = standard deviation
    jitter_params = _jitter_params()

    def vec(x):
        return fn.reshape(fn.cast(x, dtype=types.FLOAT), shape=[-1])

    always, never = flip * 0 + 1, flip * 0               # per-sample constants for ops without a coin
    fused = resolve_hue_mode(hue_mode, gpu) == "pil"
    params = None
    if fused or debug:                                    # the crop's parameters in PARAM_FIELDS order
        params = fn.cat(vec(anchor), vec(extent), vec(flip), vec(jitter),
                        *[vec(jitter_params[k]) for k in ("brightness", "contrast", "saturation", "hue", "order")],
                        vec(gray), vec(always if blur is None else blur), vec(sigma),
                        vec(never if solar is None else solar))
    if fused:
        from . import pil_crop

        out = pil_crop.dali_crop(images, params, size)
    else:
        start = fn.cast(anchor, dtype=types.FLOAT)
        img = fn.resize(images, size=[size, size], roi_start=start,
                        roi_end=start + fn.cast(extent, dtype=types.FLOAT), interp_type=types.INTERP_CUBIC,
                        antialias=True)
        if jitter:
            img = _color_jitter(img, jitter_params, gpu, hue_mode)
        if gray:
            img = _grayscale(img)
        if blur is None:
            img = fn.gaussian_blur(img, sigma=sigma)
        elif blur:
            img = fn.gaussian_blur(img, sigma=sigma)
        if solar is not None:
            if solar:
                img = _solarize(img)
        out = fn.crop_mirror_normalize(img, mirror=flip, output_layout="CHW", dtype=types.FLOAT,
                                       mean=[255.0 * m for m in OPENAI_MEAN], std=[255.0 * s for s in OPENAI_STD])
    if not debug:
        return out, None
    return out, fn.cat(params, vec(shape[0:2]))                           # DEBUG_FIELDS


def multicrop_graph(encoded, images, global_size: int, local_size: int, crop_scale: float, n_local: int,
                    gpu: bool, hue_mode: str = "exact", debug: bool = False):
    """Decoded HWC uint8 images → ([global 1, global 2, local × n_local], debug params), §4.4."""
    from nvidia.dali import fn

    if not 0.05 < crop_scale < 1.0:
        raise ValueError(f"data.crop_scale must lie in (0.05, 1), got {crop_scale}")
    shape = fn.peek_image_shape(encoded, adjust_orientation=False)
    kinds = [(global_size, (crop_scale, 1.0), 1.0, 0.0), (global_size, (crop_scale, 1.0), 0.1, 0.2)]
    kinds += [(local_size, (0.05, crop_scale), 0.5, 0.0)] * n_local
    if hue_mode not in HUE_MODES:
        raise ValueError(f"hue_mode must be one of {HUE_MODES}, got {hue_mode!r}")
    crops = [_one_crop(images, shape, *k, gpu=gpu, hue_mode=hue_mode, debug=debug) for k in kinds]
    return [c for c, _ in crops], [p for _, p in crops if p is not None]


def _reader(paths, index_paths, shuffle_buffer: int, reader_seed: int):
    """(encoded image, json bytes) from the webdataset reader: the sample order depends on these
    arguments alone (shared by the training pipeline and :func:`batch_sources`)."""
    from nvidia.dali import fn

    return fn.readers.webdataset(
        paths=list(paths), index_paths=list(index_paths), ext=[";".join(IMAGE_KEYS), "json"],
        missing_component_behavior="skip", random_shuffle=shuffle_buffer > 1,
        initial_fill=max(1, shuffle_buffer), seed=reader_seed, name="reader")


def build_pipeline(paths, index_paths, batch_size: int, *, global_size: int, local_size: int, crop_scale: float,
                   n_local: int, shuffle_buffer: int, seed: int, reader_seed: int, device_id=None,
                   num_threads: int = 2, prefetch: int = 2, checkpoint=None, hue_mode: str = "exact",
                   debug: bool = False):
    """The COSMOS multi-crop pipeline. Outputs the 2 + n_local crops, the raw json bytes, and with
    ``debug`` one float vector per crop of the random parameters named in :data:`DEBUG_FIELDS`."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None

    @pipeline_def(enable_conditionals=True)
    def cosmos_multicrop():
        encoded, meta = _reader(paths, index_paths, shuffle_buffer, reader_seed)
        # PIL does not apply EXIF orientation, so neither do we
        images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                   adjust_orientation=False)
        crops, params = multicrop_graph(encoded, images, global_size, local_size, crop_scale, n_local, gpu,
                                        hue_mode, debug)
        return (*crops, meta, *params)

    pipe = cosmos_multicrop(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                            seed=seed, prefetch_queue_depth=prefetch, enable_checkpointing=True,
                            checkpoint=checkpoint, exec_dynamic=True)
    pipe.build()
    return pipe


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return n, i


def _proto_fields(buf: bytes):
    """(field number, value, raw bytes) of each top-level field of a protobuf message."""
    i = 0
    while i < len(buf):
        start = i
        tag, i = _varint(buf, i)
        if tag & 7 == 0:
            val, i = _varint(buf, i)
        elif tag & 7 == 2:
            n, i = _varint(buf, i)
            val, i = buf[i:i + n], i + n
        else:
            raise ValueError(f"unexpected protobuf wire type {tag & 7}")
        yield tag >> 3, val, buf[start:i]


def _reader_checkpoint(cp: bytes) -> bytes:
    """The reader's part of a pipeline checkpoint, which a reader-only pipeline accepts. DALI's
    Checkpoint message has one field-1 entry ``{1: operator name, 2: state}`` per operator: keep the
    reader's and its outputs' (``__MakeContiguous_..._reader[i]``) and every other field."""
    keep = []
    for field, val, raw in _proto_fields(cp):
        if field == 1:
            name = next((v for f, v, _ in _proto_fields(val) if f == 1), b"")
            if name != b"reader" and b"_reader[" not in name:
                continue
        keep.append(raw)
    return b"".join(keep)


def batch_sources(paths, index_paths, batch_size: int, shuffle_buffer: int, reader_seed: int, checkpoint,
                  runs: int) -> list[str]:
    """Source infos (``path.tar:offset:key.json``) of the samples of the ``runs``-th pipeline run after
    ``checkpoint`` (None: the epoch start), read again without decoding. A failed decode reports no
    sample, so this is how a dropped batch is named."""
    from nvidia.dali import pipeline_def

    @pipeline_def
    def reader_only():
        return _reader(paths, index_paths, shuffle_buffer, reader_seed)[1]

    pipe = reader_only(batch_size=batch_size, num_threads=1, device_id=None, prefetch_queue_depth=1,
                       enable_checkpointing=True, exec_dynamic=True,
                       checkpoint=None if checkpoint is None else _reader_checkpoint(checkpoint))
    pipe.build()
    for _ in range(runs):
        (meta,) = pipe.run()
    return [meta[i].source_info() for i in range(len(meta))]


# ------------------------------------------------------------------------------ captions
_WORKER_TOKENIZER = {}


def _caption_job(payload):
    """(json bytes and seed per sample, spec fields) → (tokens (n_valid, K, L) int64 of the samples whose
    record could be sampled, or None; per sample None or (reason, message))."""
    metas, seeds, mode, num_captions, string_fields, tok_name, ctx = payload
    key = (tok_name, ctx)
    if key not in _WORKER_TOKENIZER:
        _WORKER_TOKENIZER[key] = Tokenizer(tok_name, ctx)
    tok = _WORKER_TOKENIZER[key]
    caps, reasons = [], []
    for meta, seed in zip(metas, seeds):
        try:
            record = parse_json(meta)                # any parse failure, or over the size limit: bad_json
            caps.append(sample_captions(record, random.Random(seed), num_captions, mode, string_fields))
            reasons.append(None)
        except SampleError as e:
            reasons.append((e.reason, str(e)))
    tokens = tok([c for cs in caps for c in cs]).reshape(len(caps), num_captions, -1) if caps else None
    return tokens, reasons


# ------------------------------------------------------------------------------ the loader
class _Chunk:
    """Valid samples of one pipeline run still waiting to be batched, and how to get back to them."""

    def __init__(self, crops, tokens, keys, run: int, used: int, cp_before, cp_before_runs: int):
        self.crops, self.tokens, self.keys = crops, tokens, keys
        self.run, self.used = run, used                  # used: valid samples of the run already taken
        self.cp_before, self.cp_before_runs = cp_before, cp_before_runs

    def rest(self, k: int) -> "_Chunk":
        return _Chunk([c[k:] for c in self.crops], self.tokens[k:], self.keys[k:], self.run, self.used + k,
                      self.cp_before, self.cp_before_runs)


class DaliWebDatasetLoader:
    """Multi-crop COSMOS batches from webdataset shards with NVIDIA DALI (CUDA or CPU).

    Args:
        spec: the same :class:`~cosmos_fast.data.loader.StreamSpec` as the torchvision backend
            (``num_workers`` sets DALI's CPU threads; ``shuffle_initial`` is not used: DALI fills its
            buffer of ``shuffle_buffer`` samples before the first batch).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``; batches come out on it.
        num_threads: DALI CPU threads (default ``max(1, spec.num_workers)``).
        index_dir: where to write indexes that cannot go beside their tar (read-only shard folders);
            indexes beside the tar (``name.idx`` + ``name.idx.json``) are used first.
        cache_dir: local copies of remote shards (default ``~/.cache/cosmos_fast/shards``).
        validate: build missing indexes with full validation (decode every image); False indexes
            only the structure (faster; then run-time decode errors drop batches).
        retries: attempts to fetch a remote shard.
        caption_workers: processes for caption sampling + tokenisation (0 = in this process).
        prefetch: DALI prefetch queue depth.
        hue_mode: ``exact`` (on the CPU with numba: the fused kernel, crops equal to torchvision's; on
            the GPU: the operator graph with the float HSV shift), ``float`` (the operator graph with the
            float HSV shift) or ``linear`` (the graph with ``fn.hsv``, approximate).
    """

    def __init__(self, spec: StreamSpec, device="auto", num_threads: int | None = None, index_dir=None,
                 cache_dir=None, validate: bool = True, retries: int = 3, caption_workers: int = 0,
                 prefetch: int = 2, hue_mode: str = "exact"):
        if not dali_available():
            raise ImportError("data.backend=dali needs NVIDIA DALI (pip install nvidia-dali-cuda120, or the "
                              "[dev] extra); use data.backend=torchvision otherwise")
        if not spec.resampled and len(spec.shards) < spec.world:
            raise ValueError(f"{len(spec.shards)} shard(s) for {spec.world} rank(s): every rank needs a shard "
                             f"(or set data.resampled=true)")
        if spec.n_local < 0 or spec.num_captions < 2:
            raise ValueError("need n_local >= 0 and num_captions >= 2")
        if not 0.05 < spec.crop_scale < 1.0:
            raise ValueError(f"data.crop_scale must lie in (0.05, 1), got {spec.crop_scale}")
        check_pipe_urls(spec.shards, spec.allow_pipe)
        self.spec = spec
        self.device = resolve_device(device)
        self.num_threads = num_threads or max(1, spec.num_workers)
        self.index_dir = Path(index_dir) if index_dir else None
        self.cache_dir = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "cosmos_fast" / "shards"
        self.validate, self.retries, self.prefetch = validate, retries, prefetch
        self.caption_workers = caption_workers
        self.hue_mode = hue_mode
        self._hue_impl = resolve_hue_mode(hue_mode, self.device.type == "cuda")     # validates it
        self._pool = None
        self.epoch = 0
        self.consumed = 0
        self._epoch_skips = Counter()
        self._skips_before = Counter()
        self._logged = Counter()
        self._position = None            # where the next batch comes from (see state_dict)
        self._discard = 0                # batches to replay and drop (resume without a checkpoint)
        self._started = False            # index-time skips of this epoch counted
        self._stream = None

    # ----------------------------------------------------------------- interface
    @property
    def steps_per_epoch(self) -> int:
        return self.spec.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._skips_before += self._epoch_skips
            self.epoch, self.consumed = epoch, 0
            self._epoch_skips, self._position, self._discard, self._started = Counter(), None, 0, False
            self._close_stream()

    def epoch_skips(self) -> dict:
        return dict(self._epoch_skips)

    @property
    def skipped(self) -> dict:
        """Cumulative skip counts by reason over the run (this rank)."""
        return dict(self._skips_before + self._epoch_skips)

    def __iter__(self):
        while self.consumed < self.spec.steps_per_epoch:
            if self._stream is None:
                self._stream = _EpochStream(self)
            batch, position = self._stream.next_batch()
            self.consumed += 1
            self._position = position
            batch["skipped"] = self.skipped
            yield batch
        self._close_stream()

    def state_dict(self) -> dict:
        return {"backend": "dali", "epoch": self.epoch, "consumed": self.consumed,
                "position": dict(self._position) if self._position else None, "graph": self._graph_signature(),
                "epoch_skips": dict(self._epoch_skips), "skips_before": dict(self._skips_before),
                "started": self._started}

    def load_state_dict(self, state: dict) -> None:
        self._close_stream()
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self._skips_before = Counter(state.get("skips_before", {}))
        if "epoch_skips" in state:
            self._epoch_skips = Counter(state["epoch_skips"])
        else:                                       # a torchvision-backend state
            self._epoch_skips = Counter()
            for counts in state.get("worker_skips", {}).values():
                self._epoch_skips.update(counts)
        self._started = bool(state.get("started", self.consumed > 0))
        position = state.get("position")
        self._position, self._discard = None, 0
        if position and state.get("graph") == self._graph_signature():
            self._position = dict(position)
        elif self.consumed:
            log.warning("data state has no DALI checkpoint for this pipeline; replaying %d batch(es) of epoch %d "
                        "(sample order exact, augmentations exact only for the same pipeline)",
                        self.consumed, self.epoch)
            self._discard = self.consumed

    def close(self) -> None:
        self._close_stream()
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ----------------------------------------------------------------- helpers
    def _close_stream(self):
        self._stream = None

    def _graph_signature(self) -> str:
        s = self.spec
        return (f"v1 {self.device.type} hue-{self._hue_impl} B{s.batch_size} g{s.global_size} "
                f"l{s.local_size}x{s.n_local} s{s.crop_scale} buf{s.shuffle_buffer} world{s.world} "
                f"rank{s.rank} seed{s.seed} res{int(s.resampled)} n{len(s.shards)}")

    def _logs(self, reason: str) -> bool:
        """Whether the next skip of this reason gets a log line."""
        return self._logged[reason] < _LOG_PER_REASON

    def _skip(self, reason: str, n: int = 1, where: str = "", detail: str = "", count: bool = True):
        if not count:
            return
        self._epoch_skips[reason] += n
        self._logged[reason] += 1
        if self._logged[reason] <= _LOG_PER_REASON:
            log.warning("skipping %s: %s%s", where or "-", reason, f" ({detail})" if detail else "")
            if self._logged[reason] == _LOG_PER_REASON:
                log.warning("further %r skips are counted but not logged", reason)

    def _captions(self, metas, seeds):
        s = self.spec
        args = (s.caption_mode, s.num_captions, s.string_fields, s.tokenizer_name, s.context_length)
        if self.caption_workers <= 0:
            return _caption_job((metas, seeds, *args))
        if self._pool is None:
            import concurrent.futures as cf
            import multiprocessing as mp

            from .lifeline import die_with_parent

            # a pool worker blocks on its call queue forever once we are gone: have it die with us
            self._pool = cf.ProcessPoolExecutor(self.caption_workers, mp_context=mp.get_context("spawn"),
                                                initializer=die_with_parent, initargs=(os.getpid(),))
        n = max(1, math.ceil(len(metas) / self.caption_workers))
        parts = list(self._pool.map(_caption_job, [(metas[i:i + n], seeds[i:i + n], *args)
                                                   for i in range(0, len(metas), n)]))
        toks = [t for t, _ in parts if t is not None]
        return (torch.cat(toks) if toks else None), [r for _, rs in parts for r in rs]

    # ----------------------------------------------------------------- shards
    def epoch_shards(self, epoch: int) -> list[str]:
        """This rank's shard URLs for an epoch (the torchvision backend's rank split)."""
        s = self.spec
        if s.resampled:
            rng = random.Random(_seed(s.seed, epoch, s.rank, 1))
            return rng.choices(list(s.shards), k=max(1, math.ceil(len(s.shards) / s.world)))
        order = list(s.shards)
        random.Random(s.seed + epoch).shuffle(order)          # same on every rank
        return order[s.rank::s.world]

    def _local(self, url: str, count: bool = True) -> Path | None:
        """A local, complete copy of a shard (remote shards are fetched into cache_dir)."""
        if url.startswith("file:"):
            url = url[len("file:"):]
        if not (url.startswith("pipe:") or "://" in url):
            return Path(url)
        check_pipe_urls([url], self.spec.allow_pipe)
        if url.startswith("s3://"):
            url = f"pipe:aws s3 cp {shlex.quote(url)} -"          # the URL is an argument, never shell syntax
        from webdataset.gopen import gopen

        name = url.rstrip("/ -").rsplit("/", 1)[-1].split("?")[0] or "shard.tar"
        dest = self.cache_dir / f"{hashlib.sha1(url.encode()).hexdigest()[:12]}-{name}"
        if dest.is_file() and local_tar_problem(str(dest)) is None:
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")
        last = None
        for attempt in range(max(1, self.retries)):
            try:
                with gopen(url, "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                problem = local_tar_problem(str(tmp))
                if problem is None:
                    tmp.replace(dest)
                    return dest
                last = problem
            except Exception as e:        # network, subprocess and tar errors alike: retry
                last = repr(e)
            log.warning("fetching %s failed (attempt %d/%d): %s", url, attempt + 1, self.retries, last)
            if attempt + 1 < self.retries:
                time.sleep(min(30.0, 0.5 * 2 ** attempt))
        tmp.unlink(missing_ok=True)
        self._skip("bad_shard", 1, url, f"cannot fetch: {last}", count=count)
        return None

    def _index(self, tar: Path) -> tuple[Path, dict] | None:
        """(index path, report) of a current index for the tar, building one if needed."""
        cands = [index_path(tar)]
        if self.index_dir is not None:
            digest = hashlib.sha1(str(tar.resolve()).encode()).hexdigest()[:12]
            cands.append(self.index_dir / f"{tar.name[:-4] if tar.name.endswith('.tar') else tar.name}-{digest}.idx")
        for idx in cands:
            rep = read_report(tar, idx)
            if rep is not None and (rep["validated"] or not self.validate):
                return idx, rep
        target = cands[0] if os.access(tar.parent, os.W_OK) else cands[-1]
        if not os.access(target.parent, os.W_OK):
            if self.index_dir is None:
                raise PermissionError(f"cannot write an index beside {tar}: pass index_dir")
            self.index_dir.mkdir(parents=True, exist_ok=True)
        log.info("indexing %s (%s)", tar, "validating every sample" if self.validate else "structure only")
        return target, write_index(tar, target, validate=self.validate)

    def resolve_epoch(self, epoch: int, count: bool) -> tuple[list[str], list[str]]:
        """(tar paths, index paths) of this rank's readable shards for the epoch; counts what is
        left out (bad shards, samples excluded from indexes) when ``count``."""
        paths, idxs = [], []
        for url in self.epoch_shards(epoch):
            tar = self._local(url, count)
            if tar is None:
                continue
            problem = local_tar_problem(str(tar))
            if problem:
                self._skip("bad_shard", 1, str(tar), problem, count=count)
                continue
            try:
                idx, rep = self._index(tar)
            except ShardError as e:
                self._skip("bad_shard", 1, str(tar), str(e), count=count)
                continue
            if count:
                for reason, n in rep["skipped"].items():
                    self._epoch_skips[reason] += n
                if rep["skipped"]:
                    log.warning("%s: %d sample(s) left out of its index: %s", tar, sum(rep["skipped"].values()),
                                rep["skipped"])
            if rep["samples"]:
                paths.append(str(tar))
                idxs.append(str(idx))
        if not paths:
            raise RuntimeError(f"rank {self.spec.rank}: no readable sample in this epoch's shards "
                               f"{self.epoch_shards(epoch)[:5]} (skips: {dict(self._epoch_skips)})")
        return paths, idxs


class _EpochStream:
    """One epoch's pipeline for one rank, with the valid samples waiting to be batched."""

    def __init__(self, loader: DaliWebDatasetLoader):
        self.loader = ld = loader
        s = ld.spec
        self.paths, self.idxs = paths, idxs = ld.resolve_epoch(ld.epoch, count=not ld._started)
        ld._started = True
        pos = ld._position or {"checkpoint": None, "runs": 0, "target": 0, "drop": 0, "counted": False}
        self.reader_seed = _seed(s.seed, ld.epoch, s.rank, 6) % (2 ** 31 - 1)
        self.pipe = build_pipeline(
            paths, idxs, s.batch_size, global_size=s.global_size, local_size=s.local_size,
            crop_scale=s.crop_scale, n_local=s.n_local, shuffle_buffer=s.shuffle_buffer,
            seed=_seed(s.seed, ld.epoch, s.rank, 5) % (2 ** 31 - 1), reader_seed=self.reader_seed,
            device_id=ld.device.index if ld.device.type == "cuda" else None,
            num_threads=ld.num_threads, prefetch=ld.prefetch, checkpoint=pos["checkpoint"], hue_mode=ld.hue_mode)
        self.cp, self.cp_runs = pos["checkpoint"], pos["runs"]   # checkpoint and the runs it reflects
        self.run = pos["runs"]                                     # pipeline runs attempted so far
        # runs before ``target`` fed consumed batches; ``drop`` valid samples of run ``target`` too
        self.target, self.drop, self.counted = pos["target"], pos["drop"], pos["counted"]
        self.chunks: list[_Chunk] = []
        self.bad_runs = 0

    # ----------------------------------------------------------------- one pipeline run
    def _to_torch(self, tl):
        from nvidia.dali.plugin.pytorch import feed_ndarray

        t = tl.as_tensor()
        out = torch.empty(t.shape(), dtype=torch.float32, device=self.loader.device)
        stream = torch.cuda.current_stream(self.loader.device) if out.is_cuda else None
        feed_ndarray(t, out, cuda_stream=stream)
        return out

    def _pull(self) -> None:
        """Run the pipeline once and queue its valid samples (with their captions) as a chunk."""
        ld, s = self.loader, self.loader.spec
        run, cp_before, cp_before_runs = self.run, self.cp, self.cp_runs
        counted = run < self.target or (run == self.target and self.counted)   # skips already in the state
        self.run += 1
        try:
            outs = self.pipe.run()
        except RuntimeError as e:
            self.bad_runs += 1
            first = next((ln.strip() for ln in str(e).splitlines() if "failure" in ln), str(e).strip()[:200])
            where = f"a batch of rank {s.rank}, epoch {ld.epoch}"
            if not counted and ld._logs("decode_error_batch"):
                where += f" ({self._failed_samples(run)})"
            ld._skip("decode_error_batch", s.batch_size, where, f"DALI: {first}; the batch is dropped",
                     count=not counted)
            self._check_bad()
            return
        self.cp, self.cp_runs = self.pipe.checkpoint(), self.run
        if run < self.target:                         # consumed before the resume point
            return
        crops, meta = outs[:2 + s.n_local], outs[2 + s.n_local]
        n = len(meta)
        metas = [np.asarray(meta[i]).tobytes() for i in range(n)]
        infos = [meta[i].source_info() for i in range(n)]
        seeds = [_seed(s.seed, ld.epoch, s.rank, 0, 4, run * s.batch_size + i) for i in range(n)]
        tokens, reasons = ld._captions(metas, seeds)
        valid = [i for i, r in enumerate(reasons) if r is None]
        for i, r in enumerate(reasons):
            if r is not None:
                ld._skip(r[0], 1, _where(infos[i]), r[1], count=not counted)
        if not valid:
            self.bad_runs += 1
            self._check_bad()
            return
        self.bad_runs = 0
        crops_t = [self._to_torch(c) for c in crops]
        if len(valid) < n:
            sel = torch.tensor(valid, device=ld.device)
            crops_t = [c.index_select(0, sel) for c in crops_t]
        chunk = _Chunk(crops_t, tokens, [_key(infos[i]) for i in valid], run, 0, cp_before, cp_before_runs)
        if run == self.target and self.drop:
            chunk = chunk.rest(self.drop)
        if chunk.keys:
            self.chunks.append(chunk)

    def _failed_samples(self, run: int) -> str:
        """'k1, k2 in a.tar; k3 in b.tar': the samples of a failed pipeline run (the last good
        checkpoint reflects ``cp_runs`` runs)."""
        s = self.loader.spec
        try:
            infos = batch_sources(self.paths, self.idxs, s.batch_size, s.shuffle_buffer, self.reader_seed, self.cp,
                                  run + 1 - self.cp_runs)
        except Exception as e:          # naming the batch is best effort; dropping it is not
            return f"samples unknown: {type(e).__name__}"
        by_shard = {}
        for info in infos:
            by_shard.setdefault(info.rsplit(":", 2)[0], []).append(_key(info))
        return "; ".join(f"{', '.join(keys)} in {shard}" for shard, keys in by_shard.items())

    def _check_bad(self):
        if self.bad_runs >= _MAX_BAD_RUNS:
            raise RuntimeError(f"rank {self.loader.spec.rank}: {_MAX_BAD_RUNS} DALI batches in a row failed or held "
                               f"no usable sample (skips {self.loader.skipped}); is the data set or caption_mode "
                               f"wrong?")

    # ----------------------------------------------------------------- batching
    def _take(self, b: int):
        parts, need = [], b
        while need:
            ch = self.chunks[0]
            k = min(need, len(ch.keys))
            parts.append((ch.crops if k == len(ch.keys) else [c[:k] for c in ch.crops], ch.tokens[:k], ch.keys[:k]))
            need -= k
            if k == len(ch.keys):
                self.chunks.pop(0)
            else:
                self.chunks[0] = ch.rest(k)
        if len(parts) == 1:
            return parts[0]
        crops = [torch.cat([p[0][i] for p in parts]) for i in range(len(parts[0][0]))]
        return crops, torch.cat([p[1] for p in parts]), [k for p in parts for k in p[2]]

    def _position(self) -> dict:
        """Where the next batch starts (after ``_take``): a checkpoint, the runs it reflects, the run
        to resume in and how many of that run's valid samples are already used."""
        if not self.chunks:
            return {"checkpoint": self.cp, "runs": self.cp_runs, "target": self.run, "drop": 0, "counted": False}
        ch = self.chunks[0]            # waiting samples all come from the last run: it completed the batch
        return {"checkpoint": ch.cp_before, "runs": ch.cp_before_runs, "target": ch.run, "drop": ch.used,
                "counted": True}

    def next_batch(self):
        ld, b = self.loader, self.loader.spec.batch_size
        while True:
            while sum(len(c.keys) for c in self.chunks) < b:
                self._pull()
            crops, tokens, keys = self._take(b)
            if ld._discard > 0:                    # replaying consumed batches (resume without checkpoint)
                ld._discard -= 1
                continue
            batch = {"crops": crops, "captions": tokens.transpose(0, 1).reshape(-1, tokens.shape[-1]),
                     "keys": keys}
            return batch, self._position()


def _where(info: str) -> str:
    """'path.tar:offset:key.json' → 'key in path.tar'."""
    parts = info.rsplit(":", 2)
    return f"{_key(info)} in {parts[0]}" if len(parts) == 3 else info


def _key(info: str) -> str:
    name = info.rsplit(":", 1)[-1]
    return name[:-5] if name.endswith(".json") else name
