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
so it is applied when the output is written. The DALI CPU pipeline calls :func:`dali_op` once per crop
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
from .transforms import OPENAI_MEAN, OPENAI_STD

# the random parameters of one crop, in the order of the kernel's parameter vector
PARAM_FIELDS = ("y0", "x0", "h", "w", "flip", "jitter", "brightness", "contrast", "saturation", "hue", "order",
                "gray", "blur", "radius", "solarize")
# Pillow 13 resizes vertically first when the height shrinks much more than the width (PR #9549)
VERTICAL_FIRST = int(PIL.__version__.split(".")[0]) >= 13
# torchvision ColorJitter applies its four ops in the order of torch.randperm(4): one of 24
JITTER_ORDERS = np.array(list(itertools.permutations(range(4))), dtype=np.int64)


@functools.lru_cache(maxsize=None)
def kernels():
    """``(augment, coeffs, box_radius)``: ``augment(out, img, params, mean, std, hue_tables)`` writes the
    normalised CHW float32 crop of side ``out.shape[1]`` from the flat (H, W·3) uint8 image ``img``."""
    from numba import njit

    shift_flat = pil_hue.kernels()[1]
    vertical_first = VERTICAL_FIRST
    orders = JITTER_ORDERS
    f32 = np.float32

    # ---------------------------------------------------------------- resize (Resample.c)
    @njit(cache=False)
    def bicubic(x):
        if x < 0.0:
            x = -x
        if x < 1.0:
            return (1.5 * x - 2.5) * x * x + 1.0
        if x < 2.0:
            return (((x - 5.0) * x + 8.0) * x - 4.0) * -0.5
        return 0.0

    @njit(cache=False)
    def coeffs(in_size, out_size):
        """Fixed-point filter taps for resampling [0, in_size) onto out_size pixels."""
        scale = np.float64(f32(in_size)) / out_size
        filterscale = max(scale, 1.0)
        support = 2.0 * filterscale
        ksize = int(np.ceil(support)) * 2 + 1
        bounds = np.empty((out_size, 2), dtype=np.int64)
        kk = np.zeros((out_size, ksize), dtype=np.float64)
        w = np.empty(ksize, dtype=np.float64)
        inv = 1.0 / filterscale
        for xx in range(out_size):
            center = (xx + 0.5) * scale
            xmin = int(center - support + 0.5)
            if xmin < 0:
                xmin = 0
            xmax = int(center + support + 0.5)
            if xmax > in_size:
                xmax = in_size
            xmax -= xmin
            total = 0.0
            for x in range(xmax):
                w[x] = bicubic((x + xmin - center + 0.5) * inv)
                total += w[x]
            for x in range(xmax):
                w[x] = w[x] / total if total != 0.0 else w[x]
                kk[xx, x] = w[x]
            bounds[xx, 0] = xmin
            bounds[xx, 1] = xmax
        bits = 22                     # Pillow's PRECISION_BITS for 8-bit images
        taps = np.zeros((out_size, ksize), dtype=np.int64)
        for xx in range(out_size):
            for x in range(ksize):
                k = kk[xx, x]
                taps[xx, x] = int(-0.5 + k * (1 << bits)) if k < 0 else int(0.5 + k * (1 << bits))
        return bounds, taps, bits

    @njit(cache=False)
    def conv_rows(src, r0, c0, width, bounds, taps, bits):
        """Resample along axis 0: output row i = Σ_t taps[i, t] · src[r0 + bounds[i, 0] + t, c0:c0 + width],
        rounded, >> bits, clipped to [0, 255]. Every row is one vector operation over its values."""
        n = bounds.shape[0]
        out = np.empty((n, width), dtype=np.uint8)
        acc = np.empty(width, dtype=np.int32)
        half = np.int32(1 << (bits - 1))
        for i in range(n):
            acc[:] = half
            start = r0 + bounds[i, 0]
            for t in range(bounds[i, 1]):
                k = np.int32(taps[i, t])
                row = src[start + t]
                for j in range(width):
                    acc[j] += np.int32(row[c0 + j]) * k
            o = out[i]
            for j in range(width):
                v = acc[j] >> bits
                o[j] = 0 if v < 0 else (255 if v > 255 else v)
        return out

    @njit(cache=False)
    def transpose(src, r0, rows, c0, cols):
        """src[r0:r0 + rows, (c0:c0 + cols) pixels] (rows, cols·3) → (cols, rows·3), pixels kept whole."""
        out = np.empty((cols, rows * 3), dtype=np.uint8)
        for y in range(rows):
            row = src[r0 + y]
            for x in range(cols):
                j = (c0 + x) * 3
                out[x, y * 3] = row[j]
                out[x, y * 3 + 1] = row[j + 1]
                out[x, y * 3 + 2] = row[j + 2]
        return out

    @njit(cache=False)
    def resize(img, y0, x0, h, w, size):
        """PIL ``img.crop((x0, y0, x0 + w, y0 + h)).resize((size, size), BICUBIC)`` on the flat image
        ``img`` (H, W·3) → (size, size·3) uint8. Horizontal passes run on the transposed window.

        Pillow skips a pass whose size is unchanged, and runs the horizontal pass first (only on the
        rows the vertical one reads) unless ``VERTICAL_FIRST`` (Pillow ≥ 13) and the height shrinks by
        more than twice as many pixels as the width: h − size > 2 (w − size) with h > size."""
        ybounds, ytaps, ybits = coeffs(h, size)
        if w == size:
            if h == size:
                return img[y0:y0 + size, x0 * 3:(x0 + size) * 3].copy()
            return conv_rows(img, y0, x0 * 3, size * 3, ybounds, ytaps, ybits)
        xbounds, xtaps, xbits = coeffs(w, size)
        if h != size and vertical_first and h > size and h - size > 2 * (w - size):
            tmp = conv_rows(img, y0, x0 * 3, w * 3, ybounds, ytaps, ybits)            # (size, w·3)
            t = conv_rows(transpose(tmp, 0, size, 0, w), 0, 0, size * 3, xbounds, xtaps, xbits)
            return transpose(t, 0, size, 0, size)
        first = ybounds[0, 0]
        rows = ybounds[size - 1, 0] + ybounds[size - 1, 1] - first
        t = conv_rows(transpose(img, y0 + first, rows, x0, w), 0, 0, rows * 3, xbounds, xtaps, xbits)
        tmp = transpose(t, 0, size, 0, rows)                                            # (rows, size·3)
        if h == size:
            return tmp
        return conv_rows(tmp, -first, 0, size * 3, ybounds, ytaps, ybits)

    # ---------------------------------------------------------------- colour (Blend.c, Convert.c)
    # ``a`` is the crop as a flat (size, size·3) uint8 array; ``v`` = a.reshape(-1)
    @njit(cache=False)
    def blend(base, x, alpha):
        """Image.blend(base, x, alpha) for one value: float32, truncated, clipped."""
        t = f32(base) + alpha * f32(x - base)
        return 0 if t <= 0.0 else (255 if t >= 255.0 else np.int32(t))

    @njit(cache=False)
    def luma(r, g, b):
        return (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16

    @njit(cache=False)
    def brightness(v, alpha):
        for j in range(v.size):
            v[j] = blend(np.int32(0), np.int32(v[j]), alpha)

    @njit(cache=False)
    def contrast(v, alpha):
        total = 0
        for j in range(0, v.size, 3):
            total += luma(np.int32(v[j]), np.int32(v[j + 1]), np.int32(v[j + 2]))
        mean = np.int32(int(total / (v.size // 3) + 0.5))
        for j in range(v.size):
            v[j] = blend(mean, np.int32(v[j]), alpha)

    @njit(cache=False)
    def saturation(v, alpha):
        for j in range(0, v.size, 3):
            g = luma(np.int32(v[j]), np.int32(v[j + 1]), np.int32(v[j + 2]))
            v[j] = blend(g, np.int32(v[j]), alpha)
            v[j + 1] = blend(g, np.int32(v[j + 1]), alpha)
            v[j + 2] = blend(g, np.int32(v[j + 2]), alpha)

    @njit(cache=False)
    def hue(v, shift, tables):
        shift_flat(v, shift, tables)

    @njit(cache=False)
    def grayscale(v):
        for j in range(0, v.size, 3):
            g = luma(np.int32(v[j]), np.int32(v[j + 1]), np.int32(v[j + 2]))
            v[j] = g
            v[j + 1] = g
            v[j + 2] = g

    # ---------------------------------------------------------------- Gaussian blur (BoxBlur.c)
    @njit(cache=False)
    def box_radius(radius):
        """Pillow's _gaussian_blur_radius(radius, 3): the box radius whose 3 passes have variance r²."""
        sigma2 = f32(f32(radius * radius) / f32(3.0))
        big_l = f32(np.sqrt(12.0 * np.float64(sigma2) + 1.0))
        small_l = f32(np.floor((np.float64(big_l) - 1.0) / 2.0))
        a = f32(f32(f32(2.0) * small_l + f32(1.0)) * f32(small_l * f32(small_l + f32(1.0)) - f32(3.0) * sigma2))
        a = f32(a / f32(f32(6.0) * f32(sigma2 - f32(small_l + f32(1.0)) * f32(small_l + f32(1.0)))))
        return f32(small_l + a)

    @njit(cache=False)
    def box_pass(src, out, radius, ww, fw):
        """One box pass along axis 0 of ``src`` (n, L) into ``out``, for all L columns at once: a running
        sum of 2·radius + 1 values plus the two next ones with the fractional weight, edge values
        repeated (Pillow's line loop; its three ranges folded into the leaving and entering index)."""
        n, width = src.shape
        last = n - 1
        edge_a = min(radius + 1, n)
        edge_b = max(last - radius, 0)
        acc = np.empty(width, dtype=np.int64)
        for j in range(width):
            acc[j] = np.int64(src[0, j]) * (radius + 1) + np.int64(src[last, j]) * (radius - edge_a + 1)
        for x in range(edge_a - 1):
            for j in range(width):
                acc[j] += src[x, j]
        for x in range(n):
            leave = 0 if x < edge_a else x - radius - 1
            if x < edge_b:
                enter, far = x + radius, x + radius + 1
            else:
                enter, far = last, last
            rl, re, rf, o = src[leave], src[enter], src[far], out[x]
            for j in range(width):
                acc[j] += np.int64(re[j]) - np.int64(rl[j])
                o[j] = (acc[j] * ww + (np.int64(rl[j]) + np.int64(rf[j])) * fw + (1 << 23)) >> 24

    @njit(cache=False)
    def box_passes(a, radius, ww, fw):
        """Three box passes along axis 0 of ``a``, in place."""
        b = np.empty_like(a)
        box_pass(a, b, radius, ww, fw)
        box_pass(b, a, radius, ww, fw)
        box_pass(a, b, radius, ww, fw)
        a[:] = b

    @njit(cache=False)
    def gaussian_blur(a, radius):
        """PIL GaussianBlur(radius) on the flat crop (n, m·3): 3 horizontal box passes, then 3 vertical."""
        fr = box_radius(f32(radius))
        r = int(fr)
        ww = np.int64(f32(16777216.0) / f32(fr * f32(2.0) + f32(1.0)))
        fw = (16777216 - (2 * r + 1) * ww) // 2
        n = a.shape[0]
        m = a.shape[1] // 3
        t = transpose(a, 0, n, 0, m)
        box_passes(t, r, ww, fw)
        a[:] = transpose(t, 0, m, 0, n)
        box_passes(a, r, ww, fw)

    # ---------------------------------------------------------------- the crop
    @njit(cache=False)
    def augment(out, img, p, mean, std, tables):
        """``out`` (3, S, S) float32 ← the crop of the flat HWC uint8 image ``img`` (H, W·3) described by
        the parameter vector ``p`` (:data:`PARAM_FIELDS`)."""
        size = out.shape[1]
        a = resize(img, int(p[0]), int(p[1]), int(p[2]), int(p[3]), size)
        v = a.reshape(-1)
        if p[5] != 0:
            shift = int(np.float64(p[9]) * 255.0) & 255       # torchvision: uint8(int32(hue · 255))
            order = orders[int(p[10])]
            for slot in range(4):
                op = order[slot]
                if op == 0:
                    brightness(v, p[6])
                elif op == 1:
                    contrast(v, p[7])
                elif op == 2:
                    saturation(v, p[8])
                else:                                          # PIL's HSV round trip even for 0
                    hue(v, shift, tables)
        if p[11] != 0:
            grayscale(v)
        if p[12] != 0:
            gaussian_blur(a, p[13])
        solarize = p[14] != 0
        flip = p[4] != 0
        for c in range(3):
            # torchvision: x / 255 (float32), then (x - mean) / std, each step rounded to float32
            for y in range(size):
                for x in range(size):
                    q = a[y, (size - 1 - x if flip else x) * 3 + c]
                    if solarize and q >= 128:
                        q = 255 - q
                    out[c, y, x] = (f32(q) / f32(255.0) - mean[c]) / std[c]

    return augment, coeffs, box_radius


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
                 np.asarray(OPENAI_STD, dtype=np.float32), pil_hue.tables())
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
def dali_op(size: int):
    """A DALI CPU operator (``NumbaFunction``, one object per process and crop size, so its kernel
    compiles once): inputs the decoded HWC uint8 image and the float32 parameter vector of one crop
    (:data:`PARAM_FIELDS`), output the normalised (3, size, size) float32 crop. DALI calls it per
    sample on its worker threads."""
    from nvidia.dali import types
    from nvidia.dali.plugin.numba import NumbaFunction

    augment = kernels()[0]
    mean = np.asarray(OPENAI_MEAN, dtype=np.float32)
    std = np.asarray(OPENAI_STD, dtype=np.float32)
    hue_t, sat_t, sector_t, frac_t, fs_t = pil_hue.tables()

    def run_fn(out0, in0, in1):
        augment(out0, in0.reshape(in0.shape[0], in0.shape[1] * 3), in1, mean, std,
                (hue_t, sat_t, sector_t, frac_t, fs_t))

    def setup_fn(outs, ins):
        for i in range(len(outs[0])):
            outs[0][i][0] = 3
            outs[0][i][1] = size
            outs[0][i][2] = size

    return NumbaFunction(device="cpu", run_fn=run_fn, setup_fn=setup_fn, out_types=[types.FLOAT],
                         in_types=[types.UINT8, types.FLOAT], outs_ndim=[3], ins_ndim=[3, 1],
                         batch_processing=False)
