"""The multicrop op: one COSMOS crop (cosmos_method.md §4.4) as torchvision makes it from a PIL
image, bit for bit, in one Numba kernel (``kernels/multicrop.py``).

torchvision builds every crop with PIL: ``crop`` + ``resize`` (bicubic), ``hflip``, ``ColorJitter``
(brightness, contrast, saturation, hue in a random order), ``RandomGrayscale``, PIL ``GaussianBlur``,
``RandomSolarize``, ``ToTensor`` + ``Normalize``. The kernel re-implements each of Pillow's integer
algorithms with the same arithmetic (the same float/double evaluation, fixed-point precision,
truncation and rounding), so that from the same decoded image and the same random parameters the
result is *equal* to torchvision's, not close to it:

* resize: Pillow's separable two-pass resampling (``Resample.c``): bicubic a = −0.5, support scaled
  by the reduction factor (antialiasing), coefficients normalised and rounded to 22-bit fixed point,
  the horizontal pass on the rows the vertical pass needs, then the vertical pass — or, as Pillow 13
  does when the height shrinks much more than the width, vertical first;
* brightness / contrast / saturation: ``ImageEnhance`` = ``Image.blend`` of the image with black, with
  the rounded mean luma, with its own luma; float32 blend, truncated (clipped when extrapolating);
* luma (``convert("L")``, also grayscale): (19595 R + 38470 G + 7471 B + 2^15) >> 16;
* hue: Pillow's 8-bit HSV round trip (``rgb2hsv_row`` / ``hsv2rgb`` of libImaging/Convert.c) with
  torchvision's shift ``uint8(int32(hue · 255))``, from lookup tables (:func:`hue_tables`), so that no
  division is left per pixel; equal to PIL for every RGB colour (tests/test_multicrop.py checks all 2^24);
* Gaussian blur: Pillow's approximation by 3 box blurs per axis (``BoxBlur.c``): the radius → box
  radius formula in float32, fractional edge weights in 24-bit fixed point, edge pixels repeated;
* solarize (threshold 128), then x / 255, − mean, / std in float32 (``ToTensor`` + ``Normalize``).

A horizontal flip commutes with every step after the resize (all are pointwise or mirror-symmetric),
so it is applied when the output is written. Entry points: :func:`augment_crop` (a numpy image, used
by the torchvision backend's ``data.augment: fused``) and :func:`dali_crop` (one DALI CPU operator per
crop: decoded image + a parameter vector, :data:`~cosmos_fast.data.recipe.PARAM_FIELDS`). The
reference is :func:`cosmos_fast.reference.multicrop.reference_crop` (torchvision's own functions).

Numba is optional (:func:`numba_available`); without it the torchvision backend uses torchvision's
PIL ops and the DALI CPU pipeline its operator graph.
"""
from __future__ import annotations

import functools

import numpy as np
import PIL

from ..data.normalize import OPENAI_MEAN, OPENAI_STD
from ..data.recipe import JITTER_ORDERS, PARAM_FIELDS

# Pillow 13 resizes vertically first when the height shrinks much more than the width (PR #9549)
VERTICAL_FIRST = int(PIL.__version__.split(".")[0]) >= 13
# the 24 jitter orders as the kernel reads them (an argument, so a cached compilation never goes stale)
JITTER_ORDER_ARRAY = np.array(JITTER_ORDERS, dtype=np.int64)


@functools.lru_cache(maxsize=None)
def numba_available() -> bool:
    """Whether numba imports (the kernel's only optional dependency)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def kernels():
    """The kernel module ``cosmos_fast.kernels.multicrop`` (imported here, lazily: it needs numba).

    ``augment(out, img, params, mean, std, hue_tables, JITTER_ORDER_ARRAY, VERTICAL_FIRST)`` writes the
    normalised CHW float32 crop of side ``out.shape[1]`` from the flat (H, W·3) uint8 image ``img``.
    ``shift_pixel(r, g, b, shift)`` is Pillow's hue arithmetic step by step (the hue reference);
    ``shift_flat(v, shift, tables)`` gives the same result in place on a flat RGB array from lookup
    tables: the 8-bit hue of a colour depends only on which channel is the largest and on the other
    two channels' distances to it, its saturation only on (max, max − min), and the conversion back
    needs the sector, fraction and saturation as floats. ``shift_image(out, img, shift, tables)`` runs
    it on a C-contiguous HWC image."""
    from ..kernels import multicrop   # lazy: imports numba (optional)

    return multicrop


@functools.lru_cache(maxsize=None)
def hue_tables():
    """The lookup tables of ``shift_flat`` (~260 KB, built once per process)."""
    return kernels().build_tables()


def adjust_hue(img: np.ndarray, shift: int) -> np.ndarray:
    """torchvision's ``adjust_hue`` on one HWC uint8 array, given the uint8 shift ``uint8(int32(h · 255))``."""
    out = np.empty_like(img)
    kernels().shift_image(out, np.ascontiguousarray(img, dtype=np.uint8), int(shift) & 255, hue_tables())
    return out


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
    kernels().augment(out, img.reshape(img.shape[0], -1), p, np.asarray(OPENAI_MEAN, dtype=np.float32),
                      np.asarray(OPENAI_STD, dtype=np.float32), hue_tables(), JITTER_ORDER_ARRAY, VERTICAL_FIRST)
    return out


@functools.lru_cache(maxsize=None)
def dali_op():
    """The DALI CPU operator (a ``NumbaFunction``, one object per process: building it links the
    kernel, once). Inputs: a marker whose length is the crop size, the decoded HWC uint8 image and the
    float32 parameter vector of one crop (:data:`PARAM_FIELDS`); output: the normalised (3, size, size)
    float32 crop. DALI sizes outputs from the shapes of the *first* input only (``setup_fn`` sees no
    other), hence the marker first. DALI calls it per sample on its worker threads. Use :func:`dali_crop`."""
    from nvidia.dali import types   # lazy: DALI is optional
    from nvidia.dali.plugin.numba import NumbaFunction

    augment = kernels().augment
    mean = np.asarray(OPENAI_MEAN, dtype=np.float32)
    std = np.asarray(OPENAI_STD, dtype=np.float32)
    hue_t, sat_t, sector_t, frac_t, fs_t = hue_tables()
    orders, vertical_first = JITTER_ORDER_ARRAY, VERTICAL_FIRST

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
    from nvidia.dali import fn, types   # lazy: DALI is optional

    marker = fn.constant(idata=[0] * size, shape=[size], dtype=types.UINT8)
    return fn.reshape(dali_op()(marker, images, params), layout="CHW")
