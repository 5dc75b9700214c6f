"""The previous fused COSMOS loss kernels (separate row, column, dU and dV passes; BLOCK_M = 32),
kept only for the benchmark's ablation (``benchmarks/bench_contrastive.py``): plain launchers, not
registered as custom ops and not used by the package. The current kernels are in
``kernels/contrastive.py``.

Math (one pair p, q; U_p = rows p·B..(p+1)·B-1 of the student base, V_q = rows q·N..(q+1)·N-1 of
the target base; τ the group's logit scale):

    S_ij      = τ · U_p[i] · V_q[j]                                  (never stored)
    rlse_i    = log Σ_j exp S_ij                                     (complete: all N columns)
    cmax_j    = max_i S_ij,  csum_j = Σ_i exp(S_ij − cmax_j)          (partial: this rank's B rows)

Backward, given the complete column log-sum-exp ``clse`` and a per-pair coefficient c_pq (the
upstream gradient of Σ_i rlse_i + Σ_j clse_j):

    dS_ij = c_pq · [exp(S_ij − rlse_i) + exp(S_ij − clse_j)]
    dU_p  = τ · Σ_q dS · V_q        dV_q = τ · Σ_p dSᵀ · U_p        dτ = Σ dS_ij · S_ij / τ

(the −2·S_ii diagonal term of the loss is a row-wise dot product handled outside in PyTorch).

Forward saves nothing of size B×N: only rlse (P,Q,B) and the column statistics (P,Q,N). Backward
recomputes every S tile. Tiles are BLOCK_M rows × BLOCK_N columns with the whole feature
dimension D in one block (D ≤ 1024), accumulated in fp32; inputs may be fp32, bf16 or fp16 and B,
N, D need not be multiples of the blocks. Grids put the pair on a grid axis (forward) or loop over
the other side's matrices inside a program (backward), so each launch covers all P×Q pairs of a
group and no two programs write the same output.

The public entry points are registered as ``torch.library`` custom ops with fake implementations
(``cosmos_fast::contrastive_fwd``, ``cosmos_fast::contrastive_bwd``), so code calling them traces
under ``torch.compile``. Without CUDA they run only under ``TRITON_INTERPRET=1`` (tests, fp32).
Tested here: the Triton interpreter on CPU (fp32). GPU runs: see bench_results/contrastive/.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .contrastive import _dot_precision   # the current kernels' rule: fp32 follows torch's matmul setting

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_D = 1024


@triton.jit
def _load_block(base, first_row, idx, n_rows, stride, offs_d, D, CAST_F32: tl.constexpr):
    """Rows ``first_row + idx`` (masked to idx < n_rows) of a row-major base, all D features
    (masked beyond D), as one (len(idx), BLOCK_D) tile; fp32 when CAST_F32 (the interpreter)."""
    x = tl.load(base + (first_row + idx)[:, None] * stride + offs_d[None, :],
                mask=(idx < n_rows)[:, None] & (offs_d < D)[None, :], other=0.0)
    if CAST_F32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _contrastive_row_fwd_kernel(
    U, V, TAU, RLSE,                      # pointers: student base, target base, scale, out (P,Q,B)
    stride_u, stride_v,                   # row strides (the feature dim is contiguous)
    B, N, D, Q,                           # sizes
    CAST_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    p = tl.program_id(1)
    q = tl.program_id(2)
    tau = tl.load(TAU).to(tl.float32)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < B
    u = _load_block(U, p * B, rows, B, stride_u, offs_d, D, CAST_F32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        v = _load_block(V, q * N, cols, N, stride_v, offs_d, D, CAST_F32)
        s = tl.dot(u, tl.trans(v), input_precision=DOT_PRECISION) * tau
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m_i = m_new
    out = RLSE + (p * Q + q) * B + rows
    tl.store(out, m_i + tl.log(l_i), mask=row_ok)


@triton.jit
def _contrastive_col_fwd_kernel(
    U, V, TAU, CMAX, CSUM,                # out: column max and Σ exp(S − max) over this rank's rows
    stride_u, stride_v,
    B, N, D, Q,
    CAST_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    p = tl.program_id(1)
    q = tl.program_id(2)
    tau = tl.load(TAU).to(tl.float32)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = cols < N
    v = _load_block(V, q * N, cols, N, stride_v, offs_d, D, CAST_F32)
    m_j = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    l_j = tl.zeros((BLOCK_N,), tl.float32)
    for m0 in range(0, B, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < B
        u = _load_block(U, p * B, rows, B, stride_u, offs_d, D, CAST_F32)
        s = tl.dot(u, tl.trans(v), input_precision=DOT_PRECISION) * tau
        s = tl.where(row_ok[:, None], s, float("-inf"))
        m_new = tl.maximum(m_j, tl.max(s, axis=0))
        l_j = l_j * tl.exp(m_j - m_new) + tl.sum(tl.exp(s - m_new[None, :]), axis=0)
        m_j = m_new
    base = (p * Q + q) * N + cols
    tl.store(CMAX + base, m_j, mask=col_ok)
    tl.store(CSUM + base, l_j, mask=col_ok)


@triton.jit
def _contrastive_du_bwd_kernel(
    U, V, TAU, RLSE, CLSE, COEF, DU, DTAU,   # DU (P·B, D) fp32; DTAU (P, B) per-row partial dτ
    stride_u, stride_v,
    B, N, D, Q,
    CAST_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    p = tl.program_id(1)
    tau = tl.load(TAU).to(tl.float32)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < B
    d_ok = offs_d < D
    u = _load_block(U, p * B, rows, B, stride_u, offs_d, D, CAST_F32)
    du = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    dtau = tl.zeros((BLOCK_M,), tl.float32)
    for q in range(0, Q):
        coef = tl.load(COEF + p * Q + q).to(tl.float32)
        rlse = tl.load(RLSE + (p * Q + q) * B + rows, mask=row_ok, other=0.0)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            v = _load_block(V, q * N, cols, N, stride_v, offs_d, D, CAST_F32)
            clse = tl.load(CLSE + (p * Q + q) * N + cols, mask=col_ok, other=0.0)
            s = tl.dot(u, tl.trans(v), input_precision=DOT_PRECISION) * tau
            # e = dS / c_pq ∈ [0, 2]: the coefficient multiplies the fp32 product, so a 16-bit e
            # keeps its precision (c_pq · e is often below fp16's normal range)
            e = tl.exp(s - rlse[:, None]) + tl.exp(s - clse[None, :])
            e = tl.where(row_ok[:, None] & col_ok[None, :], e, 0.0)
            dtau += coef * tl.sum(e * s, axis=1)
            du += coef * tl.dot(e.to(v.dtype), v, input_precision=DOT_PRECISION)
    tl.store(DU + (p * B + rows)[:, None] * D + offs_d[None, :], du * tau,
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(DTAU + p * B + rows, dtau / tau, mask=row_ok)


@triton.jit
def _contrastive_dv_bwd_kernel(
    U, V, TAU, RLSE, CLSE, COEF, DV,         # DV (Q·N, D) fp32
    stride_u, stride_v,
    B, N, D, P, Q,
    CAST_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    q = tl.program_id(1)
    tau = tl.load(TAU).to(tl.float32)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = cols < N
    d_ok = offs_d < D
    v = _load_block(V, q * N, cols, N, stride_v, offs_d, D, CAST_F32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for p in range(0, P):
        coef = tl.load(COEF + p * Q + q).to(tl.float32)
        clse = tl.load(CLSE + (p * Q + q) * N + cols, mask=col_ok, other=0.0)
        for m0 in range(0, B, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < B
            u = _load_block(U, p * B, rows, B, stride_u, offs_d, D, CAST_F32)
            rlse = tl.load(RLSE + (p * Q + q) * B + rows, mask=row_ok, other=0.0)
            s = tl.dot(u, tl.trans(v), input_precision=DOT_PRECISION) * tau
            e = tl.exp(s - rlse[:, None]) + tl.exp(s - clse[None, :])
            e = tl.where(row_ok[:, None] & col_ok[None, :], e, 0.0)
            dv += coef * tl.dot(tl.trans(e.to(u.dtype)), u, input_precision=DOT_PRECISION)
    tl.store(DV + (q * N + cols)[:, None] * D + offs_d[None, :], dv * tau,
             mask=col_ok[:, None] & d_ok[None, :])


# --------------------------------------------------------------------------------- launchers
SMEM_BUDGET = 160 * 1024      # bytes of shared memory a program may use: under an A100's 163 KiB


def _blocks(d: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) for feature dim ``d`` and input ``dtype``.

    A program keeps one tile of one side resident (BLOCK × D) and streams the other side's tiles
    through ``num_stages − 1`` buffers, so its shared memory is about
    (resident + (stages − 1) · streamed) · BLOCK_D · element size. Starting from 3 stages and tiles of
    32 × 64 (D ≥ 512) or 64 × 64, stages, then BLOCK_N, then BLOCK_M are reduced until that fits
    :data:`SMEM_BUDGET` (fp32 at D = 512: 32 × 32 tiles, 2 stages; bf16 at D = 512 keeps 32 × 64 ×
    3 stages)."""
    block_d = max(16, triton.next_power_of_2(d))
    if INTERPRET:
        return 32, 32, block_d, 4, 1
    size = torch.finfo(dtype).bits // 8
    bm, bn, stages = (32 if block_d >= 512 else 64), 64, 3

    def smem(bm, bn, stages):
        return max(bm + (stages - 1) * bn, bn + (stages - 1) * bm) * block_d * size

    while smem(bm, bn, stages) > SMEM_BUDGET:
        if stages > 2:
            stages -= 1
        elif bn > 16:
            bn //= 2
        elif bm > 16:
            bm //= 2
        else:
            break
    return bm, bn, block_d, 8 if block_d >= 512 else 4, stages


def _check(u, v, tau, p_count, b, q_count, n):
    for name, t in (("student", u), ("target", v)):
        if t.dim() != 2:
            raise ValueError(f"contrastive: {name} base must be 2-D (rows, D), got {tuple(t.shape)}")
        if t.stride(-1) != 1:
            raise ValueError(f"contrastive: {name} base needs a contiguous feature dimension")
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"contrastive: {name} dtype {t.dtype} is not fp32/bf16/fp16")
    if u.shape[1] != v.shape[1]:
        raise ValueError(f"contrastive: feature dims differ: {u.shape[1]} vs {v.shape[1]}")
    if u.shape[1] > MAX_D:
        raise ValueError(f"contrastive: feature dim {u.shape[1]} > {MAX_D} is not supported by the kernel")
    if u.shape[0] < p_count * b or v.shape[0] < q_count * n:
        raise ValueError(f"contrastive: student base has {u.shape[0]} rows for {p_count}×{b}, target base "
                         f"{v.shape[0]} rows for {q_count}×{n}")
    if tau.numel() != 1:
        raise ValueError("contrastive: the logit scale must be a single-element tensor")
    if not (u.is_cuda and v.is_cuda) and not INTERPRET:
        raise RuntimeError("contrastive impl='fused' needs CUDA tensors (or TRITON_INTERPRET=1 for "
                           "testing); use impl='blockwise' on CPU")
    if u.device != v.device or tau.device != u.device:
        raise ValueError(f"contrastive: tensors on different devices: {u.device}, {v.device}, {tau.device}")


def _prep(u, v):
    cast = INTERPRET and (u.dtype != torch.float32 or v.dtype != torch.float32)
    if u.dtype != v.dtype:
        raise TypeError(f"contrastive: student {u.dtype} and target {v.dtype} dtypes differ")
    return cast


def contrastive_fwd(u: torch.Tensor, v: torch.Tensor, tau: torch.Tensor, p_count: int, b: int,
                    q_count: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row log-sum-exps (P,Q,B) and this rank's column max / shifted sums (P,Q,N), all fp32."""
    _check(u, v, tau, p_count, b, q_count, n)
    cast = _prep(u, v)
    d = u.shape[1]
    bm, bn, bd, warps, stages = _blocks(d, u.dtype)
    prec = _dot_precision(u.dtype)
    tau32 = tau.reshape(1).float()
    rlse = torch.empty(p_count, q_count, b, device=u.device, dtype=torch.float32)
    cmax = torch.empty(p_count, q_count, n, device=u.device, dtype=torch.float32)
    csum = torch.empty_like(cmax)
    _contrastive_row_fwd_kernel[(triton.cdiv(b, bm), p_count, q_count)](
        u, v, tau32, rlse, u.stride(0), v.stride(0), b, n, d, q_count,
        CAST_F32=cast, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, DOT_PRECISION=prec, num_warps=warps,
        num_stages=stages)
    _contrastive_col_fwd_kernel[(triton.cdiv(n, bn), p_count, q_count)](
        u, v, tau32, cmax, csum, u.stride(0), v.stride(0), b, n, d, q_count,
        CAST_F32=cast, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, DOT_PRECISION=prec, num_warps=warps,
        num_stages=stages)
    return rlse, cmax, csum



def contrastive_bwd(u: torch.Tensor, v: torch.Tensor, tau: torch.Tensor, rlse: torch.Tensor,
                    clse: torch.Tensor, coef: torch.Tensor, p_count: int, b: int, q_count: int, n: int,
                    need_dv: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dU (P·B, D), dV (Q·N, D; empty when not needed) in the input dtype, and dτ (fp32 scalar)."""
    _check(u, v, tau, p_count, b, q_count, n)
    cast = _prep(u, v)
    d = u.shape[1]
    bm, bn, bd, warps, stages = _blocks(d, u.dtype)
    prec = _dot_precision(u.dtype)
    tau32 = tau.reshape(1).float()
    rlse, clse, coef = rlse.contiguous(), clse.contiguous(), coef.float().contiguous()
    du = torch.empty(p_count * b, d, device=u.device, dtype=torch.float32)
    dtau_rows = torch.empty(p_count, b, device=u.device, dtype=torch.float32)
    _contrastive_du_bwd_kernel[(triton.cdiv(b, bm), p_count)](
        u, v, tau32, rlse, clse, coef, du, dtau_rows, u.stride(0), v.stride(0), b, n, d, q_count,
        CAST_F32=cast, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, DOT_PRECISION=prec, num_warps=warps,
        num_stages=stages)
    if need_dv:
        dv = torch.empty(q_count * n, d, device=u.device, dtype=torch.float32)
        _contrastive_dv_bwd_kernel[(triton.cdiv(n, bn), q_count)](
            u, v, tau32, rlse, clse, coef, dv, u.stride(0), v.stride(0), b, n, d, p_count, q_count,
            CAST_F32=cast, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, DOT_PRECISION=prec, num_warps=warps,
            num_stages=stages)
        dv = dv.to(v.dtype)
    else:
        dv = v.new_empty(0, d)
    return du.to(u.dtype), dv, dtau_rows.sum()

