"""What every op's switch shares: whether Triton can run, and the ``COSMOS_FAST_IMPL`` override.

Kept out of ``ops/__init__.py`` so the op modules can import it without importing their own
package's ``__init__`` (which imports them: that would be an import circle).
"""
from __future__ import annotations

import os

import torch


def triton_available() -> bool:
    try:
        import triton  # noqa: F401  (optional heavy dependency: only probed, never needed here)
    except ImportError:
        return False
    return True


def triton_runnable(device: torch.device) -> bool:
    """Triton kernels run natively on CUDA, or on CPU tensors under TRITON_INTERPRET=1."""
    if not triton_available():
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def impl_override(impls: tuple[str, ...]) -> str | None:
    """``COSMOS_FAST_IMPL`` when it names one of ``impls`` (it overrides ``"auto"`` for debugging)."""
    override = os.environ.get("COSMOS_FAST_IMPL")
    return override if override in impls else None
