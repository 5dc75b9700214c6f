"""The data backend switch (``data.backend``): one loader interface, two implementations.

* ``torchvision``: :class:`~cosmos_fast.data.loader.WebDatasetLoader`, PIL + torchvision in
  data-loader worker processes; batches on the CPU.
* ``dali``: :class:`~cosmos_fast.data.dali_loader.DaliWebDatasetLoader`, NVIDIA DALI (mixed decode and
  GPU augmentation on CUDA, DALI's CPU backend otherwise); batches on the loader's device.
* ``auto``: ``dali`` when DALI is installed and CUDA is available, else ``torchvision``.

Both take the same :class:`~cosmos_fast.data.loader.StreamSpec` and yield the same batch layout.
"""
from __future__ import annotations

from .loader import StreamSpec, WebDatasetLoader

BACKENDS = ("torchvision", "dali", "auto")


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"data.backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    import torch

    from .dali_loader import dali_available

    return "dali" if dali_available() and torch.cuda.is_available() else "torchvision"


def build_loader(spec: StreamSpec, backend: str = "torchvision", **dali_options):
    """The loader of ``backend`` for ``spec``; ``dali_options`` go to
    :class:`~cosmos_fast.data.dali_loader.DaliWebDatasetLoader` (device, index_dir, cache_dir,
    validate, retries, caption_workers, hue_mode, num_threads, prefetch)."""
    backend = resolve_backend(backend)
    if backend == "torchvision":
        if dali_options:
            raise TypeError(f"options {sorted(dali_options)} only apply to data.backend=dali")
        return WebDatasetLoader(spec)
    from .dali_loader import DaliWebDatasetLoader

    return DaliWebDatasetLoader(spec, **dali_options)
