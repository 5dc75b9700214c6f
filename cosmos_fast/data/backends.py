"""The data backend switch (``data.backend``): one loader interface (:class:`~.stream.Loader`), two
implementations.

* ``torchvision``: :class:`~cosmos_fast.data.torchvision_loader.WebDatasetLoader`, PIL + torchvision in
  data-loader worker processes; batches on the CPU.
* ``dali``: :class:`~cosmos_fast.data.dali_loader.DaliWebDatasetLoader`, NVIDIA DALI (mixed decode and
  GPU augmentation on CUDA, DALI's CPU backend otherwise); batches on the loader's device.
* ``auto``: ``dali`` when DALI is installed and CUDA is available, else ``torchvision``.

Both take the same :class:`~cosmos_fast.data.stream.StreamSpec` and yield the same batch layout.
"""
from __future__ import annotations

import torch

from .dali_loader import DaliWebDatasetLoader, dali_available
from .stream import Loader, StreamSpec
from .torchvision_loader import WebDatasetLoader

BACKENDS = ("torchvision", "dali", "auto")


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"data.backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    return "dali" if dali_available() and torch.cuda.is_available() else "torchvision"


def build_loader(spec: StreamSpec, backend: str = "torchvision", **dali_options) -> Loader:
    """The loader of ``backend`` for ``spec``; ``dali_options`` go to
    :class:`~cosmos_fast.data.dali_loader.DaliWebDatasetLoader` (device, index_dir, cache_dir,
    validate, retries, caption_workers, hue_mode, num_threads, prefetch)."""
    backend = resolve_backend(backend)
    if backend == "torchvision":
        if dali_options:
            raise TypeError(f"options {sorted(dali_options)} only apply to data.backend=dali")
        return WebDatasetLoader(spec)
    return DaliWebDatasetLoader(spec, **dali_options)
