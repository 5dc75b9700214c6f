"""Kernels, Triton or Numba (shipped as ``cosmos_fast.kernels``). Only kernel code lives here; nothing in
this package imports the trainer. Each op has one file, named as in ``cosmos_fast/reference/``."""
