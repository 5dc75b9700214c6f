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

import numpy as np


@functools.lru_cache(maxsize=None)
def available() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def kernels():
    """The njit functions ``(shift_pixel, shift_flat, build_tables, shift_image)`` (:mod:`._pil_kernels`).

    ``shift_pixel(r, g, b, shift)`` is Pillow's arithmetic step by step (the reference).
    ``shift_flat(v, shift, tables)`` gives the same result in place on a flat RGB array from lookup
    tables (:func:`tables`): the 8-bit hue of a colour depends only on which channel is the largest and on
    the other two channels' distances to it, its saturation only on (max, max − min), and the
    conversion back needs the sector, fraction and saturation as floats — so no division is left per
    pixel. ``shift_image(out, img, shift, tables)`` runs it on a C-contiguous HWC image."""
    from . import _pil_kernels as k

    return k.shift_pixel, k.shift_flat, k.build_tables, k.shift_image


@functools.lru_cache(maxsize=None)
def tables():
    """The lookup tables of ``shift_flat`` (~260 KB, built once per process in ~10 ms)."""
    return kernels()[2]()


def adjust_hue(img: np.ndarray, shift: int) -> np.ndarray:
    """torchvision's ``adjust_hue`` on one HWC uint8 array, given the uint8 shift ``uint8(int32(h · 255))``."""
    out = np.empty_like(img)
    kernels()[3](out, np.ascontiguousarray(img, dtype=np.uint8), int(shift) & 255, tables())
    return out
