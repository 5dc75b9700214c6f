"""Spy on the torchvision multi-crop recipe: which random ops ran for which crop kind, with their
parameters (shared by the transform, DALI and fused-kernel tests)."""
import contextlib
from collections import Counter, defaultdict

import numpy as np
import pytest
import torchvision.transforms.functional as TF
from torchvision import transforms as T

from cosmos_fast.data import transforms as mt
from cosmos_fast.data.transforms import MultiCropTransform, seeded

KINDS = ("global1", "global2", "local")
SPIED = ("hflip", "adjust_brightness", "adjust_contrast", "adjust_saturation", "adjust_hue", "rgb_to_grayscale",
         "solarize")


@contextlib.contextmanager
def spying(on_op, on_window, on_blur):
    """While active, MultiCropTransform's random steps report to the callbacks, then run unchanged:
    ``on_op(name, args)`` for each torchvision function in :data:`SPIED`, ``on_window(img, (i, j, h,
    w))`` for each RandomResizedCrop window drawn, ``on_blur(radius)`` for each PIL Gaussian blur."""
    orig = {f: getattr(TF, f) for f in SPIED}
    orig_params, orig_blur = T.RandomResizedCrop.get_params, mt.ImageFilter.GaussianBlur

    def spy(fname):
        def f(*a, **k):
            on_op(fname, a)
            return orig[fname](*a, **k)
        return f

    def params(img, scale, ratio):
        window = orig_params(img, scale, ratio)
        on_window(img, window)
        return window

    def blur(radius):
        on_blur(radius)
        return orig_blur(radius=radius)

    mp = pytest.MonkeyPatch()
    for fname in orig:
        mp.setattr(TF, fname, spy(fname))
    mp.setattr(T.RandomResizedCrop, "get_params", staticmethod(params))
    mp.setattr(mt.ImageFilter, "GaussianBlur", blur)
    try:
        yield
    finally:
        mp.undo()


def spy_multicrop(images, global_size=32, local_size=16, crop_scale=0.4, seed=0):
    """Run MultiCropTransform over ``images`` (seeded) and return (counts, area, ratio, radii, pixels,
    factors) per crop kind: op counts, crop area fractions and aspect ratios, blur radii, output
    pixels, and colour-jitter factors (with ``"first"`` = the first jitter op of each crop)."""
    counts, area, ratio, radii, pixels = defaultdict(Counter), defaultdict(list), defaultdict(list), \
        defaultdict(list), defaultdict(list)
    factors = defaultdict(lambda: defaultdict(list))          # kind → op → factors; "first" → first op
    current = {}
    tf = MultiCropTransform(global_size, local_size, crop_scale=crop_scale)
    for name in KINDS:
        comp = getattr(tf, name)

        def wrapped(img, comp=comp, name=name):
            current["kind"] = name
            counts[name]["crops"] += 1
            out = comp(img)
            pixels[name].append(out.numpy())
            return out
        setattr(tf, name, wrapped)

    def on_op(fname, a):
        counts[current["kind"]][fname] += 1
        if fname.startswith("adjust_"):
            op = fname[len("adjust_"):]
            factors[current["kind"]][op].append(a[1])
            crop = (current["kind"], counts[current["kind"]]["crops"])
            if current.get("crop") != crop:                                   # first jitter op of this crop
                current["crop"] = crop
                factors[current["kind"]]["first"].append(op)

    def on_window(img, window):
        _, _, h, w = window
        area[current["kind"]].append(h * w / (img.size[0] * img.size[1]))
        ratio[current["kind"]].append(w / h)

    def on_blur(radius):
        counts[current["kind"]]["blur"] += 1
        radii[current["kind"]].append(radius)

    with spying(on_op, on_window, on_blur), seeded(seed):
        for img in images:
            tf(img)
    return counts, area, ratio, radii, {k: np.stack(v) for k, v in pixels.items()}, factors
