"""The model's fused ops, one module per op: its switch, every PyTorch implementation and the
autograd glue around its Triton kernel (``kernels/<op>.py``). The official formulations the
implementations are tested against live in ``cosmos_fast/reference/<op>.py``.

* ``cross_pool(pooler, context, queries, impl)`` → norm(queries + pooler(context, queries)), (B, n, D)
  (:mod:`cosmos_fast.ops.cross_pool`)
    - ``"fused"``     : the absorbed formulation with LN_k, scores, softmax and pooling in one Triton
                        kernel per direction (kernels/cross_pool.py); not yet verified on a GPU
    - ``"absorbed"``  : LN_k once per sample, no K/V: W_k folded into the queries and W_v applied
                        to the attention-pooled context (fewer FLOPs than K/V when n·H < D)
    - ``"shared"``    : LN_k and K/V once per sample, PyTorch attention
    - ``"reference"`` : the official repeat-the-context formulation (cosmos_fast.reference)
* ``contrastive`` (the COSMOS loss), selected through ``CosmosLoss(impl=...)``
  (:mod:`cosmos_fast.ops.contrastive`):
    - ``"fused"``     : Triton kernels (kernels/contrastive.py), no B×B tensor: a one-pass forward
                        and a bounded-workspace backward; CUDA, or the Triton interpreter when
                        TRITON_INTERPRET=1
    - ``"blockwise"`` : the same algorithm and contract in PyTorch tiles (the CPU path)
    - ``"reference"`` : per-pair B×B logits, exactly the official loss
* ``multicrop`` (one §4.4 crop equal to torchvision's PIL ops bit for bit; :mod:`cosmos_fast.ops.multicrop`):
  the Numba kernel (kernels/multicrop.py) behind ``data.augment: fused`` and DALI's CPU ``hue_mode``
  ``numba``; the reference is torchvision's own functions (cosmos_fast.reference.multicrop)

``"auto"`` picks the implementation measured fastest for the inputs (bench_results/): on CUDA the
Triton loss and the shared-K/V pooler, on CPU the blockwise loss and the absorbed pooler
(shared-K/V when n·H ≥ D). The environment variable ``COSMOS_FAST_IMPL`` (e.g. ``reference``)
overrides ``"auto"`` everywhere for debugging.

Note: the package attribute ``cross_pool`` is the op's function; import the module's other names
with ``from cosmos_fast.ops.cross_pool import ...``.
"""
from .contrastive import CONTRASTIVE_IMPLS, CosmosLoss, resolve_contrastive_impl
from .cross_pool import CROSS_POOL_IMPLS, cross_pool, resolve_cross_pool_impl
from .switch import triton_available, triton_runnable

__all__ = [
    "CONTRASTIVE_IMPLS", "CROSS_POOL_IMPLS", "CosmosLoss", "cross_pool", "resolve_contrastive_impl",
    "resolve_cross_pool_impl", "triton_available", "triton_runnable",
]
