"""cross_pool: COSMOS' cross-attention pooling of n queries per sample over one shared context.

For each sample b with context C_b (L×D) and n queries Q_b (n×D), heads H, head dim d = D/H:

    K_b, V_b = LN_k(C_b)·W_kᵀ + b_k, LN_k(C_b)·W_vᵀ + b_v      (once per sample)
    Q        = LN_q(Q_b)·W_qᵀ + b_q                             (per query)
    out      = normalize(Q_b + out_proj(MHA-core(Q, K_b, V_b)))  (n×D, no mask)

:func:`cross_pool` is the op's switch. Its implementations:

* ``"shared"``   — :func:`shared_attention`: K/V once per sample and a PyTorch attention core.
* ``"absorbed"`` — :func:`absorbed_attention`: no K or V at all (W_k folded into the queries,
  W_v applied to the attention-pooled context).
* ``"fused"``    — :func:`fused_attention`: the absorbed formulation with LN_k, the scores, the
  softmax and the pooling of the normalised context in one Triton kernel per direction
  (``kernels/cross_pool.py``, imported on first use: triton is an optional dependency); not yet
  verified on a GPU.
* ``"reference"``— the official repeat-the-context formulation, :mod:`cosmos_fast.reference.cross_pool`.

The first three take the LayerNorm'd queries and the pooler's packed in-projection and return the
attention output *before* ``out_proj``; shared and absorbed take the LayerNorm'd context, fused
the raw context and the LN_k module. The pooler's attention module
(:class:`cosmos_fast.model.pooler.CrossAttention`) calls them inside its own forward with its own
weights and applies its ``out_proj`` submodule, and the fused path's γ and β are read inside
LN_k's forward, because DeepSpeed ZeRO-3 gathers a module's parameters only while that module's
forward runs.
"""
from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..reference.cross_pool import cross_pool_reference
from .switch import impl_override

CROSS_POOL_IMPLS = ("fused", "absorbed", "shared", "reference")


def resolve_cross_pool_impl(impl: str = "auto", device: torch.device | None = None,
                            shape: tuple[int, int, int] | None = None) -> str:
    """Validate ``impl``; ``"auto"`` becomes shared on CUDA (measured fastest there, see
    bench_results/cross_pool), otherwise absorbed when ``shape`` = (n queries, heads, width) has
    n·heads < width (fewer FLOPs than K/V), else shared.

    The CUDA rule was measured against the earlier core-only Triton kernel; the fused kernel of
    today (LN_k + absorbed pooling) has not run on a GPU yet, so ``auto`` does not pick it until a
    GPU run of benchmarks/bench_cross_pool.py shows it fastest."""
    if impl == "auto":
        override = impl_override(CROSS_POOL_IMPLS)
        if override is not None:
            return override
        if device is not None and device.type == "cuda":
            return "shared"
        if shape is not None and shape[0] * shape[1] >= shape[2]:
            return "shared"
        return "absorbed"
    if impl not in CROSS_POOL_IMPLS:
        raise ValueError(f"unknown cross_pool implementation {impl!r}; available: {('auto',) + CROSS_POOL_IMPLS}")
    return impl


def cross_pool(pooler, context: torch.Tensor, queries: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Cross-modal features norm(q + attn(LN_q(q), LN_k(C))) for (B, n, D) queries over (B, L, D) context.

    ``pooler``: a :class:`cosmos_fast.model.pooler.CrossAttentionPooler`; ``impl``: one of
    ``CROSS_POOL_IMPLS`` or ``"auto"``. Returns (B, n, D) L2-normalised features.
    """
    impl = resolve_cross_pool_impl(impl, queries.device, (queries.shape[-2], pooler.n_head, pooler.d_model))
    if impl == "reference":
        return cross_pool_reference(pooler, context, queries)
    return F.normalize(queries + pooler(context, queries, impl=impl), dim=-1)


# ------------------------------------------------------------------------------ implementations
def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(N, L, W) → (N, H, L, W/H), a view."""
    return x.unflatten(-1, (heads, x.shape[-1] // heads)).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(N, H, L, d) → (N, L, H·d)."""
    n, heads, length, d = x.shape
    return x.transpose(1, 2).reshape(n, length, heads * d)


def shared_attention(x: torch.Tensor, context: torch.Tensor, in_proj_weight: torch.Tensor,
                     in_proj_bias: torch.Tensor, heads: int,
                     core: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Cross-attention of x (N×n×W) over context (N×L×W), K and V projected once per context row.

    ``in_proj_weight`` (3W×W) / ``in_proj_bias`` (3W): the packed q, k, v projections;
    ``core(q, k, v) -> o`` on (N, H, ·, d) tensors: the model's attention switch
    (:func:`cosmos_fast.model.attention.attention`) or the Triton kernel. Returns (N, n, W), before
    the out-projection.
    """
    w = x.shape[-1]
    q = split_heads(F.linear(x, in_proj_weight[:w], in_proj_bias[:w]), heads)    # N × H × n × d
    # K and V in one matmul over the context (one weight slice, one gradient buffer)
    kv = F.linear(context, in_proj_weight[w:], in_proj_bias[w:])
    k, v = (split_heads(t, heads) for t in kv.chunk(2, dim=-1))                 # N × H × L × d (views)
    return merge_heads(core(q, k, v))


def absorbed_attention(x: torch.Tensor, context: torch.Tensor, in_proj_weight: torch.Tensor,
                       in_proj_bias: torch.Tensor, heads: int) -> torch.Tensor:
    """Cross-attention of x (N×n×W) over context (N×L×W) with the K/V projections absorbed.

    Per head h with q_h = W_q,h x + b_q,h (scaled by d^-1/2):
        q_h · (W_k,h c_l + b_k,h) = (W_k,hᵀ q_h) · c_l + const      (b_k cancels in the softmax)
        Σ_l p_l (W_v,h c_l + b_v,h) = W_v,h (Σ_l p_l c_l) + b_v,h   (the weights sum to 1)
    so no L-row K or V is formed: the scores and the pooled context cost n·H·L·W multiply-adds
    per sample instead of the 2·L·W² of the K/V projections (8× fewer for COSMOS' n = H = 8,
    W = 512). Equal to the K/V formulation up to floating-point order; b_k gets a zero gradient
    (its exact gradient: the softmax is invariant to it). Returns (N, n, W), before the
    out-projection.
    """
    n_batch, n, w = x.shape
    d = w // heads
    wq, wk, wv = in_proj_weight.chunk(3)
    bq, _, bv = in_proj_bias.chunk(3)
    q = F.linear(x, wq, bq) * d ** -0.5                                       # N × n × W
    # The core in fp32 (fp64 stays), like SDPA's internal softmax: in bf16 the W-long absorbed
    # queries, score dot products and their rounding before the softmax would double the K/V
    # formulation's error (measured on an H200, see bench_results/cross_pool).
    acc = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        q = q.to(acc).reshape(n_batch * n, heads, d).transpose(0, 1)          # H × Nn × d
        qk = torch.matmul(q, wk.to(acc).view(heads, d, w))                    # H × Nn × W
        qk = qk.view(heads, n_batch, n, w).permute(1, 2, 0, 3).reshape(n_batch, n * heads, w)
        ctx = context.to(acc)
        p = torch.matmul(qk, ctx.transpose(1, 2)).softmax(dim=-1)           # N × nH × L
        pooled = torch.matmul(p, ctx)                                         # N × nH × W
        pooled = pooled.view(n_batch * n, heads, w).transpose(0, 1)           # H × Nn × W
        o = torch.matmul(pooled, wv.to(acc).view(heads, d, w).transpose(1, 2))   # H × Nn × d
    return o.transpose(0, 1).reshape(n_batch, n, w).to(x.dtype) + bv


def _kernel_module():
    try:
        # lazy: the kernel module imports triton, an optional dependency
        from ..kernels import cross_pool as kernel
    except ImportError as e:            # triton missing
        raise RuntimeError(f"cross_pool impl='fused' needs triton, which failed to import: {e}") from e
    return kernel


def absorb_queries(x: torch.Tensor, in_proj_weight: torch.Tensor, in_proj_bias: torch.Tensor,
                   heads: int) -> torch.Tensor:
    """The absorbed queries of x (N×n×W): q̃_{i,h} = W_k,hᵀ (W_q,h x_i + b_q,h) / √d, as an
    (N, n·H, W) tensor (row i·H + h) in fp32 (fp64 stays), the precision of the scores' softmax."""
    n_batch, n, w = x.shape
    d = w // heads
    wq, wk, _ = in_proj_weight.chunk(3)
    bq = in_proj_bias[:w]
    q = F.linear(x, wq, bq) * d ** -0.5                                       # N × n × W
    acc = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        q = q.to(acc).reshape(n_batch * n, heads, d).transpose(0, 1)          # H × Nn × d
        qk = torch.matmul(q, wk.to(acc).view(heads, d, w))                    # H × Nn × W
        return qk.view(heads, n_batch, n, w).permute(1, 2, 0, 3).reshape(n_batch, n * heads, w)


def ln_pool(context: torch.Tensor, queries: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
            eps: float) -> torch.Tensor:
    """Σ_l softmax_l(q̃_m·LN(c_l))·LN(c_l) for raw context rows c_l (N×L×W) and queries q̃ (N×M×W),
    LN the LayerNorm with gain ``weight`` and bias ``bias``, by the fused Triton kernel
    (``kernels/cross_pool.py``).

    The kernel normalises the context without affine: q̃·LN(c) = (q̃∘γ)·ĉ + q̃·β, and q̃·β is the
    same for every row (it cancels in the softmax), so γ is folded into the queries and
    Σ p·LN(c) = γ∘(Σ p·ĉ) + β is applied to the (N, M, W) result; autograd takes γ's and β's
    gradients through these two products. Returns (N, M, W) in the queries' dtype.
    """
    kernel = _kernel_module()
    return kernel.ln_attention_pool(context, queries * weight, eps) * weight + bias


def fused_attention(x: torch.Tensor, context: torch.Tensor, in_proj_weight: torch.Tensor,
                    in_proj_bias: torch.Tensor, heads: int, ln_k: Callable[..., torch.Tensor]) -> torch.Tensor:
    """:func:`absorbed_attention` with LN_k and the attention pooling in one Triton kernel.

    ``context`` is the *raw* context (N×L×W), before LN_k; ``ln_k`` is the pooler's LN_k module,
    called as ``ln_k(context, pool_queries=q̃)`` so that it runs :func:`ln_pool` inside its own
    forward with its own γ and β (DeepSpeed ZeRO-3 gathers a module's parameters only while that
    module's forward runs). PyTorch keeps the small products: the absorbed queries
    (:func:`absorb_queries`), W_v applied per head to the (N, n·H, W) pooled context, and (in the
    caller) out_proj, the residual and the normalisation — those act on (N, n, W) rows after
    out_proj's GEMM, a small fraction of the context's bytes, and torch.compile fuses the
    elementwise part, so no hand-written epilogue kernel. Differentiable in x, the context and
    every weight (b_k gets a zero gradient, as in :func:`absorbed_attention`). Needs CUDA tensors,
    or TRITON_INTERPRET=1 set before the kernel module is first imported (the Triton interpreter
    on CPU; slow, for tests). Returns (N, n, W), before the out-projection.
    """
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError(
            f"cross_pool impl='fused' runs Triton kernels and needs CUDA tensors, got {x.device}; "
            "use impl='absorbed' (or 'auto') on CPU, or set TRITON_INTERPRET=1 before import to run the "
            "Triton interpreter (slow, for tests)")
    n_batch, n, w = x.shape
    d = w // heads
    _, _, wv = in_proj_weight.chunk(3)
    bv = in_proj_bias[2 * w:]
    pooled = ln_k(context, pool_queries=absorb_queries(x, in_proj_weight, in_proj_bias, heads))  # N × nH × W
    with torch.autocast(x.device.type, enabled=False):
        pooled = pooled.view(n_batch * n, heads, w).transpose(0, 1)           # H × Nn × W
        o = torch.matmul(pooled, wv.to(pooled.dtype).view(heads, d, w).transpose(1, 2))   # H × Nn × d
    return o.transpose(0, 1).reshape(n_batch, n, w).to(x.dtype) + bv
