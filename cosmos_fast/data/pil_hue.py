"""torchvision's ``adjust_hue`` on a PIL image, bit for bit, as a Numba kernel for DALI's CPU backend.

torchvision (PIL input) converts RGB to PIL's 8-bit HSV, adds ``uint8(int8(hue · 255))`` to H modulo
256 and converts back. This module reproduces Pillow's two conversions (``rgb2hsv_row`` and
``hsv2rgb`` of libImaging/Convert.c) with the same float/double evaluation order, truncations and
round-half-away-from-zero, so the result equals PIL's for every RGB colour and every shift (tested
on all 2^24 colours). It runs one pass per pixel (~20 ns per pixel on one core) where the DALI
arithmetic version needs ~60 elementwise passes and differs from PIL by PIL's 8-bit rounding.

Numba is optional: :func:`available` says whether it imports; without it the DALI graph falls back
to the arithmetic hue (``hue_mode="float"``).
"""
from __future__ import annotations

import functools
import math

import numpy as np


@functools.lru_cache(maxsize=None)
def available() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def kernels():
    """(run_fn, setup_fn) for ``nvidia.dali.plugin.numba.fn.experimental.numba_function``: inputs an
    HWC uint8 image and a (1,) int32 shift in [0, 256), output the hue-shifted HWC uint8 image."""
    from numba import njit

    @njit(cache=False)
    def round_half_away(x):          # C round() for x >= 0
        r = math.floor(x)
        if x - r >= 0.5:
            r += 1.0
        return int(r)

    @njit(cache=False)
    def clip8(x):
        return 0 if x < 0 else (255 if x > 255 else x)

    @njit(cache=False)
    def shift_pixel(r, g, b, shift):
        hi = max(r, max(g, b))
        lo = min(r, min(g, b))
        if hi == lo:                 # gray: H = S = 0, and S = 0 converts back to (V, V, V)
            return hi, hi, hi
        # RGB -> HSV: float32 arithmetic where Pillow uses float, float64 where it uses double
        span = np.float32(hi - lo)
        sat = np.float32(span / np.float32(hi))
        rc = np.float32(np.float32(hi - r) / span)
        gc = np.float32(np.float32(hi - g) / span)
        bc = np.float32(np.float32(hi - b) / span)
        if r == hi:
            h = np.float32(bc - gc)
        elif g == hi:
            h = np.float32(2.0 + np.float64(rc) - np.float64(bc))
        else:
            h = np.float32(4.0 + np.float64(gc) - np.float64(rc))
        turn = np.float64(h) / 6.0 + 1.0         # in (5/6, 2): fmod(turn, 1) is exact as turn - floor(turn)
        h = np.float32(turn - math.floor(turn))
        u_h = clip8(int(np.float64(h) * 255.0))
        u_s = clip8(int(np.float64(sat) * 255.0))
        u_h = (u_h + shift) & 255                # torchvision: uint8 addition, wrapping
        if u_s == 0:
            return hi, hi, hi
        # HSV -> RGB
        h6 = np.float64(u_h) * 6.0 / 255.0
        sector = int(math.floor(h6))
        frac = np.float32(h6 - np.float64(sector))
        fs = np.float32(np.float64(u_s) / 255.0)
        v = np.float64(hi)
        p = clip8(round_half_away(v * (1.0 - np.float64(fs))))
        q = clip8(round_half_away(v * (1.0 - np.float64(np.float32(fs * frac)))))
        t = clip8(round_half_away(v * (1.0 - np.float64(fs) * (1.0 - np.float64(frac)))))
        sector %= 6
        if sector == 0:
            return hi, t, p
        if sector == 1:
            return q, hi, p
        if sector == 2:
            return p, hi, t
        if sector == 3:
            return p, q, hi
        if sector == 4:
            return t, p, hi
        return hi, p, q

    @njit(cache=False)
    def shift_image(out, img, shift):
        height, width, _ = img.shape
        for y in range(height):
            for x in range(width):
                a, b, c = shift_pixel(np.int32(img[y, x, 0]), np.int32(img[y, x, 1]), np.int32(img[y, x, 2]),
                                      shift)
                out[y, x, 0] = a
                out[y, x, 1] = b
                out[y, x, 2] = c

    def run_fn(out0, in0, in1):
        shift_image(out0, in0, in1[0])

    def setup_fn(outs, ins):
        for i in range(len(outs[0])):
            for d in range(3):
                outs[0][i][d] = ins[0][i][d]

    return run_fn, setup_fn, shift_image


def adjust_hue(img: np.ndarray, shift: int) -> np.ndarray:
    """The kernel on one HWC uint8 array (for tests and for use outside DALI)."""
    out = np.empty_like(img)
    kernels()[2](out, np.ascontiguousarray(img, dtype=np.uint8), int(shift) & 255)
    return out
