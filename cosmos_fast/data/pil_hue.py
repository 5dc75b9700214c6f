"""torchvision's ``adjust_hue`` on a PIL image, bit for bit, in Numba (a part of :mod:`.pil_crop`).

torchvision (PIL input) converts RGB to PIL's 8-bit HSV, adds ``uint8(int32(hue · 255))`` to H modulo
256 and converts back. ``shift_pixel`` reproduces Pillow's two conversions (``rgb2hsv_row`` and
``hsv2rgb`` of libImaging/Convert.c) with the same float/double evaluation order, truncations and
round-half-away-from-zero; ``shift_flat`` gets the same result from lookup tables built with it (no
division per pixel: ~6 ns per pixel on one core instead of ~22). Both equal PIL for every RGB colour
(tests/test_pil_crop.py checks all 2^24 colours).

Numba is optional: :func:`available` says whether it imports; without it the DALI CPU pipeline runs
its operator graph (``hue_mode="float"``).
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
    """The njit functions ``(shift_pixel, shift_flat, build_tables, shift_image)``.

    ``shift_pixel(r, g, b, shift)`` is Pillow's arithmetic step by step (the reference).
    ``shift_flat(v, shift, tables)`` gives the same result in place on a flat RGB array from lookup
    tables (:func:`tables`): the 8-bit hue of a colour depends only on which channel is the largest and on
    the other two channels' distances to it, its saturation only on (max, max − min), and the
    conversion back needs the sector, fraction and saturation as floats — so no division is left per
    pixel. ``shift_image(out, img, shift, tables)`` runs it on a C-contiguous HWC image."""
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
    def to_hsv(r, g, b):
        """Pillow's rgb2hsv for a colour that is not gray: (8-bit H, 8-bit S); V is the max."""
        hi = max(r, max(g, b))
        lo = min(r, min(g, b))
        # float32 arithmetic where Pillow uses float, float64 where it uses double
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
        return clip8(int(np.float64(h) * 255.0)), clip8(int(np.float64(sat) * 255.0))

    @njit(cache=False)
    def hsv_parts(u_h, u_s):
        """What Pillow's hsv2rgb derives from H and S: sector, fraction (float32), saturation (float32)."""
        h6 = np.float64(u_h) * 6.0 / 255.0
        sector = int(math.floor(h6))
        return sector % 6, np.float32(h6 - np.float64(sector)), np.float32(np.float64(u_s) / 255.0)

    @njit(cache=False)
    def from_parts(sector, frac, fs, hi):
        v = np.float64(hi)
        p = clip8(round_half_away(v * (1.0 - np.float64(fs))))
        q = clip8(round_half_away(v * (1.0 - np.float64(np.float32(fs * frac)))))
        t = clip8(round_half_away(v * (1.0 - np.float64(fs) * (1.0 - np.float64(frac)))))
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
    def shift_pixel(r, g, b, shift):
        hi = max(r, max(g, b))
        if hi == min(r, min(g, b)):  # gray: H = S = 0, and S = 0 converts back to (V, V, V)
            return hi, hi, hi
        u_h, u_s = to_hsv(r, g, b)
        if u_s == 0:
            return hi, hi, hi
        sector, frac, fs = hsv_parts((u_h + shift) & 255, u_s)      # torchvision: uint8 add, wrapping
        return from_parts(sector, frac, fs, hi)

    @njit(cache=False)
    def build_tables():
        # hue by case (0: R is the max, 1: G, 2: B — Pillow's order) and the other two channels'
        # distances to the max, in RGB order
        hue = np.zeros((3, 256, 256), dtype=np.uint8)
        for d1 in range(256):
            for d2 in range(256):
                if d1 == 0 and d2 == 0:
                    continue
                hue[0, d1, d2] = to_hsv(255, 255 - d1, 255 - d2)[0]
                if d1 > 0:
                    hue[1, d1, d2] = to_hsv(255 - d1, 255, 255 - d2)[0]
                if d1 > 0 and d2 > 0:
                    hue[2, d1, d2] = to_hsv(255 - d1, 255 - d2, 255)[0]
        sat = np.zeros((256, 256), dtype=np.uint8)                   # [max, max - min]
        for hi in range(1, 256):
            for span in range(1, hi + 1):
                sat[hi, span] = to_hsv(hi, hi - span, hi - span)[1]
        sector = np.empty(256, dtype=np.int64)
        frac = np.empty(256, dtype=np.float32)
        fs = np.empty(256, dtype=np.float32)
        for u in range(256):
            sector[u], frac[u], fs[u] = hsv_parts(u, u)
        return hue, sat, sector, frac, fs

    @njit(cache=False)
    def shift_flat(v, shift, tables):
        """In place on a flat RGB uint8 array. The tables are unpacked once: taking array arguments
        per pixel would cost reference counting per pixel."""
        hue, sat, sector, frac, fs = tables
        for j in range(0, v.size, 3):
            r, g, b = np.int64(v[j]), np.int64(v[j + 1]), np.int64(v[j + 2])
            hi = max(r, max(g, b))
            lo = min(r, min(g, b))
            if hi == lo:
                continue
            u_s = sat[hi, hi - lo]
            if u_s == 0:
                v[j] = v[j + 1] = v[j + 2] = hi
                continue
            if r == hi:
                u_h = hue[0, hi - g, hi - b]
            elif g == hi:
                u_h = hue[1, hi - r, hi - b]
            else:
                u_h = hue[2, hi - r, hi - g]
            u = (np.int64(u_h) + shift) & 255
            v[j], v[j + 1], v[j + 2] = from_parts(sector[u], frac[u], fs[u_s], hi)

    @njit(cache=False)
    def shift_image(out, img, shift, tables):
        out[:] = img
        shift_flat(out.reshape(-1), shift, tables)

    return shift_pixel, shift_flat, build_tables, shift_image


@functools.lru_cache(maxsize=None)
def tables():
    """The lookup tables of ``shift_flat`` (~260 KB, built once per process in ~10 ms)."""
    return kernels()[2]()


def adjust_hue(img: np.ndarray, shift: int) -> np.ndarray:
    """torchvision's ``adjust_hue`` on one HWC uint8 array, given the uint8 shift ``uint8(int32(h · 255))``."""
    out = np.empty_like(img)
    kernels()[3](out, np.ascontiguousarray(img, dtype=np.uint8), int(shift) & 255, tables())
    return out
