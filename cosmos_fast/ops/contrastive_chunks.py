"""contrastive_chunks: the block layout and the bounded-workspace backward the fused and blockwise
LSE backends of :mod:`cosmos_fast.ops.contrastive` share (plain PyTorch, no Triton).

Blocks. A side of a group (the P students, the Q targets) arrives as a list of 2-D tensors, each
holding a whole number of blocks of ``b`` (students) or ``n`` (targets) rows: the official list API
passes one tensor per block, the tensor API one (k·B, D) tensor. Block p of a side is rows
``o..o+b`` of tensor ``t`` (:func:`block_index`); nothing is concatenated.

Backward. With the logit gradient of pair (p, q)

    G_ij = c_pq · [exp(S_ij − rlse_i) + exp(S_ij − clse_j)]

the input gradients are dU_p = τ·Σ_q G_pq·V_q, dV_q = τ·Σ_p G_pqᵀ·U_p and dτ = Σ G·S / τ. Rows
0..P·B of the students (pair-major) and the Q targets are cut into chunks (:func:`plan_chunks`) whose
G block, rows × (targets · N), fits a workspace of a fixed byte size independent of the batch; a
backend's ``fill`` writes one chunk's G (divided by ĉ = max |c|, so a 16-bit workspace holds values
in [0, 2] whatever the coefficients) and returns its part of Σ G·S / ĉ; :func:`chunked_backward` then
adds the chunk's products into the gradients with plain matrix multiplications (fp32 accumulation),
one per (student tensor, run of consecutive targets stored contiguously in one target tensor). No
atomics: the result does not depend on scheduling.
"""
from __future__ import annotations

import torch

ROW_ALIGN = 128          # chunk rows are a multiple of this when a chunk holds more rows
DEFAULT_WORKSPACE_BYTES = 256 << 20     # model.loss_workspace_mb's default


def block_index(xs, rows: int) -> list[tuple[int, int]]:
    """(tensor index, first row) of every block of ``rows`` rows of the tensors ``xs``, in order."""
    out = []
    for t, x in enumerate(xs):
        if x.dim() != 2 or x.shape[0] % rows:
            raise ValueError(f"contrastive: a block tensor of shape {tuple(x.shape)} is not (k·{rows}, D)")
        out.extend((t, o) for o in range(0, x.shape[0], rows))
    return out


def plan_chunks(p_count: int, b: int, q_count: int, n: int, elem: int, workspace_bytes: int) -> list[tuple]:
    """Chunks ``(r0, r1, q0, q1)``: student rows r0..r1 of the P·B pair-major rows × targets q0..q1.

    A chunk's G block, (r1 − r0) × (q1 − q0)·N elements of ``elem`` bytes, stays within
    ``workspace_bytes``; the only exception is a single row of a single target (N·elem bytes) larger
    than the workspace, which is then one chunk. All targets go in one chunk when ``ROW_ALIGN`` rows
    of them fit; chunk rows are rounded down to a multiple of ``ROW_ALIGN`` when larger."""
    rows_total = p_count * b
    per_row_target = n * elem
    first = min(rows_total, ROW_ALIGN)
    if q_count * per_row_target * first <= workspace_bytes:
        qc = q_count
        rows = min(rows_total, workspace_bytes // (q_count * per_row_target))
        if ROW_ALIGN < rows < rows_total:
            rows -= rows % ROW_ALIGN
    else:
        rows = first
        qc = workspace_bytes // (rows * per_row_target)
        if qc == 0:
            qc, rows = 1, max(1, workspace_bytes // per_row_target)
    return [(r0, min(r0 + rows, rows_total), q0, min(q0 + qc, q_count))
            for r0 in range(0, rows_total, rows) for q0 in range(0, q_count, qc)]


def row_pieces(us, b: int, r0: int, r1: int):
    """Pieces (pair p, student tensor, first and end local row in that tensor, offset in the chunk,
    first row within the pair's block) of the chunk rows r0..r1: each piece lies in one block."""
    ui = block_index(us, b)
    out = []
    for p in range(r0 // b, (r1 - 1) // b + 1):
        a, z = max(r0, p * b), min(r1, (p + 1) * b)
        t, o = ui[p]
        out.append((p, t, o + a - p * b, o + z - p * b, a - r0, a - p * b))
    return out


def _merged(pieces):
    """(student tensor, first row, end row, offset in the chunk) runs of pieces that follow each
    other in one tensor: one matrix product each."""
    runs = []
    for _, t, a, z, off, _ in pieces:
        if runs and runs[-1][0] == t and runs[-1][2] == a and runs[-1][3] + runs[-1][2] - runs[-1][1] == off:
            runs[-1][2] = z
        else:
            runs.append([t, a, z, off])
    return runs


def _target_runs(vs, n: int, q0: int, q1: int):
    """Runs (first target, last target + 1, target tensor, first row) of consecutive targets stored
    one after the other in one tensor."""
    vi = block_index(vs, n)
    runs = []
    for q in range(q0, q1):
        t, o = vi[q]
        if runs and runs[-1][2] == t and runs[-1][3] + (q - runs[-1][0]) * n == o:
            runs[-1][1] = q + 1
        else:
            runs.append([q, q + 1, t, o])
    return runs


def _mm_add(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b with out's (fp32 / fp64) accumulation; 16-bit a, b on CUDA stay 16-bit operands."""
    if a.dtype == b.dtype == out.dtype:
        out.addmm_(a, b)
    elif a.is_cuda and a.dtype == b.dtype and out.dtype == torch.float32:
        out.add_(torch.mm(a, b, out_dtype=torch.float32))
    else:
        out.addmm_(a.to(out.dtype), b.to(out.dtype))


def workspace_dtype(dtype: torch.dtype) -> torch.dtype:
    """The workspace holds G in the operands' dtype (its GEMMs take both operands in one dtype)."""
    return dtype


def chunked_backward(us, vs, tau, rlse, clse, coef, b: int, n: int, need_dv: bool, workspace_bytes: int,
                     fill, acc: torch.dtype, ws_dtype: torch.dtype):
    """Input gradients of Σ_pq c_pq·(Σ_i rlse_i + Σ_j clse_j) for student tensors ``us`` and target
    tensors ``vs``: (list of dU like ``us``, list of dV like ``vs`` or [], dτ in ``acc``).

    ``fill(rows, q0, q1, coef_hat, G)`` writes the chunk's Ĝ = G / ĉ into ``G`` (rows × (q1−q0)·N,
    a view of the workspace) for the pieces ``rows`` (see :func:`row_pieces`) and returns Σ Ĝ·S."""
    p_count = sum(x.shape[0] for x in us) // b
    q_count = sum(x.shape[0] for x in vs) // n
    dev = us[0].device
    t = tau.reshape(()).to(acc)
    c_hat = coef.abs().amax().to(acc).clamp_min(torch.finfo(torch.float32).tiny)
    coef_hat = (coef.to(acc) / c_hat).contiguous()
    du = [torch.zeros(x.shape, dtype=acc, device=dev) for x in us]
    dv = [torch.zeros(x.shape, dtype=acc, device=dev) for x in vs] if need_dv else []
    plan = plan_chunks(p_count, b, q_count, n, torch.finfo(ws_dtype).bits // 8, workspace_bytes)
    size = max((r1 - r0) * (q1 - q0) * n for r0, r1, q0, q1 in plan)
    ws = torch.empty(size, dtype=ws_dtype, device=dev)
    dtau = torch.zeros((), dtype=acc, device=dev)
    for r0, r1, q0, q1 in plan:
        g = ws[: (r1 - r0) * (q1 - q0) * n].view(r1 - r0, (q1 - q0) * n)
        rows = row_pieces(us, b, r0, r1)
        dtau += fill(rows, q0, q1, coef_hat, g)
        for qa, qz, tv, ov in _target_runs(vs, n, q0, q1):
            vx = vs[tv][ov:ov + (qz - qa) * n]
            for tu, a, z, off in _merged(rows):
                gs = g[off:off + z - a, (qa - q0) * n:(qz - q0) * n]
                _mm_add(du[tu][a:z], gs, vx)
                if need_dv:
                    _mm_add(dv[tv][ov:ov + (qz - qa) * n], gs.T, us[tu][a:z])
    scale = t * c_hat
    du = [d.mul_(scale).to(x.dtype) for d, x in zip(du, us)]
    dv = [d.mul_(scale).to(x.dtype) for d, x in zip(dv, vs)]
    return du, dv, dtau * c_hat / t
