"""One COSMOS crop as torchvision makes it from a PIL image, bit for bit, in one Numba kernel.

The torchvision backend builds every crop with PIL (cosmos_method.md §4.4): ``crop`` + ``resize``
(bicubic), ``hflip``, ``ColorJitter`` (brightness, contrast, saturation, hue in a random order),
``RandomGrayscale``, PIL ``GaussianBlur``, ``RandomSolarize``, ``ToTensor`` + ``Normalize``. This module
re-implements each of Pillow's integer algorithms with the same arithmetic (the same float/double
evaluation, fixed-point precision, truncation and rounding), so that from the same decoded image and
the same random parameters the result is *equal* to torchvision's, not close to it:

* resize: Pillow's separable two-pass resampling (``Resample.c``): bicubic a = −0.5, support scaled
  by the reduction factor (antialiasing), coefficients normalised and rounded to 22-bit fixed point,
  the horizontal pass on the rows the vertical pass needs, then the vertical pass — or, as Pillow 13
  does when the height shrinks much more than the width, vertical first;
* brightness / contrast / saturation: ``ImageEnhance`` = ``Image.blend`` of the image with black, with
  the rounded mean luma, with its own luma; float32 blend, truncated (clipped when extrapolating);
* luma (``convert("L")``, also grayscale): (19595 R + 38470 G + 7471 B + 2^15) >> 16;
* hue: :mod:`.pil_hue` (Pillow's 8-bit HSV round trip);
* Gaussian blur: Pillow's approximation by 3 box blurs per axis (``BoxBlur.c``): the radius → box
  radius formula in float32, fractional edge weights in 24-bit fixed point, edge pixels repeated;
* solarize (threshold 128), then x / 255, − mean, / std in float32 (``ToTensor`` + ``Normalize``).

A horizontal flip commutes with every step after the resize (all are pointwise or mirror-symmetric),
so it is applied when the output is written. The DALI CPU pipeline calls :func:`dali_crop` once per crop
(decoded image + a parameter vector, :data:`PARAM_FIELDS`) — one pass over the crop window and a few
over the crop instead of a dozen DALI operators. :func:`augment_crop` runs the kernel on a numpy image;
:func:`reference_crop` makes the same crop with torchvision's functions (the tests' and benchmark's
reference).

Needs numba (optional: :func:`cosmos_fast.data.pil_hue.available`).
"""
from __future__ import annotations

import functools
import itertools

import numpy as np
import PIL

from . import pil_hue
from .normalize import OPENAI_MEAN, OPENAI_STD

# the random parameters of one crop, in the order of the kernel's parameter vector
PARAM_FIELDS = ("y0", "x0", "h", "w", "flip", "jitter", "brightness", "contrast", "saturation", "hue", "order",
                "gray", "blur", "radius", "solarize")
# Pillow 13 resizes vertically first when the height shrinks much more than the width (PR #9549)
VERTICAL_FIRST = int(PIL.__version__.split(".")[0]) >= 13
# torchvision ColorJitter applies its four ops in the order of torch.randperm(4): one of 24
JITTER_ORDERS = np.array(list(itertools.permutations(range(4))), dtype=np.int64)
ORDER_INDEX = {tuple(o): i for i, o in enumerate(JITTER_ORDERS.tolist())}


def kernels():
    """``(augment, coeffs, box_radius)`` (:mod:`._pil_kernels`): ``augment(out, img, params, mean, std,
    hue_tables, JITTER_ORDERS, VERTICAL_FIRST)`` writes the normalised CHW float32 crop of side
    ``out.shape[1]`` from the flat (H, W·3) uint8 image ``img``."""
    from . import _pil_kernels as k

    return k.augment, k.coeffs, k.box_radius


def augment_crop(img: np.ndarray, params, size: int) -> np.ndarray:
    """The kernel on one decoded HWC uint8 RGB image: ``params`` as :data:`PARAM_FIELDS` → the normalised
    (3, size, size) float32 crop, equal to torchvision's from ``Image.fromarray(img)``."""
    img = np.ascontiguousarray(img, dtype=np.uint8)
    p = np.asarray(params, dtype=np.float32).reshape(-1)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"img must be an HWC RGB image, got shape {img.shape}")
    if p.size != len(PARAM_FIELDS):
        raise ValueError(f"params must hold {len(PARAM_FIELDS)} values {PARAM_FIELDS}, got {p.size}")
    y0, x0, h, w = (int(v) for v in p[:4])
    if min(y0, x0) < 0 or h < 1 or w < 1 or y0 + h > img.shape[0] or x0 + w > img.shape[1]:
        raise ValueError(f"crop window y0={y0} x0={x0} h={h} w={w} is not inside the {img.shape[:2]} image")
    out = np.empty((3, size, size), dtype=np.float32)
    kernels()[0](out, img.reshape(img.shape[0], -1), p, np.asarray(OPENAI_MEAN, dtype=np.float32),
                 np.asarray(OPENAI_STD, dtype=np.float32), pil_hue.tables(), JITTER_ORDERS, VERTICAL_FIRST)
    return out


def reference_crop(img, params, size: int) -> np.ndarray:
    """The same crop made by torchvision's own functions, one by one (what ``MultiCropTransform`` calls):
    the reference the kernel is tested and benchmarked against. ``img``: a PIL RGB image or an HWC uint8
    array; ``params``: a mapping with the :data:`PARAM_FIELDS` names or a vector in that order."""
    import torchvision.transforms.functional as TF
    from PIL import Image, ImageFilter
    from torchvision.transforms import InterpolationMode

    p = params if isinstance(params, dict) else dict(zip(PARAM_FIELDS, np.asarray(params, dtype=np.float32).tolist()))
    img = Image.fromarray(np.asarray(img, dtype=np.uint8)) if not isinstance(img, Image.Image) else img
    out = TF.resized_crop(img, int(p["y0"]), int(p["x0"]), int(p["h"]), int(p["w"]), [size, size],
                          InterpolationMode.BICUBIC)
    if p["flip"]:
        out = TF.hflip(out)
    if p["jitter"]:
        ops = ((TF.adjust_brightness, "brightness"), (TF.adjust_contrast, "contrast"),
               (TF.adjust_saturation, "saturation"), (TF.adjust_hue, "hue"))
        for k in JITTER_ORDERS[int(p["order"])]:
            fn, name = ops[k]
            out = fn(out, float(p[name]))
    if p["gray"]:
        out = TF.rgb_to_grayscale(out, 3)
    if p["blur"]:
        out = out.filter(ImageFilter.GaussianBlur(radius=float(p["radius"])))
    if p["solarize"]:
        out = TF.solarize(out, 128)
    return TF.normalize(TF.to_tensor(out), OPENAI_MEAN, OPENAI_STD).numpy()


@functools.lru_cache(maxsize=None)
def dali_op():
    """The DALI CPU operator (a ``NumbaFunction``, one object per process: building it links the
    kernel, a few seconds, once). Inputs: a marker whose length is the crop size, the decoded HWC
    uint8 image and the float32 parameter vector of one crop (:data:`PARAM_FIELDS`); output: the
    normalised (3, size, size) float32 crop. DALI sizes outputs from the shapes of the *first* input
    only (``setup_fn`` sees no other), hence the marker first. DALI calls it per sample on its worker
    threads. Use :func:`dali_crop`."""
    from nvidia.dali import types
    from nvidia.dali.plugin.numba import NumbaFunction

    augment = kernels()[0]
    mean = np.asarray(OPENAI_MEAN, dtype=np.float32)
    std = np.asarray(OPENAI_STD, dtype=np.float32)
    hue_t, sat_t, sector_t, frac_t, fs_t = pil_hue.tables()
    orders, vertical_first = JITTER_ORDERS, VERTICAL_FIRST

    def run_fn(out0, in0, in1, in2):
        augment(out0, in1.reshape(in1.shape[0], in1.shape[1] * 3), in2, mean, std,
                (hue_t, sat_t, sector_t, frac_t, fs_t), orders, vertical_first)

    def setup_fn(outs, ins):
        for i in range(len(outs[0])):
            outs[0][i][0] = 3
            outs[0][i][1] = ins[0][i][0]
            outs[0][i][2] = ins[0][i][0]

    return NumbaFunction(device="cpu", run_fn=run_fn, setup_fn=setup_fn, out_types=[types.FLOAT],
                         in_types=[types.UINT8, types.UINT8, types.FLOAT], outs_ndim=[3], ins_ndim=[1, 3, 1],
                         batch_processing=False)


def dali_crop(images, params, size: int):
    """In a DALI pipeline: the (3, size, size) crops of ``images`` (decoded HWC uint8) described by
    ``params`` (per-sample float32 vectors of :data:`PARAM_FIELDS`), CHW layout."""
    from nvidia.dali import fn, types

    marker = fn.constant(idata=[0] * size, shape=[size], dtype=types.UINT8)
    return fn.reshape(dali_op()(marker, images, params), layout="CHW")
