"""Multi-crop augmentation of §4.4: sizes, scale ranges and the probability of each random op,
measured statistically with a fixed seed by spying on the torchvision / PIL functions it calls."""
import numpy as np
import pytest
import torch
from PIL import Image

from cosmos_fast.data.transforms import MultiCropTransform, eval_transform, seeded
from multicrop_spy import spy_multicrop


def test_shapes_and_normalisation():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 120, 3), dtype=np.uint8))
    crops = MultiCropTransform(64, 32)(img)
    assert [tuple(c.shape) for c in crops] == [(3, 64, 64)] * 2 + [(3, 32, 32)] * 6
    assert all(c.dtype == torch.float32 for c in crops)
    gray = Image.new("L", (50, 50), 128)           # non-RGB inputs are converted
    assert MultiCropTransform(32, 16)(gray)[0].shape == (3, 32, 32)
    assert eval_transform(48)(img).shape == (3, 48, 48)


def test_seeded_is_deterministic_and_restores_rng():
    img = Image.new("RGB", (64, 64), (10, 200, 30))
    tf = MultiCropTransform(32, 16)
    state = torch.get_rng_state()
    with seeded(5):
        a = tf(img)
    with seeded(5):
        b = tf(img)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.fixture(scope="module")
def rates():
    """Run 400 samples and count, per crop kind, every random op applied."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8))
    counts, area, _, radii, _, _ = spy_multicrop([img] * 400)
    return counts, area, radii


@pytest.mark.parametrize("kind,blur_p,solarize_p", [("global1", 1.0, 0.0), ("global2", 0.1, 0.2), ("local", 0.5, 0.0)])
def test_random_op_rates(rates, kind, blur_p, solarize_p):
    counts, _, radii = rates
    c = counts[kind]
    n = c["crops"]
    assert n == (2400 if kind == "local" else 400)
    tol = 4 * (0.25 / n) ** 0.5                          # ~4 standard deviations
    assert abs(c["hflip"] / n - 0.5) < tol
    assert abs(c["adjust_brightness"] / n - 0.8) < tol
    assert abs(c["rgb_to_grayscale"] / n - 0.2) < tol
    assert abs(c["blur"] / n - blur_p) < tol
    assert abs(c["solarize"] / n - solarize_p) < tol
    if radii[kind]:
        assert 0.1 <= min(radii[kind]) and max(radii[kind]) <= 2.0


@pytest.mark.parametrize("kind,lo,hi", [("global1", 0.4, 1.0), ("global2", 0.4, 1.0), ("local", 0.05, 0.4)])
def test_crop_scale_ranges(rates, kind, lo, hi):
    s = np.asarray(rates[1][kind])
    assert s.min() >= lo * 0.97 and s.max() <= hi * 1.03       # h, w are rounded to pixels
    assert s.min() < lo + 0.1 * (hi - lo) and s.max() > hi - 0.1 * (hi - lo)   # the whole range is used


def test_bad_crop_scale():
    with pytest.raises(ValueError, match="crop_scale"):
        MultiCropTransform(crop_scale=1.5)
