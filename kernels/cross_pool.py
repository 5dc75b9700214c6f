"""Fused LayerNorm + attention pooling of COSMOS' cross-attention pooler, absorbed formulation.

The pooler attends n queries per sample over one shared context with H heads. With W_k folded
into the queries (q̃_h = W_k,hᵀ q_h / √d; b_k cancels in the softmax) and LN_k's gain γ folded
into them too (q' = q̃ ∘ γ; the β term q̃·β is the same for every context row and cancels), the
attention of all M = n·H (query, head) pairs reduces to one pooling of the *normalised* context
per sample b, with x_l the raw context rows (L×D) and x̂_l = (x_l − μ_l)·r_l, r_l = 1/√(σ²_l + ε):

    S   = Q'·X̂ᵀ                                    (M×L)
    lse = log₂ Σ_l 2^(S_ml·log₂e)                   (M,  per-query log-sum-exp, base 2)
    O   = softmax_l(S)·X̂                            (M×D)

The caller applies the rest on (B, M, D) tensors (``cosmos_fast.ops.cross_pool.fused_attention``):
Σ_l p_l·LN_k(x_l) = γ∘O + β, then W_v per head, out_proj, residual and normalisation — small
GEMMs whose inputs are M rows per sample, not L. The kernel reads the raw context once per block
of 16 queries and never forms LN_k(x), K, V or an M×L matrix in memory.

Forward: one program per (query block, sample); it streams the context in tiles of BLOCK_L rows,
computes each row's mean and variance over D in registers (the row is loaded whole, BLOCK_D ≥ D),
and runs an online softmax with exp2 (log₂e folded into the scores). It writes O, lse and the rows'
μ and r (stored by the first query block). Saved for backward: x, q', O, lse (B×M fp32) and μ, r
(B×L fp32) — no M×L matrix.

Backward: with δ_m = Σ_D dO_m·O_m (computed by the launcher), the kernels recompute
P = 2^(S·log₂e − lse) tile by tile and

    dP  = dO·X̂ᵀ          dS = P ∘ (dP − δ)
    dQ' = dS·X̂           dX̂ = Pᵀ·dO + dSᵀ·Q'
    dx  = r·(dX̂ − mean_D(dX̂) − x̂·mean_D(dX̂ ∘ x̂))      (LayerNorm backward without affine)

in two kernels that each own what they write, so neither needs atomics, a workspace or a second
pass: one program per (context tile, sample) sums dX̂ over every query block and runs the
LayerNorm backward on its whole rows; one program per (query block, sample) sums dQ' over every
context tile. S and dP are computed in both (7 instead of 5 tile products), which buys a grid of
⌈L/BLOCK_L⌉·B + ⌈M/BLOCK_M⌉·B programs instead of B.

Limits: D ≤ 512 (a context row is held whole in registers and shared memory; COSMOS' poolers are
512 wide), any M ≥ 1 and L ≥ 1. Context x in fp32, bf16 or fp16, queries q' in any of them (the pooler passes fp32), fp32 accumulation and fp32 LayerNorm
statistics; O and dq' in q's dtype, dx in x's dtype. ``tl.dot`` needs every dimension ≥ 16 on
NVIDIA GPUs: query and row blocks are 16 or more and D is padded to a power of two with masked
loads. fp32 contexts use IEEE fp32 dot products; bf16/fp16 contexts use TF32 (x̂ and q' are then
rounded to TF32's 10-bit mantissa inside the dots, finer than the inputs' own rounding).

Devices: CUDA tensors, or TRITON_INTERPRET=1 set before this module is imported (the Triton
interpreter on CPU; slow, for tests). Tested under the interpreter (fp32, and bf16/fp16 contexts
for the kernel alone); NOT yet verified on a GPU (block sizes and warps are untuned guesses until a GPU run measures them).

The op is registered as ``torch.ops.cosmos_fast.ln_attention_pool_fwd`` / ``..._bwd`` custom ops
with fake (meta) implementations and autograd, so models calling :func:`ln_attention_pool` trace
under ``torch.compile``.

This module is Triton-only; it does not import the trainer.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

MAX_WIDTH = 512          # a context row is held whole; see the block sizes below
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _ln_attention_pool_fwd_kernel(
    # pointers
    X, Q, O, LSE, MEAN, RSTD,
    # strides: (batch, row, feature) of x, q and o; lse (B, M), mean and rstd (B, L) are contiguous
    stride_xb, stride_xl, stride_xd,
    stride_qb, stride_qm, stride_qd,
    stride_ob, stride_om, stride_od,
    # sizes
    M, L, D,
    eps,
    # compile-time blocks: queries, context rows per tile, padded width; dot precision
    BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)        # 64-bit offsets: B·L·D may exceed 2³¹ elements
    log2e: tl.constexpr = 1.4426950408889634

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_l = tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < M
    mask_d = offs_d < D

    q = tl.load(Q + b * stride_qb + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(tl.float32)    # BLOCK_M × BLOCK_D
    x_base = X + b * stride_xb
    write_stats = pid_m == 0                 # one query block stores the rows' LayerNorm statistics

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, L, BLOCK_L):
        rows = start + offs_l
        mask_l = rows < L
        x = tl.load(x_base + rows[:, None] * stride_xl + offs_d[None, :] * stride_xd,
                    mask=mask_l[:, None] & mask_d[None, :], other=0.0).to(tl.float32)  # BLOCK_L × BLOCK_D
        # LayerNorm statistics of each row over its D features (biased variance, as F.layer_norm)
        mean = tl.sum(x, 1) / D
        xc = tl.where(mask_d[None, :], x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / D + eps)
        xhat = xc * rstd[:, None]
        tl.store(MEAN + b * L + rows, mean, mask=mask_l & write_stats)
        tl.store(RSTD + b * L + rows, rstd, mask=mask_l & write_stats)
        # online softmax over the context rows, base 2
        s = tl.dot(q, tl.trans(xhat), input_precision=DOT_PRECISION) * log2e            # BLOCK_M × BLOCK_L
        s = tl.where(mask_l[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, xhat, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    tl.store(O + b * stride_ob + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             acc.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    tl.store(LSE + b * M + offs_m, m_i + tl.log2(l_i), mask=mask_m)


@triton.jit
def _ln_attention_pool_bwd_dx_kernel(
    # pointers
    X, Q, DO, LSE, DELTA, MEAN, RSTD, DX,
    # strides: (batch, row, feature) of x, q, do and dx; lse, delta (B, M), mean and rstd (B, L)
    # are contiguous
    stride_xb, stride_xl, stride_xd,
    stride_qb, stride_qm, stride_qd,
    stride_dob, stride_dom, stride_dod,
    stride_dxb, stride_dxl, stride_dxd,
    # sizes
    M, L, D,
    # compile-time blocks; dot precision
    BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dx for one tile of BLOCK_L context rows of one sample: dX̂ summed over every query block,
    then the LayerNorm backward of the whole rows."""
    pid_l = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    log2e: tl.constexpr = 1.4426950408889634

    rows = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_l = rows < L
    mask_d = offs_d < D
    mask_ld = mask_l[:, None] & mask_d[None, :]

    x = tl.load(X + b * stride_xb + rows[:, None] * stride_xl + offs_d[None, :] * stride_xd,
                mask=mask_ld, other=0.0).to(tl.float32)                                 # BLOCK_L × BLOCK_D
    mean = tl.load(MEAN + b * L + rows, mask=mask_l, other=0.0)
    rstd = tl.load(RSTD + b * L + rows, mask=mask_l, other=0.0)
    xhat = tl.where(mask_ld, (x - mean[:, None]) * rstd[:, None], 0.0)
    dxhat = tl.zeros((BLOCK_L, BLOCK_D), tl.float32)
    for m_start in range(0, M, BLOCK_M):
        offs_m = m_start + offs_m0
        mask_m = offs_m < M
        mask_md = mask_m[:, None] & mask_d[None, :]
        q = tl.load(Q + b * stride_qb + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=mask_md, other=0.0).to(tl.float32)                             # BLOCK_M × BLOCK_D
        do = tl.load(DO + b * stride_dob + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                     mask=mask_md, other=0.0).to(tl.float32)
        lse = tl.load(LSE + b * M + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + b * M + offs_m, mask=mask_m, other=0.0)
        s = tl.dot(q, tl.trans(xhat), input_precision=DOT_PRECISION) * log2e           # BLOCK_M × BLOCK_L
        p = tl.where(mask_m[:, None] & mask_l[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(xhat), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dxhat += tl.dot(tl.trans(p), do, input_precision=DOT_PRECISION)
        dxhat += tl.dot(tl.trans(ds), q, input_precision=DOT_PRECISION)
    # LayerNorm backward (no affine: γ and β act on (B, M, D) tensors outside the kernel)
    c1 = tl.sum(dxhat * xhat, 1) / D
    c2 = tl.sum(dxhat, 1) / D
    dx = (dxhat - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
    tl.store(DX + b * stride_dxb + rows[:, None] * stride_dxl + offs_d[None, :] * stride_dxd,
             dx.to(DX.dtype.element_ty), mask=mask_ld)


@triton.jit
def _ln_attention_pool_bwd_dq_kernel(
    # pointers
    X, Q, DO, LSE, DELTA, MEAN, RSTD, DQ,
    # strides: (batch, row, feature) of x, q, do and dq; lse, delta, mean and rstd contiguous
    stride_xb, stride_xl, stride_xd,
    stride_qb, stride_qm, stride_qd,
    stride_dob, stride_dom, stride_dod,
    stride_dqb, stride_dqm, stride_dqd,
    # sizes
    M, L, D,
    # compile-time blocks; dot precision
    BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dq' for one block of BLOCK_M queries of one sample, summed over every context tile."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    log2e: tl.constexpr = 1.4426950408889634

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_l = tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < M
    mask_d = offs_d < D
    mask_md = mask_m[:, None] & mask_d[None, :]

    q = tl.load(Q + b * stride_qb + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=mask_md, other=0.0).to(tl.float32)                                 # BLOCK_M × BLOCK_D
    do = tl.load(DO + b * stride_dob + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=mask_md, other=0.0).to(tl.float32)
    lse = tl.load(LSE + b * M + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + b * M + offs_m, mask=mask_m, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, L, BLOCK_L):
        rows = start + offs_l
        mask_l = rows < L
        mask_ld = mask_l[:, None] & mask_d[None, :]
        x = tl.load(X + b * stride_xb + rows[:, None] * stride_xl + offs_d[None, :] * stride_xd,
                    mask=mask_ld, other=0.0).to(tl.float32)                             # BLOCK_L × BLOCK_D
        mean = tl.load(MEAN + b * L + rows, mask=mask_l, other=0.0)
        rstd = tl.load(RSTD + b * L + rows, mask=mask_l, other=0.0)
        xhat = tl.where(mask_ld, (x - mean[:, None]) * rstd[:, None], 0.0)
        s = tl.dot(q, tl.trans(xhat), input_precision=DOT_PRECISION) * log2e           # BLOCK_M × BLOCK_L
        p = tl.where(mask_m[:, None] & mask_l[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(xhat), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds, xhat, input_precision=DOT_PRECISION)
    tl.store(DQ + b * stride_dqb + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=mask_md)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _interpreting() -> bool:
    """True when the kernels above were built for the Triton interpreter (CPU tensors allowed)."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:      # pragma: no cover - layout of older tritons
        return True
    return isinstance(_ln_attention_pool_fwd_kernel, InterpretedFunction)


def _check_device(*tensors: torch.Tensor) -> None:
    dev = tensors[0].device
    for t in tensors[1:]:
        if t.device != dev:
            raise ValueError(f"ln_attention_pool: all tensors must be on one device, got {dev} and {t.device}")
    if dev.type == "cuda":
        return
    if dev.type == "cpu" and _interpreting():
        return
    raise RuntimeError(
        f"ln_attention_pool runs Triton kernels and needs CUDA tensors, got device {dev}. On a machine "
        "without a GPU use the PyTorch paths (cross_pool impl='absorbed' or 'shared'); to run the "
        "kernels in the Triton interpreter (slow, for tests) set TRITON_INTERPRET=1 before "
        "cosmos_fast.kernels.cross_pool is imported.")


def _check_inputs(x: torch.Tensor, q: torch.Tensor) -> tuple[int, int, int, int]:
    if x.dim() != 3 or q.dim() != 3:
        raise ValueError(f"ln_attention_pool: context must be (B, L, D) and queries (B, M, D), got "
                         f"{tuple(x.shape)} and {tuple(q.shape)}")
    b, length, d = x.shape
    if q.shape[0] != b or q.shape[2] != d:
        raise ValueError(f"ln_attention_pool: queries must be (B, M, D) = ({b}, M, {d}) for context "
                         f"{tuple(x.shape)}, got {tuple(q.shape)}")
    if x.dtype not in _DTYPES or q.dtype not in _DTYPES:
        raise ValueError(f"ln_attention_pool: context and queries must be among {_DTYPES}, "
                         f"got {x.dtype} and {q.dtype}")
    if not 1 <= d <= MAX_WIDTH:
        raise ValueError(f"ln_attention_pool: width D must be in [1, {MAX_WIDTH}], got {d}")
    if length < 1:
        raise ValueError("ln_attention_pool: the context needs at least one row (L ≥ 1)")
    if q.shape[1] < 1:
        raise ValueError("ln_attention_pool: needs at least one query (M ≥ 1)")
    return b, length, q.shape[1], d


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 stays IEEE fp32; for bf16/fp16 contexts TF32 keeps more bits than the inputs carry
    return "ieee" if dtype == torch.float32 else "tf32"


# Blocks and warps: powers of two, every block ≥ 16 (tl.dot's minimum). Chosen by compiling for
# sm_90 without a GPU (triton.compile + ptxas -v): at D = 512 the forward needs 66 KB of shared
# memory and no spills with a bf16 context (132 KB with fp32); 32-row tiles or 64-query blocks
# at D = 512 spill or need more shared memory (benchmarks/bench_cross_pool.py --compile-check),
# and D = 1024 does not fit a Hopper SM with an fp32 context. Untimed: a GPU run should sweep them.
def _fwd_config(m: int, d: int) -> dict:
    block_d = max(16, triton.next_power_of_2(d))
    block_m = 16 if block_d >= 512 else min(64, max(16, triton.next_power_of_2(m)))
    return {"BLOCK_M": block_m, "BLOCK_L": 16 if block_d >= 512 else 32, "BLOCK_D": block_d,
            "num_warps": 8 if block_d >= 256 else 4}


def _bwd_config(d: int) -> dict:
    block_d = max(16, triton.next_power_of_2(d))
    return {"BLOCK_M": 16, "BLOCK_L": 16 if block_d >= 512 else 32, "BLOCK_D": block_d,
            "num_warps": 8 if block_d >= 256 else 4}


def ln_attention_pool_fwd(x: torch.Tensor, q: torch.Tensor, eps: float = 1e-5
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on context x (B, L, D) and queries q (B, M, D), any strides.

    Returns o (B, M, D; q's dtype) = softmax(q·x̂ᵀ)·x̂ with x̂ the context rows normalised without
    affine, lse (B, M; fp32, base 2) and the rows' mean and rstd (B, L; fp32).
    """
    b, length, m, d = _check_inputs(x, q)
    _check_device(x, q)
    o = q.new_empty((b, m, d))
    lse = torch.empty((b, m), dtype=torch.float32, device=q.device)
    mean = torch.empty((b, length), dtype=torch.float32, device=q.device)
    rstd = torch.empty_like(mean)
    if b == 0:
        return o, lse, mean, rstd
    cfg = _fwd_config(m, d)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), b)
    _ln_attention_pool_fwd_kernel[grid](
        x, q, o, lse, mean, rstd,
        *x.stride(), *q.stride(), *o.stride(),
        m, length, d,
        float(eps),
        DOT_PRECISION=_dot_precision(x.dtype), **cfg,
    )
    return o, lse, mean, rstd


def ln_attention_pool_bwd(do: torch.Tensor, x: torch.Tensor, q: torch.Tensor, o: torch.Tensor,
                          lse: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the two backward kernels. Returns dx (x's shape and dtype) and dq (q's shape and dtype)."""
    b, length, m, d = _check_inputs(x, q)
    if tuple(do.shape) != tuple(q.shape) or tuple(o.shape) != tuple(q.shape):
        raise ValueError(f"ln_attention_pool_bwd: do and o must have the queries' shape {tuple(q.shape)}, "
                         f"got {tuple(do.shape)} and {tuple(o.shape)}")
    for name, t, shape in (("lse", lse, (b, m)), ("mean", mean, (b, length)), ("rstd", rstd, (b, length))):
        if tuple(t.shape) != shape or t.dtype != torch.float32:
            raise ValueError(f"ln_attention_pool_bwd: {name} must be fp32 of shape {shape}, "
                             f"got {t.dtype} {tuple(t.shape)}")
    _check_device(x, q, do, o, lse, mean, rstd)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if b == 0:
        return dx, dq
    delta = (do.float() * o.float()).sum(-1)                          # δ_m = Σ_D dO_m · O_m, (B, M)
    lse, mean, rstd = lse.contiguous(), mean.contiguous(), rstd.contiguous()
    strides = (*x.stride(), *q.stride(), *do.stride())
    cfg = _bwd_config(d)
    _ln_attention_pool_bwd_dx_kernel[(triton.cdiv(length, cfg["BLOCK_L"]), b)](
        x, q, do, lse, delta, mean, rstd, dx,
        *strides, *dx.stride(),
        m, length, d,
        DOT_PRECISION=_dot_precision(x.dtype), **cfg,
    )
    cfg = _fwd_config(m, d)          # the dq kernel walks the context like the forward
    _ln_attention_pool_bwd_dq_kernel[(triton.cdiv(m, cfg["BLOCK_M"]), b)](
        x, q, do, lse, delta, mean, rstd, dq,
        *strides, *dq.stride(),
        m, length, d,
        DOT_PRECISION=_dot_precision(x.dtype), **cfg,
    )
    return dx, dq


# ----------------------------------------------------------------------------------------------
# Custom ops (traceable by torch.compile) with autograd
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("cosmos_fast::ln_attention_pool_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, q: torch.Tensor,
            eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return ln_attention_pool_fwd(x, q, eps)


@_fwd_op.register_fake
def _(x, q, eps):
    b, length, _ = x.shape
    m = q.shape[1]
    stats = x.new_empty((b, length), dtype=torch.float32)
    return q.new_empty(q.shape), q.new_empty((b, m), dtype=torch.float32), stats, torch.empty_like(stats)


@torch.library.custom_op("cosmos_fast::ln_attention_pool_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, x: torch.Tensor, q: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
            mean: torch.Tensor, rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return ln_attention_pool_bwd(do, x, q, o, lse, mean, rstd)


@_bwd_op.register_fake
def _(do, x, q, o, lse, mean, rstd):
    return x.new_empty(x.shape), q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    x, q, _eps = inputs
    o, lse, mean, rstd = output
    ctx.save_for_backward(x, q, o, lse, mean, rstd)
    ctx.mark_non_differentiable(lse, mean, rstd)


def _backward(ctx, do, _dlse, _dmean, _drstd):
    x, q, o, lse, mean, rstd = ctx.saved_tensors
    dx, dq = _bwd_op(do.contiguous(), x, q, o, lse, mean, rstd)
    return dx, dq, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------
def ln_attention_pool(context: torch.Tensor, queries: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """softmax_l(queries·x̂_lᵀ)·x̂ per sample, differentiable in context and queries.

    context: (B, L, D) raw rows x_l, D ≤ 512; x̂_l = (x_l − mean)/√(var + eps) over D (a LayerNorm
    without affine); queries: (B, M, D), already scaled (no 1/√d is applied here). Returns (B, M, D)
    in the queries' dtype. The pooler's caller folds LN_k's gain into the queries and adds its bias
    afterwards (``cosmos_fast.ops.cross_pool.ln_pool``).
    """
    return _fwd_op(context, queries, float(eps))[0]

