"""Fused symmetric InfoNCE for many (student, target) pairs: a one-pass Triton forward and a
bounded-workspace backward.

Math (one pair p, q; U_p the p-th block of B student rows, V_q the q-th block of N target rows, each
block anywhere in one of a list of tensors; τ the group's logit scale):

    S_ij   = τ · U_p[i] · V_q[j]                                       (never stored whole)
    rlse_i = log Σ_j exp S_ij                                           (complete: all N columns)
    csum_j = Σ_i exp(S_ij − τ)                                          (partial: this rank's B rows)

Forward (:func:`contrastive_fwd`): ONE pass over each S tile gives both sides' statistics. A
program takes one tile row (BM rows of the "A" side) against a range of column tiles (the "B"
side); the A side keeps an online max / sum across its range, the B side takes each tile's max m and
sum l = Σ exp(S − m). Both partial sums are rescaled to the fixed reference τ in fp64,
l · exp(m − τ), and added with ``tl.atomic_add`` into fp64 buffers, so neither side needs a second
pass nor a max reduction across programs; rlse = τ + log R, clse = τ + log C (after the ranks' one
SUM all-reduce of C). Precondition: normalised features (|S| ≤ τ); at τ ≤ 100 every term lies in
[e⁻²⁰⁰, 1], far inside fp64, so the sums are exact. Inputs far outside it overflow (or underflow) to
a non-finite loss, never to a wrong finite one. The exponentials are exp2 with log2 e folded into
the scale. When B < N (a small local batch against gathered columns) the roles swap: the columns
are the A side, so tiles stay full whatever B is; a side's column range is split across programs
when the grid would otherwise not fill the device.

Backward (:func:`contrastive_bwd`), given clse and a per-pair coefficient c_pq (the upstream
gradient of Σ_i rlse_i + Σ_j clse_j):

    G_ij = c_pq · [exp(S_ij − rlse_i) + exp(S_ij − clse_j)]
    dU_p = τ · Σ_q G · V_q        dV_q = τ · Σ_p Gᵀ · U_p        dτ = Σ G_ij · S_ij / τ

A Triton kernel recomputes S per tile and writes G / max|c| into a chunk of a workspace of bounded
size (the operands' dtype: bf16 for bf16 inputs) plus per-row, per-tile dτ partials; dU and dV are
then plain matrix products with fp32 accumulation (:mod:`cosmos_fast.ops.contrastive_chunks`).
Deterministic: no atomics in backward. (The −2·S_ii diagonal term is handled outside in PyTorch.)

Tiles: the D-long dot products stream D in BLOCK_K chunks into an fp32 accumulator (``tl.dot``; BM
a multiple of 64 and 4 or 8 warps, so Hopper emits wgmma); on CUDA a small ``triton.autotune`` set
keyed on the sizes, D, dtype and operand roles, pruned by the device's own shared-memory limit. Every
pair of a group is one launch: the kernels read each block's base pointer and row stride from int64
tables, so list inputs are never concatenated.

The public entry points are ``torch.library`` custom ops with fake implementations
(``cosmos_fast::contrastive_fwd``, ``cosmos_fast::contrastive_bwd``), so code calling them traces
under ``torch.compile``. Without CUDA they run only under ``TRITON_INTERPRET=1`` (tests, fp32, one
small fixed tile config). :func:`compiled_kernels` returns the compiled kernel objects for checks
on a GPU (wgmma in the PTX, spills, shared memory). The previous kernels live in
``kernels/contrastive_v1.py`` for the benchmark's ablation.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from ..ops.contrastive_chunks import DEFAULT_WORKSPACE_BYTES, block_index, chunked_backward, workspace_dtype

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
INTERPRET_CONFIG = {"BM": 32, "BN": 32, "BK": 64}       # the interpreter's one fixed config
SPLIT_TARGET = None      # programs the forward grid aims for (None: 2 per SM on CUDA, 1 = no split on CPU)

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


# ----------------------------------------------------------------------------------- kernels
@triton.jit
def _s_tile(a_rows, b_cols, row_ok, col_ok, D, CAST_F32: tl.constexpr, EVEN_K: tl.constexpr,
            DOT_PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """The (BM, BN) fp32 tile of dot products between the rows at pointers ``a_rows`` (BM,) and the
    rows at ``b_cols`` (BN,), D streamed in BK chunks (masked beyond D unless EVEN_K)."""
    offs_k = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, D, BK):
        k = k0 + offs_k
        a_ptr = a_rows[:, None] + k[None, :]
        b_ptr = b_cols[None, :] + k[:, None]
        if EVEN_K:
            a = tl.load(a_ptr, mask=row_ok[:, None], other=0.0)
            bt = tl.load(b_ptr, mask=col_ok[None, :], other=0.0)
        else:
            a = tl.load(a_ptr, mask=row_ok[:, None] & (k < D)[None, :], other=0.0)
            bt = tl.load(b_ptr, mask=col_ok[None, :] & (k < D)[:, None], other=0.0)
        if CAST_F32:
            a = a.to(tl.float32)
            bt = bt.to(tl.float32)
        acc = tl.dot(a, bt, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _fwd_kernel(
    A_PT, A_ST, B_PT, B_ST,           # int64 tables: base address and row stride of each A / B block
    TAU, STAT_A, STAT_B,              # scale; fp64 sums Σ exp(S − τ) of the A side and the B side
    MA, MB, D, Q, TARGET,             # TARGET: programs the grid aims for (splits the B side)
    ELEM: tl.constexpr, SWAP: tl.constexpr, S_ONLY: tl.constexpr, CAST_F32: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid = tl.program_id(0)
    pq = tl.program_id(1)
    p = pq // Q
    q = pq % Q
    if SWAP:                          # A = the targets' columns, B = the students' rows
        ia = q
        ib = p
    else:
        ia = p
        ib = q
    a_base = tl.load(A_PT + ia).to(tl.pointer_type(ELEM))
    b_base = tl.load(B_PT + ib).to(tl.pointer_type(ELEM))
    a_st = tl.load(A_ST + ia)
    b_st = tl.load(B_ST + ib)
    n_tiles = tl.cdiv(MB, BN)
    splits = tl.maximum(1, tl.minimum(n_tiles, tl.cdiv(TARGET, tl.cdiv(MA, BM) * tl.num_programs(1))))
    per = tl.cdiv(n_tiles, splits)
    splits = tl.cdiv(n_tiles, per)                    # as _split computes for the grid
    a_tile = pid // splits
    split = pid % splits
    rows = a_tile * BM + tl.arange(0, BM)
    row_ok = rows < MA
    tau = tl.load(TAU).to(tl.float32)
    scale = tau * 1.4426950408889634                  # log2 e folded into the scale: exp2 below
    tau2 = tau.to(tl.float64) * 1.4426950408889634
    m_a = tl.full((BM,), float("-inf"), tl.float32)
    l_a = tl.zeros((BM,), tl.float32)
    t0 = split * per
    t1 = tl.minimum(t0 + per, n_tiles)
    for t in range(t0, t1):
        cols = t * BN + tl.arange(0, BN)
        col_ok = cols < MB
        acc = _s_tile(a_base + rows * a_st, b_base + cols * b_st, row_ok, col_ok, D, CAST_F32, EVEN_K,
                      DOT_PRECISION, BM, BN, BK)
        if S_ONLY:                    # ablation: the products and a max, without the exp epilogue
            m_a = tl.maximum(m_a, tl.max(acc, axis=1))
        else:
            s = acc * scale
            sa = tl.where(col_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_a, tl.max(sa, axis=1))
            l_a = l_a * tl.exp2(m_a - m_new) + tl.sum(tl.exp2(sa - m_new[:, None]), axis=1)
            m_a = m_new
            sb = tl.where(row_ok[:, None], s, float("-inf"))
            m_b = tl.max(sb, axis=0)
            l_b = tl.sum(tl.exp2(sb - m_b[None, :]), axis=0)
            c_b = l_b.to(tl.float64) * tl.exp((m_b.to(tl.float64) - tau2) * 0.6931471805599453)
            tl.atomic_add(STAT_B + pq * MB + cols, c_b, mask=col_ok, sem="relaxed")
    if S_ONLY:
        c_a = m_a.to(tl.float64)
    else:
        c_a = l_a.to(tl.float64) * tl.exp((m_a.to(tl.float64) - tau2) * 0.6931471805599453)
    tl.atomic_add(STAT_A + pq * MA + rows, c_a, mask=row_ok & (t1 > t0), sem="relaxed")


@triton.jit
def _grad_kernel(
    U_PT, U_ST, V_PT, V_ST,           # int64 tables per student block p / target block q
    TAU, RLSE, CLSE, COEF,            # rlse (P,Q,B), clse (P,Q,N), normalised coefficients (P,Q)
    WS, LD_WS, DT, LD_DT,             # the chunk's Ĝ (R × QC·N) and dτ partials (R × QC·col tiles)
    G0, R, Q0, B, N, D, Q,
    ELEM: tl.constexpr, CAST_F32: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    N_COL_TILES = tl.cdiv(N, BN)
    qq = pid_n // N_COL_TILES
    q = Q0 + qq
    r = pid_m * BM + tl.arange(0, BM)
    row_ok = r < R
    g = tl.where(row_ok, G0 + r, G0)
    p = g // B
    i = g % B
    u_base = tl.load(U_PT + p).to(tl.pointer_type(ELEM))     # per-row bases: a tile may span blocks
    u_st = tl.load(U_ST + p)
    v_base = tl.load(V_PT + q).to(tl.pointer_type(ELEM))
    v_st = tl.load(V_ST + q)
    cols = (pid_n % N_COL_TILES) * BN + tl.arange(0, BN)
    col_ok = cols < N
    acc = _s_tile(u_base + i * u_st, v_base + cols * v_st, row_ok, col_ok, D, CAST_F32, EVEN_K, DOT_PRECISION,
                  BM, BN, BK)
    tau = tl.load(TAU).to(tl.float32)
    s = acc * tau
    s2 = acc * (tau * 1.4426950408889634)
    ok = row_ok[:, None] & col_ok[None, :]
    pq = p * Q + q
    rl = tl.load(RLSE + pq * B + i, mask=row_ok, other=0.0) * 1.4426950408889634
    cl = tl.load(CLSE + pq[:, None] * N + cols[None, :], mask=ok, other=0.0) * 1.4426950408889634
    c = tl.load(COEF + pq, mask=row_ok, other=0.0)
    gk = c[:, None] * (tl.exp2(s2 - rl[:, None]) + tl.exp2(s2 - cl))
    gk = tl.where(ok, gk, 0.0)
    tl.store(WS + r[:, None] * LD_WS + (qq * N + cols)[None, :], gk.to(WS.dtype.element_ty), mask=ok)
    tl.store(DT + r * LD_DT + pid_n, tl.sum(gk * s, axis=1), mask=row_ok)


# ------------------------------------------------------------------------------- tile configs
@functools.lru_cache(maxsize=None)
def _device_limits(index: int) -> tuple[int, int]:
    """(max shared memory per program in bytes, SM count) of CUDA device ``index``, as the driver says."""
    props = triton.runtime.driver.active.utils.get_device_properties(index)
    return props["max_shared_mem"], props["multiprocessor_count"]


def _configs():
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_stages=st, num_warps=w)
            for bm in (128, 64) for bn in (64, 128, 256) for bk in (64, 128) for st in (3, 4) for w in (4, 8)]


def _elem_size(elem) -> int:
    return elem.primitive_bitwidth // 8


def _prune(configs, named_args, **kwargs):
    """Keep the configs whose pipeline fits the device's shared memory (stages × (BM + BN) × BK
    operands), whose fp32 accumulator fits the registers (≤ 128 per thread), whose BM suits the A
    side (64 only for tiny sides) and whose BN and BK are not wider than the B side and D."""
    ma, mb, d = named_args["MA"], named_args["MB"], named_args["D"]
    elem = _elem_size(kwargs.get("ELEM", named_args.get("ELEM")))
    smem, _ = _device_limits(torch.cuda.current_device())
    keep = []
    for c in configs:
        bm, bn, bk = c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"]
        if (bm == 64) != (ma <= 64):
            continue
        if bn > max(64, triton.next_power_of_2(mb)) or bk > max(64, triton.next_power_of_2(d)):
            continue
        if bm * bn // (32 * c.num_warps) > 128:
            continue
        if c.num_stages * (bm + bn) * bk * elem > smem:
            continue
        keep.append(c)
    return keep or [min(configs, key=lambda c: c.num_stages * (c.kwargs["BM"] + c.kwargs["BN"]) * c.kwargs["BK"])]


def _split(ma, mb, pq, bm, bn, target) -> int:
    """Programs per A tile: the B side's tiles split so the grid has about ``target`` programs (the
    kernel computes the same from its arguments)."""
    n_tiles = triton.cdiv(mb, bn)
    splits = max(1, min(n_tiles, triton.cdiv(target, triton.cdiv(ma, bm) * pq)))
    return triton.cdiv(n_tiles, triton.cdiv(n_tiles, splits))


def _split_target(device: torch.device) -> int:
    if SPLIT_TARGET is not None:
        return SPLIT_TARGET
    if device.type != "cuda":
        return 1
    return 2 * _device_limits(device.index if device.index is not None else torch.cuda.current_device())[1]


_EVEN_K = {"EVEN_K": lambda a: a["D"] % a["BK"] == 0}
_fwd_heur = triton.heuristics(_EVEN_K)(_fwd_kernel)
_grad_heur = triton.heuristics(_EVEN_K)(_grad_kernel)
_fwd_tuned = triton.autotune(configs=_configs(), key=["MA", "MB", "D", "TARGET", "ELEM", "SWAP", "S_ONLY"],
                             prune_configs_by={"early_config_prune": _prune},
                             reset_to_zero=["STAT_A", "STAT_B"])(_fwd_heur)
_grad_tuned = triton.autotune(configs=_configs(), key=["N", "D", "ELEM"],
                              prune_configs_by={"early_config_prune": lambda cf, na, **kw: _prune(
                                  cf, {"MA": 128, "MB": na["N"], "D": na["D"], **na}, **kw)},
                              reset_to_zero=["DT"])(_grad_heur)


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow PyTorch's fp32 matmul setting (``torch.set_float32_matmul_precision``): IEEE
    fp32 products by default ("highest"), TF32 when the user allows it; 16-bit inputs use their own
    tensor-core products (the setting does not apply to them)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


# --------------------------------------------------------------------------------- launchers
def _check(us, vs, tau):
    dtype, dev, d = us[0].dtype, us[0].device, us[0].shape[1]
    for name, xs in (("student", us), ("target", vs)):
        for x in xs:
            if x.dim() != 2 or x.shape[1] != d:
                raise ValueError(f"contrastive: {name} tensors must be 2-D with D = {d}, got {tuple(x.shape)}")
            if x.stride(-1) != 1:
                raise ValueError(f"contrastive: {name} tensors need a contiguous feature dimension")
            if x.dtype not in _TL_DTYPE:
                raise TypeError(f"contrastive: {name} dtype {x.dtype} is not fp32/bf16/fp16")
            if x.dtype != dtype:
                raise TypeError(f"contrastive: student {dtype} and {name} {x.dtype} dtypes differ")
            if x.device != dev:
                raise ValueError(f"contrastive: tensors on different devices: {dev}, {x.device}")
    if tau.numel() != 1:
        raise ValueError("contrastive: the logit scale must be a single-element tensor")
    if tau.device != dev:
        raise ValueError(f"contrastive: tensors on different devices: {dev}, {tau.device}")
    if dev.type != "cuda" and not INTERPRET:
        raise RuntimeError("contrastive impl='fused' needs CUDA tensors (or TRITON_INTERPRET=1 for "
                           "testing); use impl='blockwise' on CPU")


def _tables(xs, rows: int, device):
    """int64 (base address, row stride) tables of every block of ``rows`` rows of ``xs``."""
    idx = block_index(xs, rows)
    ptrs = [xs[t].data_ptr() + o * xs[t].stride(0) * xs[t].element_size() for t, o in idx]
    strides = [xs[t].stride(0) for t, _ in idx]
    return (torch.tensor(ptrs, dtype=torch.int64, device=device),
            torch.tensor(strides, dtype=torch.int64, device=device), len(idx))


def _meta(dtype):
    cast = INTERPRET and dtype != torch.float32
    return {"ELEM": _TL_DTYPE[dtype], "CAST_F32": cast, "DOT_PRECISION": _dot_precision(dtype)}


def _launch_fwd(us, vs, tau, b: int, n: int, s_only: bool):
    _check(us, vs, tau)
    dev, d = us[0].device, us[0].shape[1]
    u_pt, u_st, p_count = _tables(us, b, dev)
    v_pt, v_st, q_count = _tables(vs, n, dev)
    rsum = torch.zeros(p_count, q_count, b, device=dev, dtype=torch.float64)
    csum = torch.zeros(p_count, q_count, n, device=dev, dtype=torch.float64)
    swap = n > b          # the larger side on the rows of the tile: full tiles for a small local B
    a_pt, a_st, ma, stat_a = (v_pt, v_st, n, csum) if swap else (u_pt, u_st, b, rsum)
    b_pt, b_st, mb, stat_b = (u_pt, u_st, b, rsum) if swap else (v_pt, v_st, n, csum)
    pq = p_count * q_count
    target = _split_target(dev)
    args = (a_pt, a_st, b_pt, b_st, tau.reshape(1).float(), stat_a, stat_b, ma, mb, d, q_count, target)
    kw = {"SWAP": swap, "S_ONLY": s_only, **_meta(us[0].dtype)}
    if INTERPRET:
        c = INTERPRET_CONFIG
        grid = (triton.cdiv(ma, c["BM"]) * _split(ma, mb, pq, c["BM"], c["BN"], target), pq)
        _fwd_heur[grid](*args, **kw, **c, num_warps=4, num_stages=1)
    else:
        _fwd_tuned[lambda m: (triton.cdiv(ma, m["BM"]) * _split(ma, mb, pq, m["BM"], m["BN"], target), pq)](
            *args, **kw)
    return rsum, csum


@torch.library.custom_op("cosmos_fast::contrastive_fwd", mutates_args=())
def contrastive_fwd(us: list[torch.Tensor], vs: list[torch.Tensor], tau: torch.Tensor, b: int,
                    n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For student tensors ``us`` (P blocks of ``b`` rows) and target tensors ``vs`` (Q blocks of
    ``n`` rows): rlse (P,Q,B) fp32 and csum (P,Q,N) fp64 = Σ_i exp(S_ij − τ) over these rows."""
    rsum, csum = _launch_fwd(us, vs, tau, b, n, s_only=False)
    rlse = (tau.detach().reshape(()).to(torch.float64) + torch.log(rsum)).float()
    return rlse, csum


@contrastive_fwd.register_fake
def _(us, vs, tau, b, n):
    p_count = sum(x.shape[0] for x in us) // b
    q_count = sum(x.shape[0] for x in vs) // n
    return (us[0].new_empty(p_count, q_count, b, dtype=torch.float32),
            us[0].new_empty(p_count, q_count, n, dtype=torch.float64))


def contrastive_fwd_s_only(us, vs, tau, b: int, n: int):
    """Benchmark ablation: the forward's products and grid without the exp epilogue (its outputs
    are not statistics)."""
    return _launch_fwd(list(us), list(vs), tau, b, n, s_only=True)


def _triton_fill(us, vs, tau, rlse, clse, b: int, n: int):
    """The fused ``fill`` of :func:`chunked_backward`: one launch of :func:`_grad_kernel` per chunk."""
    dev, d = us[0].device, us[0].shape[1]
    u_pt, u_st, _ = _tables(us, b, dev)
    v_pt, v_st, q_count = _tables(vs, n, dev)
    tau32 = tau.reshape(1).float()
    rlse, clse = rlse.float().contiguous(), clse.float().contiguous()
    meta = _meta(us[0].dtype)
    min_bn = INTERPRET_CONFIG["BN"] if INTERPRET else min(c.kwargs["BN"] for c in _configs())

    def fill(rows, q0, q1, coef_hat, g):
        r0 = rows[0][0] * b + rows[0][5]          # the chunk's first pair-major student row
        nr = g.shape[0]
        # dτ partials: one per row and column tile, as wide as the narrowest tiles need
        dt = torch.zeros(nr, (q1 - q0) * triton.cdiv(n, min_bn), device=dev, dtype=torch.float32)
        args = (u_pt, u_st, v_pt, v_st, tau32, rlse, clse, coef_hat.float().contiguous(), g, g.stride(0), dt,
                dt.stride(0), r0, nr, q0, b, n, d, q_count)
        if INTERPRET:
            c = INTERPRET_CONFIG
            _grad_heur[(triton.cdiv(nr, c["BM"]), (q1 - q0) * triton.cdiv(n, c["BN"]))](
                *args, **meta, **c, num_warps=4, num_stages=1)
        else:
            _grad_tuned[lambda m: (triton.cdiv(nr, m["BM"]), (q1 - q0) * triton.cdiv(n, m["BN"]))](*args, **meta)
        return dt.sum()

    return fill


@torch.library.custom_op("cosmos_fast::contrastive_bwd", mutates_args=())
def contrastive_bwd(us: list[torch.Tensor], vs: list[torch.Tensor], tau: torch.Tensor, rlse: torch.Tensor,
                    clse: torch.Tensor, coef: torch.Tensor, b: int, n: int, need_dv: bool,
                    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """dU for every student tensor, dV for every target tensor (an empty list when not needed), in
    the inputs' dtype, and dτ (fp32 scalar); the logit gradient lives only in a workspace of at most
    ``workspace_bytes`` (one row of one target if that alone is larger)."""
    _check(us, vs, tau)
    fill = _triton_fill(us, vs, tau, rlse, clse, b, n)
    du, dv, dtau = chunked_backward(us, vs, tau, rlse, clse, coef, b, n, need_dv, workspace_bytes, fill,
                                    torch.float32, workspace_dtype(us[0].dtype))
    return du, dv, dtau


@contrastive_bwd.register_fake
def _(us, vs, tau, rlse, clse, coef, b, n, need_dv, workspace_bytes=DEFAULT_WORKSPACE_BYTES):
    return ([torch.empty_like(x) for x in us], [torch.empty_like(x) for x in vs] if need_dv else [],
            us[0].new_empty((), dtype=torch.float32))


def compiled_kernels() -> dict:
    """The compiled forward and gradient kernels of the configs chosen so far on this device
    (``{"fwd": [...], "grad": [...]}``): check ``'wgmma' in k.asm['ptx']``, ``k.n_spills == 0`` and
    ``k.metadata.shared`` against the device limit after a forward and backward ran on CUDA."""
    out = {}
    for name, fn in (("fwd", _fwd_kernel), ("grad", _grad_kernel)):
        kernels = []
        for cache in getattr(fn, "device_caches", {}).values():
            kernels.extend(cache[0].values())
        out[name] = kernels
    return out
