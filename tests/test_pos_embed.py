"""Per-forward positional-embedding resampling (cosmos_method.md §1.8), checked against an
independent NumPy implementation of Keys' cubic convolution with scale-factor source coordinates."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from utils import assert_close

from cosmos_fast import create_model
from cosmos_fast.model.layers import resample_pos_embed


def keys_cubic(t: float, a: float = -0.75) -> np.ndarray:
    """Weights of the 4 taps at offsets -1, 0, 1, 2 for fractional position t."""
    def w(x):
        x = abs(x)
        if x <= 1:
            return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
        if x < 2:
            return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a
        return 0.0
    return np.array([w(t + 1), w(t), w(1 - t), w(2 - t)])


def numpy_resample(table: np.ndarray, g_out: int) -> np.ndarray:
    cls, patch = table[:1], table[1:]
    g0 = int(round(np.sqrt(patch.shape[0])))
    grid = patch.reshape(g0, g0, -1)
    step = g0 / (g_out + 0.1)                 # inverse of the explicit scale factor
    rows = []
    for j in range(g_out):
        rows.append([])
        for i in range(g_out):
            acc = 0.0
            sy, sx = (j + 0.5) * step - 0.5, (i + 0.5) * step - 0.5
            y0, x0 = int(np.floor(sy)), int(np.floor(sx))
            wy, wx = keys_cubic(sy - y0), keys_cubic(sx - x0)
            for dy in range(4):
                for dx in range(4):
                    yy = min(max(y0 - 1 + dy, 0), g0 - 1)
                    xx = min(max(x0 - 1 + dx, 0), g0 - 1)
                    acc = acc + wy[dy] * wx[dx] * grid[yy, xx]
            rows[-1].append(acc)
    return np.concatenate([cls, np.asarray(rows).reshape(g_out * g_out, -1)])


@pytest.mark.parametrize("g0,g", [(14, 6), (7, 3), (3, 2), (4, 9)])
def test_resampling_matches_independent_bicubic(g0, g):
    torch.manual_seed(0)
    table = torch.randn(g0 * g0 + 1, 5, dtype=torch.float64)
    ours = resample_pos_embed(table, g)
    ref = numpy_resample(table.numpy(), g)
    assert_close(ours, torch.from_numpy(ref))


def test_scale_factor_is_not_size():
    torch.manual_seed(0)
    table = torch.randn(14 * 14 + 1, 8)
    ours = resample_pos_embed(table, 6)
    by_size = F.interpolate(table[1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2), size=(6, 6),
                            mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(36, 8)
    assert (ours[1:] - by_size).abs().max() > 1e-2
    assert torch.equal(ours[0], table[0])


def test_model_resamples_on_every_non_native_input_and_grads_flow():
    model = create_model({"embed_dim": 32,
                          "vision_cfg": {"image_size": 48, "patch_size": 16, "width": 32, "layers": 1, "head_width": 16},
                          "text_cfg": {"context_length": 8, "vocab_size": 20, "width": 32, "heads": 2, "layers": 1}})
    assert model.visual.pos_embed(3) is model.visual.positional_embedding   # native: unchanged
    x = torch.randn(2, 3, 32, 32)
    model.visual(x).sum().backward()
    g = model.visual.positional_embedding.grad
    assert g is not None and g[1:].abs().sum() > 0
