"""The multicrop op: the fused Numba crop kernel (``kernels/multicrop.py`` via
:mod:`cosmos_fast.ops.multicrop`; the torchvision backend's ``data.augment: fused`` and the DALI CPU
path) equals torchvision's PIL pipeline (:mod:`cosmos_fast.reference.multicrop`) bit for bit.

1. Under the random draws MultiCropTransform itself made (recorded by spying on the functions it
   calls), the kernel reproduces its 8 output tensors exactly.
2. On edge cases the random recipe rarely hits (a pass with unchanged size, Pillow 13's vertical-first
   rule around its boundary, 1-pixel windows, blur radii larger than the crop, extreme factors, all 24
   jitter orders), it equals the same torchvision functions applied one by one (``reference_crop``,
   itself checked against the transform in 1).
3. The lookup-table hue equals Pillow's arithmetic on every colour.
"""
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

pytest.importorskip("numba")

from cosmos_fast.data.recipe import ORDER_INDEX, PARAM_FIELDS  # noqa: E402
from cosmos_fast.data.synthetic import make_scene  # noqa: E402
from cosmos_fast.data.transforms import FusedMultiCropTransform, MultiCropTransform, seeded  # noqa: E402
from cosmos_fast.ops import multicrop as multicrop_op  # noqa: E402
from cosmos_fast.ops.multicrop import augment_crop  # noqa: E402
from cosmos_fast.reference.multicrop import reference_crop  # noqa: E402
from multicrop_spy import spying  # noqa: E402

JITTER_FNS = ("adjust_brightness", "adjust_contrast", "adjust_saturation", "adjust_hue")


def vector(p: dict) -> np.ndarray:
    return np.array([p[f] for f in PARAM_FIELDS], dtype=np.float32)


def record_multicrop(img: Image.Image, seed: int, global_size: int, local_size: int):
    """MultiCropTransform(img) under ``seed``: its 8 tensors and, per crop, the parameters it drew."""
    tf = MultiCropTransform(global_size, local_size)
    crops, current = [], {}

    def delimit(comp):
        def run(im):
            current.clear()
            current.update(flip=0, jitter=0, order=[], gray=0, blur=0, radius=0.0, solarize=0,
                           brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0)
            out = comp(im)
            p = dict(current)
            if p["order"]:
                p["jitter"], p["order"] = 1, ORDER_INDEX[tuple(p["order"])]
            else:
                p["order"] = 0
            crops.append(p)
            return out
        return run
    for name in ("global1", "global2", "local"):
        setattr(tf, name, delimit(getattr(tf, name)))

    def on_op(fname, a):
        if fname in JITTER_FNS:
            current["order"].append(JITTER_FNS.index(fname))
            current[fname[len("adjust_"):]] = a[1]
        else:
            current[{"hflip": "flip", "rgb_to_grayscale": "gray", "solarize": "solarize"}[fname]] = 1

    def on_window(im, window):
        current["y0"], current["x0"], current["h"], current["w"] = window

    def on_blur(radius):
        current["blur"], current["radius"] = 1, radius

    with spying(on_op, on_window, on_blur), seeded(seed):
        outs = tf(img)
    return [o.numpy() for o in outs], crops


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (97, 61)], ids=["landscape", "portrait", "small"])
def test_kernel_reproduces_multicrop_transform(size):
    rng = np.random.default_rng(sum(size))
    seen, ops = set(), {"flip", "jitter", "gray", "blur", "solarize"}
    for seed in range(40):              # at least 6 images, and until every op has been exercised
        if seed >= 6 and seen == ops:
            break
        img = make_scene(rng, max(size))[0].resize(size, Image.BICUBIC).convert("RGB")
        outs, crops = record_multicrop(img, seed, 224, 96)
        arr = np.asarray(img)
        for k, (want, p) in enumerate(zip(outs, crops)):
            got = augment_crop(arr, vector(p), 224 if k < 2 else 96)
            assert np.array_equal(got, want), (seed, k, p, np.abs(got - want).max())
            if k < 3:                   # the functional reference is the transform too
                assert np.array_equal(reference_crop(img, p, 224 if k < 2 else 96), want)
            seen.update(f for f in ("flip", "jitter", "gray", "blur", "solarize") if p[f])
    assert seen == ops


def _case(y0, x0, h, w, **kw):
    p = dict(y0=y0, x0=x0, h=h, w=w, flip=0, jitter=0, brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0,
             order=0, gray=0, blur=0, radius=0.5, solarize=0)
    p.update(kw)
    return p


EDGE_CASES = {
    "copy": (_case(3, 4, 32, 32), 32),                                   # no resampling at all
    "vertical-only": (_case(0, 2, 70, 32), 32),
    "horizontal-only": (_case(1, 0, 32, 75), 32),
    "vertical-first-boundary": (_case(0, 0, 97, 64), 32),                 # h - s = 65 > 2 (w - s) = 64
    "horizontal-first-boundary": (_case(0, 0, 96, 64), 32),               # 64 = 64: horizontal first
    "upscale-both": (_case(5, 5, 9, 13), 40),
    "one-pixel-window": (_case(10, 20, 1, 1), 24),
    "one-pixel-wide": (_case(0, 7, 80, 1), 24),
    "blur-wider-than-crop": (_case(0, 0, 40, 30, blur=1, radius=2.0), 6),
    "blur-tiny-radius": (_case(0, 0, 40, 30, blur=1, radius=0.1), 24),
    "extremes": (_case(2, 3, 50, 60, flip=1, jitter=1, brightness=1.4, contrast=0.6, saturation=1.2, hue=-0.1,
                       order=23, gray=1, blur=1, radius=1.99, solarize=1), 24),
}


@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_kernel_edge_cases_match_torchvision(name):
    p, size = EDGE_CASES[name]
    rng = np.random.default_rng(3)
    img = make_scene(rng, 120)[0].resize((110, 100), Image.BICUBIC).convert("RGB")
    assert np.array_equal(augment_crop(np.asarray(img), vector(p), size), reference_crop(img, p, size))


def test_kernel_every_jitter_order_matches_torchvision():
    rng = np.random.default_rng(4)
    img = make_scene(rng, 64)[0].convert("RGB")
    orders = set()
    for order in range(24):
        p = _case(4, 2, 50, 41, jitter=1, order=order, brightness=float(rng.uniform(0.6, 1.4)),
                  contrast=float(rng.uniform(0.6, 1.4)), saturation=float(rng.uniform(0.8, 1.2)),
                  hue=float(rng.uniform(-0.1, 0.1)))
        p = {k: float(np.float32(v)) for k, v in p.items()}                 # the kernel's float32 factors
        got = augment_crop(np.asarray(img), vector(p), 32)
        assert np.array_equal(got, reference_crop(img, p, 32)), order
        orders.add(got.tobytes())
    assert len(orders) == 24                                              # the order changes the result


@pytest.mark.parametrize("shift", [0, 1, 25, 231, 255])
def test_hue_tables_equal_pillow_arithmetic_on_every_colour(shift):
    codes = np.arange(2 ** 24, dtype=np.uint32)
    img = np.stack([codes >> 16, (codes >> 8) & 255, codes & 255], -1).astype(np.uint8).reshape(4096, 4096, 3)
    got = multicrop_op.adjust_hue(img, shift)
    reference = multicrop_op.kernels().shift_pixel
    sample = np.random.default_rng(shift).integers(0, 2 ** 24, 20000)
    for c in sample:
        r, g, b = int(c >> 16), int((c >> 8) & 255), int(c & 255)
        assert tuple(got.reshape(-1, 3)[c]) == reference(r, g, b, shift)
    # and equals PIL through torchvision on all of them (torchvision takes the hue as a factor)
    factor = (shift if shift < 128 else shift - 256) / 255 + (0.5 / 255 if shift < 128 else -0.5 / 255)
    if abs(factor) <= 0.5:
        want = np.asarray(TF.adjust_hue(Image.fromarray(img), factor))
        assert np.array_equal(got, want), int((got != want).any(-1).sum())


def test_augment_crop_validates_its_input():
    with pytest.raises(ValueError, match="params"):
        augment_crop(np.zeros((10, 10, 3), np.uint8), [0, 0, 5, 5], 8)
    with pytest.raises(ValueError, match="window"):
        augment_crop(np.zeros((10, 10, 3), np.uint8), vector(_case(6, 0, 5, 5)), 8)
    with pytest.raises(ValueError, match="HWC"):
        augment_crop(np.zeros((10, 10), np.uint8), vector(_case(0, 0, 5, 5)), 8)
    assert torch.from_numpy(augment_crop(np.zeros((10, 10, 3), np.uint8), vector(_case(0, 0, 5, 5)), 8)).shape \
        == (3, 8, 8)
    assert multicrop_op.VERTICAL_FIRST == (int(Image.__version__.split(".")[0]) >= 13)


@pytest.mark.parametrize("sizes", [(224, 96, 6), (48, 24, 3)], ids=["cosmos", "small"])
def test_fused_transform_equals_multicrop_transform(sizes):
    """FusedMultiCropTransform draws the same random numbers as MultiCropTransform, in the same order,
    so under one seed the two give the same tensors; the generator ends in the same state too."""
    g, l, n = sizes
    rng = np.random.default_rng(g)
    pil, fused = MultiCropTransform(g, l, n_local=n), FusedMultiCropTransform(g, l, n_local=n)
    for seed in range(5):
        img = make_scene(rng, 300)[0].resize((int(rng.integers(100, 400)), int(rng.integers(100, 400))))
        with seeded(seed):
            want = pil(img)
            after_pil = torch.rand(1)
        with seeded(seed):
            got = fused(img)
            after_fused = torch.rand(1)
        assert len(got) == len(want) == 2 + n
        assert all(torch.equal(a, b) for a, b in zip(got, want)), seed
        assert torch.equal(after_pil, after_fused)
