"""The one attention switch used by both towers and both cross-attention poolers.

``attention(q, k, v, causal=False)`` takes ``q`` of shape (N, H, Lq, d) and ``k``, ``v`` of shape
(N, H, Lk, d) and returns softmax(q·kᵀ/√d [+ causal mask])·v with the shape of ``q``.

Backends:

* ``"sdpa"``     – ``torch.nn.functional.scaled_dot_product_attention`` (default; on CUDA it picks
  its own flash / memory-efficient kernels).
* ``"math"``     – the explicit formula in PyTorch; the reference the others are tested against.
* ``"flash"``    – ``flash_attn.flash_attn_func`` (CUDA, fp16/bf16 only; optional cluster build).
* ``"xformers"`` – ``xformers.ops.memory_efficient_attention`` (CUDA only; optional).
* ``"auto"``     – flash when installed and the inputs allow it, else xformers when installed and on
  CUDA, else sdpa.

Select with :func:`set_attention_backend`, the :func:`attention_backend` context manager, or the
environment variable ``COSMOS_FAST_ATTN``. Asking for an optional backend that is not installed
(or cannot run on these inputs) is an error naming what is missing; ``"auto"`` never errors.
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "math", "flash", "xformers")

_backend = os.environ.get("COSMOS_FAST_ATTN", "sdpa")


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    return name


_check_name(_backend)


def have_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def have_xformers() -> bool:
    return importlib.util.find_spec("xformers") is not None


def available_backends() -> list[str]:
    """Backends that can run on this machine (flash/xformers need their package and CUDA)."""
    out = ["auto", "sdpa", "math"]
    if torch.cuda.is_available():
        if have_flash_attn():
            out.append("flash")
        if have_xformers():
            out.append("xformers")
    return out


def get_attention_backend() -> str:
    return _backend


def set_attention_backend(name: str) -> None:
    global _backend
    _backend = _check_name(name)


@contextlib.contextmanager
def attention_backend(name: str):
    """Temporarily select an attention backend."""
    global _backend
    old = _backend
    _backend = _check_name(name)
    try:
        yield
    finally:
        _backend = old


def _math(q, k, v, causal):
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = torch.matmul(q * scale, k.transpose(-2, -1))
    if causal:
        lq, lk = s.shape[-2], s.shape[-1]
        mask = torch.ones(lq, lk, dtype=torch.bool, device=s.device).triu_(1)
        s = s.masked_fill(mask, float("-inf"))
    return torch.matmul(torch.softmax(s.float(), dim=-1).to(v.dtype), v)


def _flash(q, k, v, causal):
    from flash_attn import flash_attn_func

    # flash_attn wants (N, L, H, d)
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
    return out.transpose(1, 2)


def _xformers(q, k, v, causal):
    import xformers.ops as xops

    bias = xops.LowerTriangularMask() if causal else None
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias
    )
    return out.transpose(1, 2)


def _flash_ok(q) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256


def resolve_backend(q: torch.Tensor, name: str | None = None) -> str:
    """The backend that will actually run for inputs like ``q``; errors for impossible requests."""
    name = _check_name(name or _backend)
    if name == "auto":
        if have_flash_attn() and _flash_ok(q):
            return "flash"
        if have_xformers() and q.is_cuda:
            return "xformers"
        return "sdpa"
    if name == "flash":
        if not have_flash_attn():
            raise RuntimeError("attention backend 'flash' requested but flash_attn is not installed")
        if not _flash_ok(q):
            raise RuntimeError(
                f"attention backend 'flash' needs CUDA fp16/bf16 inputs with head dim <= 256, "
                f"got device={q.device} dtype={q.dtype} head_dim={q.shape[-1]}"
            )
    if name == "xformers":
        if not have_xformers():
            raise RuntimeError("attention backend 'xformers' requested but xformers is not installed")
        if not q.is_cuda:
            raise RuntimeError(f"attention backend 'xformers' needs CUDA inputs, got {q.device}")
    return name


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
              backend: str | None = None) -> torch.Tensor:
    """Scaled dot-product attention over (N, H, L, d) tensors through the selected backend."""
    name = resolve_backend(q, backend)
    if name == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if name == "math":
        return _math(q, k, v, causal)
    if name == "flash":
        return _flash(q, k, v, causal)
    return _xformers(q, k, v, causal)
