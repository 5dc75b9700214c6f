"""Shared test helpers: one ``assert_close``, one dtype tolerance table, the "≤ 2× torch's error"
rule for low-precision kernels, and the tiny model configs several test files build.

Import as ``from utils import ...`` (pytest puts tests/ on ``sys.path``, as for conftest.py).
"""
from __future__ import annotations

import torch

# (rtol, atol) for a value computed in `dtype` against a reference, differing only by the order of
# floating-point operations. fp64: near machine precision; fp32: accumulation order over a few
# thousand terms; bf16/fp16: one rounding of the output (torch's own defaults for these dtypes are
# rtol 1.6e-2 / 1e-3 with atol 1e-5, too tight in atol for values that pass through a softmax).
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float16: (1e-3, 1e-3),
}
GRAD_RTOL_FACTOR = 10      # gradients go through one more chain of sums: rtol × 10, atol unchanged


def tolerance(dtype: torch.dtype, grad: bool = False) -> dict:
    """``{"rtol", "atol"}`` for ``dtype`` (a value, or a gradient with ``grad=True``)."""
    rtol, atol = TOLERANCES[dtype]
    return {"rtol": rtol * (GRAD_RTOL_FACTOR if grad else 1), "atol": atol}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype: torch.dtype | None = None,
                 grad: bool = False, rtol: float | None = None, atol: float | None = None,
                 msg: str | None = None) -> None:
    """``torch.testing.assert_close`` with the table's tolerance for ``dtype`` (default: the
    actual value's dtype); ``rtol`` / ``atol`` override it where a test needs its own bound."""
    tol = tolerance(dtype or actual.dtype, grad)
    if rtol is not None:
        tol["rtol"] = rtol
    if atol is not None:
        tol["atol"] = atol
    torch.testing.assert_close(actual, expected, **tol, msg=msg)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def low_precision_floor(reference: torch.Tensor) -> float:
    """The small floor of the 2× rule: a thousandth of the reference's magnitude, the magnitude
    capped at 1 (so losses and other values of order one or more get an absolute 1e-3), plus 1e-6
    so an all-zero reference (an exactly-zero gradient) does not demand bit equality.

    It matters only where torch's own low-precision error is (close to) zero; everywhere else
    2× that error dominates."""
    return 1e-3 * min(1.0, reference.detach().abs().max().item()) + 1e-6


def assert_within_twice_torch_error(got: torch.Tensor, torch_path: torch.Tensor, reference: torch.Tensor,
                                    name: str = "") -> None:
    """flash-attention's rule for low-precision kernels: the error of ``got`` against a
    high-precision ``reference`` is at most twice the error of the same-precision torch path
    (``torch_path``) against it, plus :func:`low_precision_floor`. Prints both errors first."""
    err, err_torch = max_err(got, reference), max_err(torch_path, reference)
    floor = low_precision_floor(reference)
    print(f"{name:32s} err {err:.3e}   torch err {err_torch:.3e}   floor {floor:.1e}")
    assert err <= 2 * err_torch + floor, f"{name}: err {err:.3e} > 2 × torch err {err_torch:.3e} + {floor:.1e}"


# ----------------------------------------------------------------------------- tiny model configs
# 16 wide, one layer per tower, 6 text tokens: the smallest COSMOS CLIP (checkpoint, EMA, optimizer tests)
TINY_MODEL_16 = {"embed_dim": 16,
                 "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 16, "layers": 1, "head_width": 8},
                 "text_cfg": {"context_length": 6, "vocab_size": 20, "width": 16, "heads": 2, "layers": 1}}
