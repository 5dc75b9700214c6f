"""The one device resolver (train, eval and the DALI loader all read ``device: auto | cpu | cuda[:i]``)."""
from __future__ import annotations

import torch


def resolve_device(name: str | torch.device = "auto", index: int | None = None) -> torch.device:
    """``"auto"``: CUDA when available, else the CPU. A CUDA device without an index gets ``index``
    (a launcher's local rank) or, when that is None, the current CUDA device."""
    if str(name) == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        name = "cuda"
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device() if index is None else index)
    return dev
