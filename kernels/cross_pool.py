"""Fused attention core of COSMOS' cross-attention pooler: n queries per sample over one shared context.

For every sample b and head h, with queries Q (n×d), keys K and values V (L×d) and s = 1/√d:

    S   = s · Q·Kᵀ                                     (n×L)
    lse = log Σ_j exp(S_ij)                            (n,   per-row log-sum-exp)
    O   = exp(S − lse)·V                               (n×d)

Forward runs one program per (query block, b, h): it streams K/V in tiles of BLOCK_N keys with an
online softmax and writes O and lse. Nothing of size n×L is stored; backward recomputes
P = exp(S − lse) tile by tile:

    δ_i = Σ_d dO_id · O_id
    dV  = Pᵀ·dO          dP = dO·Vᵀ          dS = P ∘ (dP − δ)
    dK  = s · dSᵀ·Q      dQ = s · dS·K

Backward runs one program per (b, h) that holds all n queries of the sample, so dK and dV (which
sum over the n queries) are complete per key tile and written once — no atomics, no second pass.

Saved for backward: q, k, v, o (o is the out-projection's input, so saving it costs nothing) and
lse (B×H×n fp32).

Layout: q (B, H, n, d), k and v (B, H, L, d), any strides (the (B, L, H, d) views produced by
splitting heads of a projection output are read in place). o, dq, dk and dv are returned as
(B, H, ·, d) views of (B, ·, H, d) buffers, so merging heads afterwards is free.

Limits: 1 ≤ n ≤ 128 (COSMOS uses n = 8), head dim ≤ 256, L ≥ 1; fp32, bf16 and fp16 inputs with fp32
accumulation. ``tl.dot`` needs every dimension ≥ 16 on NVIDIA GPUs: the query block and the head dim
are padded to powers of two ≥ 16 with masked loads (so n = 1, n = 8 and d = 8 compile). fp32 inputs
use IEEE fp32 dot products; bf16/fp16 inputs are upcast and use TF32 dot products, which represent
them exactly (only the probabilities P and dS are truncated to TF32).

Devices: the kernels need CUDA tensors, or TRITON_INTERPRET=1 set before this module is imported
(the Triton interpreter on CPU; slow, for tests). Tested: the Triton interpreter on CPU with fp32
and bf16 inputs, and on an NVIDIA H200 (the GPU-only tests in tests/test_cross_pool.py: bf16,
D = 512 production shapes, head dim 8); timings in bench_results/cross_pool/.

The op is registered as ``torch.ops.cosmos_fast.cross_pool_attn_fwd`` / ``..._bwd`` custom ops with
fake (meta) implementations and autograd, so models calling :func:`cross_pool_attn` trace under
``torch.compile``.

This module is Triton-only; it does not import the trainer.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

MAX_QUERIES = 128
MAX_HEAD_DIM = 256
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _cross_pool_attn_fwd_kernel(
    # pointers
    Q, K, V, O, LSE,
    # strides: (batch, head, row, feature) of q, k, v and o; lse is contiguous (B, H, n)
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    # sizes
    H, N_Q, L, HEAD_D,
    sm_scale,
    # compile-time blocks: query rows, keys per tile, padded head dim; dot precision
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)          # 64-bit offsets: B·L·D may exceed 2³¹ elements
    h = pid_bh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N_Q
    mask_d = offs_d < HEAD_D

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, L, BLOCK_N):
        cols = start + offs_n
        mask_n = cols < L
        kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=mask_d[:, None] & mask_n[None, :], other=0.0).to(tl.float32)  # BLOCK_D × BLOCK_N
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * sm_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(tl.float32)   # BLOCK_N × BLOCK_D
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    tl.store(LSE + pid_bh * N_Q + offs_m, m_i + tl.log(l_i), mask=mask_m)


@triton.jit
def _cross_pool_attn_bwd_kernel(
    # pointers
    Q, K, V, O, DO, LSE, DQ, DK, DV,
    # strides: (batch, head, row, feature); dq/dk/dv share the strides of q/k/v's output buffers
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    # sizes
    H, N_Q, L, HEAD_D,
    sm_scale,
    # compile-time blocks (BLOCK_M ≥ N_Q: one program holds every query of its (b, h))
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N_Q
    mask_d = offs_d < HEAD_D
    mask_md = mask_m[:, None] & mask_d[None, :]

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=mask_md, other=0.0).to(tl.float32)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=mask_md, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom
                 + offs_d[None, :] * stride_dod, mask=mask_md, other=0.0).to(tl.float32)
    lse = tl.load(LSE + pid_bh * N_Q + offs_m, mask=mask_m, other=0.0)
    delta = tl.sum(do * o, 1)                                     # δ_i = rowsum(dO ∘ O)

    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    dk_base = DK + b * stride_dkb + h * stride_dkh
    dv_base = DV + b * stride_dvb + h * stride_dvh
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, L, BLOCK_N):
        cols = start + offs_n
        mask_n = cols < L
        mask_nd = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=mask_nd, other=0.0).to(tl.float32)       # BLOCK_N × BLOCK_D
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=mask_nd, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale       # BLOCK_M × BLOCK_N
        p = tl.exp(s - lse[:, None])
        p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
        dv = tl.dot(tl.trans(p), do, input_precision=DOT_PRECISION)                # BLOCK_N × BLOCK_D
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)                # BLOCK_M × BLOCK_N
        ds = p * (dp - delta[:, None])
        dk = tl.dot(tl.trans(ds), q, input_precision=DOT_PRECISION) * sm_scale     # BLOCK_N × BLOCK_D
        dq += tl.dot(ds, k, input_precision=DOT_PRECISION)
        tl.store(dk_base + cols[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
                 dk.to(DK.dtype.element_ty), mask=mask_nd)
        tl.store(dv_base + cols[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
                 dv.to(DV.dtype.element_ty), mask=mask_nd)

    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
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
    return isinstance(_cross_pool_attn_fwd_kernel, InterpretedFunction)


def _check_device(*tensors: torch.Tensor) -> None:
    dev = tensors[0].device
    for t in tensors[1:]:
        if t.device != dev:
            raise ValueError(f"cross_pool_attn: all tensors must be on one device, got {dev} and {t.device}")
    if dev.type == "cuda":
        return
    if dev.type == "cpu" and _interpreting():
        return
    raise RuntimeError(
        f"cross_pool_attn runs Triton kernels and needs CUDA tensors, got device {dev}. On a machine "
        "without a GPU use the PyTorch path (cross_pool impl='shared'); to run the kernels in the "
        "Triton interpreter (slow, for tests) set TRITON_INTERPRET=1 before cosmos_fast.kernels.cross_pool "
        "is imported.")


def _blocks(n: int, d: int) -> tuple[int, int, int]:
    """BLOCK_M, BLOCK_N, BLOCK_D: powers of two, every one ≥ 16 (tl.dot's minimum on NVIDIA GPUs)."""
    block_m = max(16, triton.next_power_of_2(n))
    block_d = max(16, triton.next_power_of_2(d))
    block_n = 64 if block_d <= 64 and block_m <= 32 else 32
    return block_m, block_n, block_d


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 stays IEEE fp32; bf16/fp16 are exact in TF32, so their upcast copies use TF32 tensor cores
    return "ieee" if dtype == torch.float32 else "tf32"


def _bhsd(b: int, h: int, s: int, d: int, like: torch.Tensor) -> torch.Tensor:
    """A (B, H, S, d) view of a fresh contiguous (B, S, H, d) buffer (merging heads is then free)."""
    return like.new_empty((b, s, h, d)).transpose(1, 2)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int]:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"cross_pool_attn: {name} must be 4-D (B, H, rows, d), got shape {tuple(t.shape)}")
    b, h, n, d = q.shape
    length = k.shape[2]
    if tuple(k.shape) != (b, h, length, d) or tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"cross_pool_attn: expected q (B, H, n, d) and k, v (B, H, L, d) with equal B, H, d; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"cross_pool_attn: q, k, v must share one dtype among {_DTYPES}, "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if not 1 <= n <= MAX_QUERIES:
        raise ValueError(f"cross_pool_attn: number of queries per sample must be in [1, {MAX_QUERIES}], got {n}")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"cross_pool_attn: head dim must be in [1, {MAX_HEAD_DIM}], got {d}")
    if length < 1:
        raise ValueError("cross_pool_attn: the context needs at least one key (L ≥ 1)")
    return b, h, n, length, d


def cross_pool_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Returns o (B, H, n, d; q's dtype) and lse (B, H, n; fp32)."""
    b, h, n, length, d = _check_qkv(q, k, v)
    _check_device(q, k, v)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    o = _bhsd(b, h, n, d, q)
    lse = torch.empty((b, h, n), dtype=torch.float32, device=q.device)
    if b == 0 or h == 0:
        return o, lse
    block_m, block_n, block_d = _blocks(n, d)
    grid = (triton.cdiv(n, block_m), b * h)
    _cross_pool_attn_fwd_kernel[grid](
        q, k, v, o, lse,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        h, n, length, d,
        scale,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=4,
    )
    return o, lse


def cross_pool_attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        o: torch.Tensor, lse: torch.Tensor,
                        scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernel. Returns dq, dk, dv with the shapes and dtype of q, k, v."""
    b, h, n, length, d = _check_qkv(q, k, v)
    if tuple(do.shape) != tuple(q.shape) or tuple(o.shape) != tuple(q.shape):
        raise ValueError(f"cross_pool_attn_bwd: do and o must have q's shape {tuple(q.shape)}, "
                         f"got {tuple(do.shape)} and {tuple(o.shape)}")
    if tuple(lse.shape) != (b, h, n) or lse.dtype != torch.float32:
        raise ValueError(f"cross_pool_attn_bwd: lse must be fp32 of shape {(b, h, n)}, "
                         f"got {lse.dtype} {tuple(lse.shape)}")
    _check_device(q, k, v, do, o, lse)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    lse = lse.contiguous()
    dq = _bhsd(b, h, n, d, q)
    dk = _bhsd(b, h, length, d, k)
    dv = _bhsd(b, h, length, d, v)
    if b == 0 or h == 0:
        return dq, dk, dv
    block_m, block_n, block_d = _blocks(n, d)
    _cross_pool_attn_bwd_kernel[(b * h,)](
        q, k, v, o, do, lse, dq, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *do.stride(),
        *dq.stride(), *dk.stride(), *dv.stride(),
        h, n, length, d,
        scale,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=4,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Custom ops (traceable by torch.compile) with autograd
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("cosmos_fast::cross_pool_attn_fwd", mutates_args=())
def _cross_pool_attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return cross_pool_attn_fwd(q, k, v, scale)


@_cross_pool_attn_fwd_op.register_fake
def _(q, k, v, scale):
    b, h, n, d = q.shape
    return _bhsd(b, h, n, d, q), q.new_empty((b, h, n), dtype=torch.float32)


@torch.library.custom_op("cosmos_fast::cross_pool_attn_bwd", mutates_args=())
def _cross_pool_attn_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            o: torch.Tensor, lse: torch.Tensor,
                            scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return cross_pool_attn_bwd(do, q, k, v, o, lse, scale)


@_cross_pool_attn_bwd_op.register_fake
def _(do, q, k, v, o, lse, scale):
    b, h, n, d = q.shape
    length = k.shape[2]
    return _bhsd(b, h, n, d, q), _bhsd(b, h, length, d, k), _bhsd(b, h, length, d, v)


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)        # o is also the out-projection's input: no extra memory
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _cross_pool_attn_bwd_op(do, q, k, v, o, lse, ctx.scale)
    return dq, dk, dv, None


_cross_pool_attn_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------
def cross_pool_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(scale·q·kᵀ)·v per (sample, head), differentiable in q, k and v.

    q: (B, H, n, d) queries, 1 ≤ n ≤ 128; k, v: (B, H, L, d) keys and values of the shared context
    (any strides); scale defaults to 1/√d. Returns o (B, H, n, d) in q's dtype — a view of a
    contiguous (B, n, H, d) buffer, so ``o.transpose(1, 2).reshape(B, n, H·d)`` does not copy.
    """
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    return _cross_pool_attn_fwd_op(q, k, v, scale)[0]
