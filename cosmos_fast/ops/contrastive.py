"""contrastive: the COSMOS loss (16 CLIP pairs with τ + 64 distillation pairs with τ_d).

:class:`CosmosLoss` is the op's entry point and switch (``impl``: ``"auto"`` — Triton on CUDA,
blockwise on CPU — ``"fused"``, ``"blockwise"`` or ``"reference"``). The fused and blockwise
implementations compute the loss without B×B logits; the reference
(:mod:`cosmos_fast.reference.contrastive`) is the official per-pair formulation.

Notation: U (B×D) student rows on this rank, V (N×D) target columns gathered from all ranks
(N = B·W), τ the group's scale, S = τ·U·Vᵀ. The global symmetric InfoNCE of one pair is

    ℓ = 1/(2·B_g) · [Σ_i (rlse_i − S_ii) + Σ_j (clse_j − S_jj)]

with rlse complete on the rank owning row i, and clse_j = logsumexp over the rows of all ranks.
The backends return each column's partial sum against the fixed reference τ, C_j = Σ_i exp(S_ij − τ)
in fp64 (exact for normalised features, |S| ≤ τ: the terms lie in [e^(−2τ), 1]; far-out inputs
overflow to a non-finite loss, they are never silently wrong), so ONE SUM all-reduce of C completes
the columns across ranks and clse = τ + log C. Each rank adds the column terms of the columns it
owns; the per-pair totals and the diagonal terms are summed across ranks, so every rank returns
the global loss, exactly as the official code (which computes the whole B_g×B_g loss on every rank).

Gradients (``grad_semantics="official"``, the default): the backward of the LSE op is the gradient
of the *global* loss restricted to this rank's rows; gathered student targets send their gradient
back to their owner (all_gather with grad ↔ reduce-scatter). After the engine averages gradients
over W ranks, network weights get (1/W)·∇L — what the official DDP run gets — and the two logit
scales get the full ∇τL on every rank (their gradient is summed across ranks), as officially.
``grad_semantics="exact"`` multiplies the feature gradients by W so averaged weights get ∇L.

Each distinct tensor is gathered once per step: the student captions (with grad, CLIP targets) and
the two teacher tensors (no grad). The COSMOS total is

    L_clip   = mean over (c ∈ {0,1}, k) of ℓ(Î_c, T̂_k; τ)                           16 pairs
    L_cosmos = ¼ [L(XI, Ī) + L(XI, T̄) + L(XT, Ī) + L(XT, T̄)] with τ_d                 64 pairs

Inputs are read where they are: a group's students and targets are lists of tensors holding whole
B- (N-) row blocks — the model's (n·B, D) tensors, or the official API's list of B×D tensors — and
each tensor gets its own gradient; nothing is concatenated. ``operands`` (``model.loss_operands``)
casts the LSE part's inputs (e.g. to bf16 for tensor cores; accumulation stays fp32, the diagonal
term uses the features themselves).

Memory: forward saves the row log-sum-exps (P,Q,B) and column log-sum-exps (P,Q,N) per group;
backward recomputes S tile by tile and holds the logit gradient only in a workspace of bounded size
(``model.loss_workspace_mb``; :mod:`cosmos_fast.ops.contrastive_chunks`).

Implementations here: :func:`blockwise_fwd` / :func:`blockwise_bwd` (PyTorch tiles, the kernel's
CPU twin with its exact contract and algorithm), the fused kernels of ``kernels/contrastive.py``
(imported on first use: triton is an optional dependency), the autograd and distributed glue around
both (:func:`cosmos_loss_fast`), and :class:`CosmosLoss`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..reference.contrastive import cosmos_loss_reference
from .contrastive_chunks import DEFAULT_WORKSPACE_BYTES, block_index, chunked_backward
from .switch import impl_override, triton_available, triton_runnable

CONTRASTIVE_IMPLS = ("fused", "blockwise", "reference")
GRAD_SEMANTICS = ("official", "exact")      # distributed.grad_semantics (see the module docstring)


def check_grad_semantics(grad_semantics: str) -> None:
    if grad_semantics not in GRAD_SEMANTICS:
        raise ValueError(f"grad_semantics must be one of {GRAD_SEMANTICS}, got {grad_semantics!r}")


def resolve_contrastive_impl(impl: str = "auto", device: torch.device | None = None) -> str:
    """Validate ``impl``; with a device, also turn ``"auto"`` into a concrete implementation."""
    if impl == "auto":
        override = impl_override(CONTRASTIVE_IMPLS)
        if override is not None:
            impl = override
        elif device is not None:
            impl = "fused" if device.type == "cuda" and triton_available() else "blockwise"
        else:
            return "auto"
    if impl not in CONTRASTIVE_IMPLS:
        raise ValueError(f"unknown contrastive implementation {impl!r}; available: {('auto',) + CONTRASTIVE_IMPLS}")
    if impl == "fused" and device is not None and not triton_runnable(device):
        raise RuntimeError(f"contrastive impl='fused' needs CUDA tensors (got {device}) and triton, or "
                           f"TRITON_INTERPRET=1 for testing; use impl='blockwise' on CPU")
    return impl


# ------------------------------------------------------------------------- blockwise (PyTorch)
TILE_M, TILE_N = 256, 1024
BLOCKWISE_WORKSPACE_BYTES = 16 << 20   # the CPU twin's chunks stay cache-sized whatever the configured limit


def blockwise_fwd(us, vs, tau, b: int, n: int, tile_m: int = TILE_M, tile_n: int = TILE_N):
    """Same contract as kernels.contrastive.contrastive_fwd, in PyTorch tiles: ``rlse`` (P,Q,B) in
    fp32 (fp64 for fp64 inputs) and ``csum`` (P,Q,N) fp64 = Σ_i exp(S_ij − τ) over this rank's rows,
    each tile's column sum taken against the tile's own maximum and rescaled to the fixed reference
    τ in fp64 (exact for normalised features: |S| ≤ τ)."""
    acc = torch.promote_types(us[0].dtype, torch.float32)
    ui, vi = block_index(us, b), block_index(vs, n)
    t = tau.reshape(()).to(acc)
    t64 = tau.reshape(()).detach().to(torch.float64)
    dev = us[0].device
    rlse = torch.empty(len(ui), len(vi), b, device=dev, dtype=acc)
    csum = torch.zeros(len(ui), len(vi), n, device=dev, dtype=torch.float64)
    for p, (tu, o) in enumerate(ui):
        for i0 in range(0, b, tile_m):
            i1 = min(i0 + tile_m, b)
            ut = us[tu][o + i0:o + i1].to(acc) * t
            for q, (tv, ov) in enumerate(vi):
                row_m = torch.full((i1 - i0,), float("-inf"), device=dev, dtype=acc)
                row_l = torch.zeros(i1 - i0, device=dev, dtype=acc)
                for j0 in range(0, n, tile_n):
                    j1 = min(j0 + tile_n, n)
                    s = ut @ vs[tv][ov + j0:ov + j1].to(acc).T
                    m_new = torch.maximum(row_m, s.max(dim=1).values)
                    row_l = row_l * torch.exp(row_m - m_new) + torch.exp(s - m_new[:, None]).sum(dim=1)
                    row_m = m_new
                    cm = s.max(dim=0).values
                    cl = torch.exp(s - cm).sum(dim=0)
                    csum[p, q, j0:j1] += cl.to(torch.float64) * torch.exp(cm.to(torch.float64) - t64)
                rlse[p, q, i0:i1] = row_m + torch.log(row_l)
    return rlse, csum


def _blockwise_fill(us, vs, tau, rlse, clse, b: int, n: int, acc: torch.dtype):
    """The blockwise ``fill`` of :func:`chunked_backward`: one chunk's Ĝ in PyTorch, pair by pair."""
    t = tau.reshape(()).to(acc)
    vi = block_index(vs, n)

    def fill(rows, q0, q1, coef_hat, g):
        total = torch.zeros((), dtype=acc, device=g.device)
        for p, tu, a, z, off, i0 in rows:
            ut = us[tu][a:z].to(acc) * t
            for q in range(q0, q1):
                tv, ov = vi[q]
                s = ut @ vs[tv][ov:ov + n].to(acc).T
                gv = g[off:off + z - a, (q - q0) * n:(q - q0 + 1) * n]
                e2 = torch.sub(s, clse[p, q, None, :]).exp_()
                gv.copy_(s).sub_(rlse[p, q, i0:i0 + z - a, None]).exp_().add_(e2).mul_(coef_hat[p, q])
                total += s.mul_(gv).sum()
        return total

    return fill


def blockwise_bwd(us, vs, tau, rlse, clse, coef, b: int, n: int, need_dv: bool,
                  workspace_bytes: int = DEFAULT_WORKSPACE_BYTES):
    """Same contract as kernels.contrastive.contrastive_bwd: the chunked backward of
    :mod:`cosmos_fast.ops.contrastive_chunks` with Ĝ computed in PyTorch (fp32 accumulation, fp64
    for fp64 inputs); returns (dU per student tensor, dV per target tensor or [], dτ)."""
    acc = torch.promote_types(us[0].dtype, torch.float32)
    fill = _blockwise_fill(us, vs, tau, rlse, clse, b, n, acc)
    return chunked_backward(us, vs, tau, rlse, clse, coef, b, n, need_dv,
                            min(workspace_bytes, BLOCKWISE_WORKSPACE_BYTES), fill, acc, acc)


def _backend(impl: str):
    if impl == "blockwise":
        return blockwise_fwd, blockwise_bwd
    if impl == "fused":
        from ..kernels import contrastive as k   # lazy: the kernel module imports triton (optional)

        return k.contrastive_fwd, k.contrastive_bwd
    raise ValueError(f"unknown LSE backend {impl!r}")


# ----------------------------------------------------------------------------- distributed glue
def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _is_nccl() -> bool:
    return dist.get_backend() == "nccl"


def _all_gather(x: torch.Tensor) -> torch.Tensor:
    w, _ = world()
    x = x.contiguous()
    if _is_nccl():
        out = x.new_empty(w * x.shape[0], *x.shape[1:])
        dist.all_gather_into_tensor(out, x)
        return out
    parts = [torch.empty_like(x) for _ in range(w)]
    dist.all_gather(parts, x)
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather in forward; the gradient of every rank's copy is summed back to its owner."""

    @staticmethod
    def forward(ctx, x):
        return _all_gather(x)

    @staticmethod
    def backward(ctx, grad):
        w, rank = world()
        grad = grad.contiguous()
        rows = grad.shape[0] // w
        if _is_nccl():
            out = grad.new_empty(rows, *grad.shape[1:])
            dist.reduce_scatter_tensor(out, grad)
            return out
        dist.all_reduce(grad)
        return grad[rank * rows:(rank + 1) * rows].clone()


class _SumGrad(torch.autograd.Function):
    """Identity whose gradient is summed across ranks (a parameter every rank uses whole)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class _SumAcrossRanks(torch.autograd.Function):
    """All-reduce (sum) of partial sums; the gradient of the global sum is passed through."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor: float):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class _PairLSE(torch.autograd.Function):
    """Σ_i rlse_i + Σ_{owned j} clse_j for every pair (P, Q) of a group, summed over ranks.

    The student and target tensors come as separate arguments (``spec[0]`` of them students), read
    in place by the backend, and get their gradients back one per tensor."""

    @staticmethod
    def forward(ctx, tau, spec, *blocks):
        n_u, b, n, impl, need_dv, workspace_bytes = spec
        us, vs = list(blocks[:n_u]), list(blocks[n_u:])
        fwd, _ = _backend(impl)
        rlse, csum = fwd(us, vs, tau, b, n)
        w, rank = world()
        if w > 1:
            dist.all_reduce(csum)            # fixed-reference sums: one SUM completes the columns
        clse = (tau.detach().reshape(()).to(torch.float64) + torch.log(csum)).to(rlse.dtype)
        own = clse[:, :, rank * b:(rank + 1) * b] if w > 1 else clse
        out = rlse.sum(dim=2) + own.sum(dim=2)
        if w > 1:
            dist.all_reduce(out)
        ctx.save_for_backward(tau, rlse, clse, *blocks)
        ctx.spec = spec
        return out

    @staticmethod
    def backward(ctx, grad_out):
        tau, rlse, clse, *blocks = ctx.saved_tensors
        n_u, b, n, impl, need_dv, workspace_bytes = ctx.spec
        us, vs = blocks[:n_u], blocks[n_u:]
        _, bwd = _backend(impl)
        need_dv = need_dv and any(ctx.needs_input_grad[2 + n_u:])
        with torch.autocast(us[0].device.type, enabled=False):   # fp32 accumulation even under autocast
            du, dv, dtau = bwd(list(us), list(vs), tau, rlse, clse, grad_out.contiguous(), b, n, need_dv,
                               workspace_bytes)
        du = [g if ctx.needs_input_grad[2 + i] else None for i, g in enumerate(du)]
        dv = list(dv) if need_dv else [None] * len(vs)
        return (dtau.reshape(tau.shape).to(tau.dtype) if ctx.needs_input_grad[0] else None, None, *du, *dv)


def _targets_layout(x: torch.Tensor, count: int, b: int, w: int) -> torch.Tensor:
    """Gathered rank-major (W·count·B, D) → target-major (count·W·B, D): V_q = rows q·N..(q+1)·N."""
    if w == 1:
        return x
    return x.view(w, count, b, -1).transpose(0, 1).reshape(count * w * b, -1)


class _Diag(torch.autograd.Function):
    """τ·Σ_i U_p[i]·V_q[offset + i] for every pair: (P, Q), in fp32 (fp64 for fp64 inputs).

    Forward: one small matmul per (student, target) tensor on views of the inputs (no B×D copies
    when W = 1). Backward writes each tensor's gradient into one buffer with in-place products, so
    list inputs cost no per-block temporaries."""

    @staticmethod
    def forward(ctx, tau, spec, *blocks):
        n_u, b, n, offset = spec
        us, vs = blocks[:n_u], blocks[n_u:]
        acc = torch.promote_types(us[0].dtype, torch.float32)
        ups = [x.reshape(x.shape[0] // b, -1).to(acc) for x in us]
        vqs = _diag_rows(vs, b, n, offset, acc)
        dots = torch.cat([torch.cat([up @ vq.T for vq in vqs], dim=1) for up in ups])
        ctx.save_for_backward(tau, dots, *blocks)
        ctx.spec = spec
        return tau.to(acc) * dots

    @staticmethod
    def backward(ctx, grad):
        tau, dots, *blocks = ctx.saved_tensors
        n_u, b, n, offset = ctx.spec
        us, vs = blocks[:n_u], blocks[n_u:]
        acc = dots.dtype
        gt = grad.to(acc) * tau.to(acc)
        ups = [x.reshape(x.shape[0] // b, -1).to(acc) for x in us]
        vqs = _diag_rows(vs, b, n, offset, acc)
        p_at = [0] + [sum(u.shape[0] for u in ups[:i + 1]) for i in range(len(ups))]
        q_at = [0] + [sum(v.shape[0] for v in vqs[:i + 1]) for i in range(len(vqs))]
        du = []
        for i, (x, up) in enumerate(zip(us, ups)):
            d = torch.zeros_like(up)
            if ctx.needs_input_grad[2 + i]:
                for j, vq in enumerate(vqs):
                    d.addmm_(gt[p_at[i]:p_at[i + 1], q_at[j]:q_at[j + 1]], vq)
            du.append(d.view(x.shape).to(x.dtype) if ctx.needs_input_grad[2 + i] else None)
        dv = []
        for j, (y, vq) in enumerate(zip(vs, vqs)):
            if not ctx.needs_input_grad[2 + n_u + j]:
                dv.append(None)
                continue
            d = torch.zeros_like(vq)
            for i, up in enumerate(ups):
                d.addmm_(gt[p_at[i]:p_at[i + 1], q_at[j]:q_at[j + 1]].T, up)
            if n == b:
                dv.append(d.view(y.shape).to(y.dtype))
            else:                   # only the rows offset..offset+B of each target block get a gradient
                full = torch.zeros(y.shape, dtype=y.dtype, device=y.device)
                full.view(y.shape[0] // n, n, -1)[:, offset:offset + b] = d.view(-1, b, y.shape[1])
                dv.append(full)
        return ((grad * dots).sum().reshape(tau.shape).to(tau.dtype) if ctx.needs_input_grad[0] else None, None,
                *du, *dv)


def _diag_rows(vs, b, n, offset, acc):
    """Each target tensor's rows offset..offset+B of every block, flattened: (blocks, B·D)."""
    return [y.view(y.shape[0] // n, n, -1)[:, offset:offset + b].reshape(y.shape[0] // n, -1).to(acc) for y in vs]


def _as_operands(xs, dtype):
    """The LSE part's operands: ``xs`` cast to ``dtype`` (gradients flow back through the cast)."""
    return list(xs) if dtype is None else [x.to(dtype) for x in xs]


def group_pair_losses(us, vs, tau, b: int, impl: str, need_dv: bool, operands: torch.dtype | None = None,
                      workspace_bytes: int = DEFAULT_WORKSPACE_BYTES):
    """Per-pair global symmetric InfoNCE (P, Q) for student tensors ``us`` (P blocks of B rows on this
    rank, in one or several tensors) and gathered target tensors ``vs`` (Q blocks of N = B·W rows,
    target-major). ``operands``: the dtype the LSE part's matrix products read (None: the features'
    own); the diagonal term always uses the features themselves, in fp32."""
    if torch.is_tensor(us):
        us = [us]
    if torch.is_tensor(vs):
        vs = [vs]
    w, rank = world()
    n = b * w
    # fp32 arithmetic, also under autocast: there the tiles' matmuls and the diagonal term (one
    # B·D-long dot product per pair) would otherwise run, and be rounded, in 16 bits
    with torch.autocast(us[0].device.type, enabled=False):
        lu, lv = _as_operands(us, operands), _as_operands(vs, operands)
        spec = (len(lu), b, n, impl, need_dv, workspace_bytes)
        lse = _PairLSE.apply(tau, spec, *lu, *lv)
        diag = _Diag.apply(tau, (len(us), b, n, rank * b), *us, *vs)
    if w > 1:
        diag = _SumAcrossRanks.apply(diag)
    return (lse - 2 * diag) / (2 * n)


def _rows(xs) -> int:
    return sum(x.shape[0] for x in xs)


def cosmos_loss_fast(s_image, s_text, logit_scale, t_image, t_text, distill_logit_scale, s_xi, s_xt,
                     batch_size: int, impl: str = "blockwise", grad_semantics: str = "official",
                     operands: torch.dtype | None = None, workspace_bytes: int = DEFAULT_WORKSPACE_BYTES) -> dict:
    """COSMOS loss from feature tensors, each given as one (n·B, D) tensor (crop-/caption-major views
    of the model outputs) or a list of tensors of whole B-row blocks, read in place (no concatenation).
    ``s_image`` holds the 2 global crops' blocks (more are ignored)."""
    check_grad_semantics(grad_semantics)
    b = batch_size
    s_image, s_text, t_image, t_text, s_xi, s_xt = ([x] if torch.is_tensor(x) else list(x)
                                                    for x in (s_image, s_text, t_image, t_text, s_xi, s_xt))
    s_image = _first_blocks(s_image, 2, b)
    w, _ = world()
    tau, tau_d = logit_scale, distill_logit_scale
    if w > 1:
        tau, tau_d = _SumGrad.apply(tau), _SumGrad.apply(tau_d)
        if grad_semantics == "exact":
            s_image, s_text, s_xi, s_xt = ([_ScaleGrad.apply(x, float(w)) for x in xs]
                                           for xs in (s_image, s_text, s_xi, s_xt))
        text_all = [_targets_layout(_GatherWithGrad.apply(x), x.shape[0] // b, b, w) for x in s_text]
        with torch.no_grad():
            t_img_all = [_targets_layout(_all_gather(x.detach()), x.shape[0] // b, b, w) for x in t_image]
            t_txt_all = [_targets_layout(_all_gather(x.detach()), x.shape[0] // b, b, w) for x in t_text]
    else:
        text_all = s_text
        t_img_all, t_txt_all = [x.detach() for x in t_image], [x.detach() for x in t_text]
    kw = {"operands": operands, "workspace_bytes": workspace_bytes}
    clip = group_pair_losses(s_image, text_all, tau, b, impl, need_dv=True, **kw).mean()
    parts = [group_pair_losses(xs, ts, tau_d, b, impl, need_dv=False, **kw).mean()
             for xs in (s_xi, s_xt) for ts in (t_img_all, t_txt_all)]
    return {"distill_loss": sum(parts) / 4, "clip_loss": clip}


def _first_blocks(xs, count: int, b: int):
    """The tensors (or a leading slice of the last one) holding the first ``count`` B-row blocks."""
    out, need = [], count * b
    for x in xs:
        if need <= 0:
            break
        out.append(x if x.shape[0] <= need else x[:need])
        need -= out[-1].shape[0]
    return out


# ------------------------------------------------------------------------------ the op
def _blocks(name: str, xs, batch_size, expect_count: int | None = None, width=None):
    """Validate one feature argument; returns (list of B×D blocks, base tensor or None)."""
    if torch.is_tensor(xs):
        if batch_size is None:
            raise TypeError(f"{name} is a tensor: pass batch_size (or a list of B×D tensors)")
        if xs.dim() != 2 or xs.shape[0] % batch_size or xs.shape[0] == 0:
            raise ValueError(f"{name} of shape {tuple(xs.shape)} is not (n·{batch_size}, D)")
        blocks, base = list(xs.split(batch_size)), xs
    elif isinstance(xs, (list, tuple)):
        blocks, base = list(xs), None
    else:
        raise TypeError(f"{name} must be a list of B×D tensors or an (n·B, D) tensor, got {type(xs).__name__}")
    if not blocks:
        raise ValueError(f"{name} is empty")
    if expect_count is not None and len(blocks) != expect_count:
        raise ValueError(f"{name} must have exactly {expect_count} entries, got {len(blocks)}")
    shape = width or (tuple(blocks[0].shape) if torch.is_tensor(blocks[0]) else None)
    for i, x in enumerate(blocks):
        if not torch.is_tensor(x) or x.dim() != 2 or (shape is not None and tuple(x.shape) != shape):
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"{name}[{i}] must be a {'×'.join(map(str, shape or ('B', 'D')))} tensor, got {got}")
    return blocks, base


LOSS_OPERANDS = ("auto", "bf16", "fp32")    # model.loss_operands


def resolve_loss_operands(operands: str, impl: str, device: torch.device, amp: bool) -> torch.dtype | None:
    """The dtype the LSE products read: ``"bf16"``, ``"fp32"`` (fp32 features keep fp32 / TF32 dots as
    ``torch.get_float32_matmul_precision`` says), or ``"auto"``: bf16 for the fused kernels on CUDA
    in an AMP run, else None (the features' own dtype)."""
    if operands not in LOSS_OPERANDS:
        raise ValueError(f"loss operands must be one of {LOSS_OPERANDS}, got {operands!r}")
    if operands == "bf16":
        return torch.bfloat16
    if operands == "fp32":
        return torch.float32
    return torch.bfloat16 if amp and impl == "fused" and device.type == "cuda" else None


class CosmosLoss(nn.Module):
    """The contrastive op's entry point: ``CosmosLoss(impl, grad_semantics, operands, workspace_mb)(...)``.

    The forward takes the official keyword arguments — lists of B×D blocks, as the official
    ``COSMOSLoss`` — or the model's (n·B, D) crop-/caption-major tensors directly with ``batch_size``.
    Either way the fused and blockwise paths read the tensors in place (no concatenation) and hand
    each its own gradient. It returns ``{"distill_loss", "clip_loss"}`` with ``output_dict=True``,
    else their sum. ``grad_semantics`` matters only with several ranks (see the module docstring);
    ``operands`` picks the dtype of the LSE products (:func:`resolve_loss_operands`; ``"auto"`` reads
    AMP from the autocast state at the call); ``workspace_mb`` bounds the backward's logit-gradient
    workspace.
    """

    def __init__(self, impl: str = "auto", grad_semantics: str = "official", operands: str = "auto",
                 workspace_mb: int = DEFAULT_WORKSPACE_BYTES >> 20):
        super().__init__()
        check_grad_semantics(grad_semantics)
        self.impl = resolve_contrastive_impl(impl)
        self.grad_semantics = grad_semantics
        if operands not in LOSS_OPERANDS:
            raise ValueError(f"loss operands must be one of {LOSS_OPERANDS}, got {operands!r}")
        if int(workspace_mb) < 1:
            raise ValueError(f"loss workspace must be >= 1 MB, got {workspace_mb}")
        self.operands = operands
        self.workspace_bytes = int(workspace_mb) << 20

    def forward(self, s_image_features, s_text_features, logit_scale, t_image_features,
                t_text_features, distill_logit_scale, s_img_crossmodal_features,
                s_txt_crossmodal_features, output_dict: bool = False, batch_size: int | None = None):
        si, si_base = _blocks("s_image_features", s_image_features, batch_size)
        shape = tuple(si[0].shape)
        if len(si) < 2:
            raise ValueError(f"s_image_features needs the 2 global crops first, got {len(si)} entries")
        b = shape[0]
        st = _blocks("s_text_features", s_text_features, b, None, shape)
        ti = _blocks("t_image_features", t_image_features, b, 2, shape)
        tt = _blocks("t_text_features", t_text_features, b, 2, shape)
        xi = _blocks("s_img_crossmodal_features", s_img_crossmodal_features, b, None, shape)
        xt = _blocks("s_txt_crossmodal_features", s_txt_crossmodal_features, b, None, shape)
        device = si[0].device
        impl = resolve_contrastive_impl(self.impl, device)
        if impl == "reference":
            out = cosmos_loss_reference(si, st[0], logit_scale, ti[0], tt[0], distill_logit_scale, xi[0], xt[0])
        else:
            def tensors(arg):   # the (n·B, D) tensor itself, or the list's tensors: never concatenated
                blocks, whole = arg
                return [whole] if whole is not None else blocks
            amp = device.type == "cuda" and torch.is_autocast_enabled("cuda")
            out = cosmos_loss_fast(tensors((si, si_base)), tensors(st), logit_scale, tensors(ti), tensors(tt),
                                   distill_logit_scale, tensors(xi), tensors(xt), batch_size=b, impl=impl,
                                   grad_semantics=self.grad_semantics,
                                   operands=resolve_loss_operands(self.operands, impl, device, amp),
                                   workspace_bytes=self.workspace_bytes)
        return out if output_dict else out["distill_loss"] + out["clip_loss"]
