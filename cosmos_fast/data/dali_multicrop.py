"""The DALI operator graph of the COSMOS multi-crop pipeline (the recipe of :mod:`.recipe`):
:func:`build_pipeline` (reader → decoder → :func:`multicrop_graph`) and :func:`batch_sources` (a
reader-only pipeline that names the samples of a failed batch). The crops are made either by one fused
Numba operator per crop (CPU: equal to torchvision's crops bit for bit) or by DALI operators close
to PIL's; ``cosmos_fast/data/README.md`` compares each op with PIL.

``nvidia.dali`` is imported inside the functions: DALI is optional, and :mod:`.dali_loader` (which
imports this module) must import without it.
"""
from __future__ import annotations

import logging

from ..ops import multicrop as multicrop_op
from . import recipe
from .stream import IMAGE_KEYS

log = logging.getLogger(__name__)

HUE_MODES = ("exact", "float", "linear")      # DaliWebDatasetLoader(hue_mode=...)
_WARNED_NO_NUMBA: list = []


def resolve_hue_mode(hue_mode: str, gpu: bool) -> str:
    """How the crops are made: ``numba`` (CPU, numba: one fused Numba operator per crop that equals
    torchvision's PIL pipeline bit for bit, :mod:`cosmos_fast.ops.multicrop`), or the DALI operator graph
    with the hue shift as ``float`` (HSV shift in DALI arithmetic: PIL's 8-bit HSV rounding is the
    difference) or ``linear`` (``fn.hsv``). ``exact`` is ``numba`` on DALI's CPU backend when numba
    imports, ``float`` otherwise (the GPU, or no numba: then a warning, once)."""
    if hue_mode not in HUE_MODES:
        raise ValueError(f"hue_mode must be one of {HUE_MODES}, got {hue_mode!r}")
    if hue_mode != "exact":
        return hue_mode
    if not gpu and multicrop_op.numba_available():
        return "numba"
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

    params = {op: fn.random.uniform(range=list(recipe.jitter_range(op)))
              for op in ("brightness", "contrast", "saturation", "hue")}
    params["order"] = fn.cast(fn.random.uniform(values=[float(i) for i in range(len(recipe.JITTER_ORDERS))]),
                              dtype=types.INT32)
    return params


def _color_jitter(img, params: dict, gpu: bool, hue_mode: str = "float"):
    """ColorJitter(0.4, 0.4, 0.2, 0.1) of the operator graph, with torchvision's random order of the four
    ops: slot k applies op ``recipe.JITTER_ORDERS[order][k]`` (0 brightness, 1 contrast, 2 saturation, 3 hue).

    The hue shift is ``fn.hsv`` (a rotation about the gray axis, which only approximates it) for
    ``hue_mode="linear"``, else the float HSV shift (~60 elementwise ops; PIL's 8-bit HSV rounding is
    the difference). The exact CPU path does not use this graph (:mod:`cosmos_fast.ops.multicrop`)."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    # torchvision adds int8(hue · 255) to PIL's 8-bit H channel (256 steps per turn)
    steps = params["hue"] * 255.0
    whole = dmath.floor(dmath.abs(steps)) * ((steps >= 0) * 2 - 1)           # int8(): toward zero
    turns = whole / 256.0

    def hue_op(x):
        return fn.hsv(x, hue=turns * 360.0) if hue_mode == "linear" else _hue(x, turns, gpu)

    for slot in range(4):
        op = fn.lookup_table(params["order"], keys=list(range(len(recipe.JITTER_ORDERS))),
                             values=[float(o[slot]) for o in recipe.JITTER_ORDERS], dtype=types.INT32)
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
    return fn.cast(x + (x >= recipe.SOLARIZE_THRESHOLD) * (255 - 2 * x), dtype=types.UINT8)


# per-crop random parameters returned by ``build_pipeline(debug=True)``, in this order: the fused
# kernel's parameter vector (the blur radius is PIL's radius, DALI's sigma), then the image size
DEBUG_FIELDS = recipe.PARAM_FIELDS + ("img_h", "img_w")


def _one_crop(images, shape, crop: recipe.Crop, gpu: bool, hue_mode: str = "exact", debug: bool = False):
    """One crop of §4.4 from decoded HWC uint8 images whose (H, W, C) is ``shape``.

    The random parameters are drawn here, per crop, by DALI's random operators. With the ``numba`` hue
    implementation (CPU) one fused operator (:mod:`cosmos_fast.ops.multicrop`) makes the whole crop from
    them exactly as torchvision does; otherwise each op is a DALI operator, gated by DALI conditionals."""
    from nvidia.dali import fn, types

    size = crop.size
    # torchvision RandomResizedCrop: area ~ U(area)·H·W, ratio log-uniform, 10 tries, then a fallback
    anchor, extent = fn.random_crop_generator(shape, random_area=list(crop.scale), num_attempts=10,
                                              random_aspect_ratio=list(recipe.RATIO))
    jitter, gray = _coin(recipe.JITTER_P), _coin(recipe.GRAY_P)
    blur = _coin(crop.blur_p) if crop.blur_p < 1.0 else None
    solar = _coin(crop.solarize_p) if crop.solarize_p > 0 else None
    flip = fn.random.coin_flip(probability=recipe.FLIP_P)
    sigma = fn.random.uniform(range=list(recipe.BLUR_RADIUS))   # PIL GaussianBlur radius = standard deviation
    jitter_params = _jitter_params()

    def vec(x):
        return fn.reshape(fn.cast(x, dtype=types.FLOAT), shape=[-1])

    always, never = flip * 0 + 1, flip * 0               # per-sample constants for ops without a coin
    fused = resolve_hue_mode(hue_mode, gpu) == "numba"
    params = None
    if fused or debug:                                    # the crop's parameters in PARAM_FIELDS order
        params = fn.cat(vec(anchor), vec(extent), vec(flip), vec(jitter),
                        *[vec(jitter_params[k]) for k in ("brightness", "contrast", "saturation", "hue", "order")],
                        vec(gray), vec(always if blur is None else blur), vec(sigma),
                        vec(never if solar is None else solar))
    if fused:
        out = multicrop_op.dali_crop(images, params, size)
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
                                       mean=[255.0 * m for m in recipe.MEAN], std=[255.0 * s for s in recipe.STD])
    if not debug:
        return out, None
    return out, fn.cat(params, vec(shape[0:2]))                           # DEBUG_FIELDS


def multicrop_graph(encoded, images, global_size: int, local_size: int, crop_scale: float, n_local: int,
                    gpu: bool, hue_mode: str = "exact", debug: bool = False):
    """Decoded HWC uint8 images → ([global 1, global 2, local × n_local], debug params), §4.4."""
    from nvidia.dali import fn

    kinds = recipe.crops(global_size, local_size, crop_scale, n_local)
    shape = fn.peek_image_shape(encoded, adjust_orientation=False)
    if hue_mode not in HUE_MODES:
        raise ValueError(f"hue_mode must be one of {HUE_MODES}, got {hue_mode!r}")
    crops = [_one_crop(images, shape, k, gpu=gpu, hue_mode=hue_mode, debug=debug) for k in kinds]
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
