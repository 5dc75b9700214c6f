"""The multicrop op's Numba kernels: Pillow's and torchvision's arithmetic, step by step
(:mod:`cosmos_fast.ops.multicrop` says what each reproduces and calls them; tests/test_multicrop.py
tests them against :mod:`cosmos_fast.reference.multicrop`).

Module-level functions compiled with ``cache=True``: the first process compiles them and writes
Numba's cache next to this file (or to ``NUMBA_CACHE_DIR``); later processes, DALI's and the loader
workers included, load it. Nothing here reads a module global that could change without this file
changing (the jitter orders and the Pillow-version rule are arguments), so a cached compilation
never goes stale. Importing this module needs numba.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

f32 = np.float32


# ================================================================== hue: Pillow's 8-bit HSV round trip
@njit(cache=True)
def round_half_away(x):          # C round() for x >= 0
    r = math.floor(x)
    if x - r >= 0.5:
        r += 1.0
    return int(r)

@njit(cache=True)
def clip8(x):
    return 0 if x < 0 else (255 if x > 255 else x)

@njit(cache=True)
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

@njit(cache=True)
def hsv_parts(u_h, u_s):
    """What Pillow's hsv2rgb derives from H and S: sector, fraction (float32), saturation (float32)."""
    h6 = np.float64(u_h) * 6.0 / 255.0
    sector = int(math.floor(h6))
    return sector % 6, np.float32(h6 - np.float64(sector)), np.float32(np.float64(u_s) / 255.0)

@njit(cache=True)
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

@njit(cache=True)
def shift_pixel(r, g, b, shift):
    hi = max(r, max(g, b))
    if hi == min(r, min(g, b)):  # gray: H = S = 0, and S = 0 converts back to (V, V, V)
        return hi, hi, hi
    u_h, u_s = to_hsv(r, g, b)
    if u_s == 0:
        return hi, hi, hi
    sector, frac, fs = hsv_parts((u_h + shift) & 255, u_s)      # torchvision: uint8 add, wrapping
    return from_parts(sector, frac, fs, hi)

@njit(cache=True)
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

@njit(cache=True)
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

@njit(cache=True)
def shift_image(out, img, shift, tables):
    out[:] = img
    shift_flat(out.reshape(-1), shift, tables)


# ================================================================== the crop
# ---------------------------------------------------------------- resize (Resample.c)
@njit(cache=True)
def bicubic(x):
    if x < 0.0:
        x = -x
    if x < 1.0:
        return (1.5 * x - 2.5) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * -0.5
    return 0.0

@njit(cache=True)
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

@njit(cache=True)
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

@njit(cache=True)
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

@njit(cache=True)
def resize(img, y0, x0, h, w, size, vertical_first):
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
@njit(cache=True)
def blend(base, x, alpha):
    """Image.blend(base, x, alpha) for one value: float32, truncated, clipped."""
    t = f32(base) + alpha * f32(x - base)
    return 0 if t <= 0.0 else (255 if t >= 255.0 else np.int32(t))

@njit(cache=True)
def luma(r, g, b):
    return (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16

@njit(cache=True)
def brightness(v, alpha):
    for j in range(v.size):
        v[j] = blend(np.int32(0), np.int32(v[j]), alpha)

@njit(cache=True)
def contrast(v, alpha):
    total = 0
    for j in range(0, v.size, 3):
        total += luma(np.int32(v[j]), np.int32(v[j + 1]), np.int32(v[j + 2]))
    mean = np.int32(int(total / (v.size // 3) + 0.5))
    for j in range(v.size):
        v[j] = blend(mean, np.int32(v[j]), alpha)

@njit(cache=True)
def saturation(v, alpha):
    for j in range(0, v.size, 3):
        g = luma(np.int32(v[j]), np.int32(v[j + 1]), np.int32(v[j + 2]))
        v[j] = blend(g, np.int32(v[j]), alpha)
        v[j + 1] = blend(g, np.int32(v[j + 1]), alpha)
        v[j + 2] = blend(g, np.int32(v[j + 2]), alpha)

@njit(cache=True)
def hue(v, shift, tables):
    shift_flat(v, shift, tables)

@njit(cache=True)
def grayscale(v):
    for j in range(0, v.size, 3):
        g = luma(np.int32(v[j]), np.int32(v[j + 1]), np.int32(v[j + 2]))
        v[j] = g
        v[j + 1] = g
        v[j + 2] = g

# ---------------------------------------------------------------- Gaussian blur (BoxBlur.c)
@njit(cache=True)
def box_radius(radius):
    """Pillow's _gaussian_blur_radius(radius, 3): the box radius whose 3 passes have variance r²."""
    sigma2 = f32(f32(radius * radius) / f32(3.0))
    big_l = f32(np.sqrt(12.0 * np.float64(sigma2) + 1.0))
    small_l = f32(np.floor((np.float64(big_l) - 1.0) / 2.0))
    a = f32(f32(f32(2.0) * small_l + f32(1.0)) * f32(small_l * f32(small_l + f32(1.0)) - f32(3.0) * sigma2))
    a = f32(a / f32(f32(6.0) * f32(sigma2 - f32(small_l + f32(1.0)) * f32(small_l + f32(1.0)))))
    return f32(small_l + a)

@njit(cache=True)
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

@njit(cache=True)
def box_passes(a, radius, ww, fw):
    """Three box passes along axis 0 of ``a``, in place."""
    b = np.empty_like(a)
    box_pass(a, b, radius, ww, fw)
    box_pass(b, a, radius, ww, fw)
    box_pass(a, b, radius, ww, fw)
    a[:] = b

@njit(cache=True)
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
@njit(cache=True)
def augment(out, img, p, mean, std, tables, orders, vertical_first):
    """``out`` (3, S, S) float32 ← the crop of the flat HWC uint8 image ``img`` (H, W·3) described by
    the parameter vector ``p`` (``cosmos_fast.data.recipe.PARAM_FIELDS``); ``tables``: the hue tables,
    ``orders``: the 24 jitter orders, ``vertical_first``: Pillow ≥ 13's resize rule."""
    size = out.shape[1]
    a = resize(img, int(p[0]), int(p[1]), int(p[2]), int(p[3]), size, vertical_first)
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

