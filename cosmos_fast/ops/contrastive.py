"""contrastive: the COSMOS loss (16 CLIP pairs with τ + 64 distillation pairs with τ_d).

:class:`CosmosLoss` is the op's entry point and switch (``impl``: ``"auto"`` — Triton on CUDA,
blockwise on CPU — ``"fused"``, ``"blockwise"`` or ``"reference"``). The fused and blockwise
implementations compute the loss without B×B logits; the reference
(:mod:`cosmos_fast.reference.contrastive`) is the official per-pair formulation.

Notation: U (B×D) student rows on this rank, V (N×D) target columns gathered from all ranks
(N = B·W), τ the group's scale, S = τ·U·Vᵀ. The global symmetric InfoNCE of one pair is

    ℓ = 1/(2·B_g) · [Σ_i (rlse_i − S_ii) + Σ_j (clse_j − S_jj)]

with rlse complete on the rank owning row i, and clse_j = logsumexp over the rows of all ranks:
an all-reduce of the column maxima (MAX) and then of the shifted sums (SUM), so no fixed shift can
underflow (τ up to 100). Each rank adds the column terms of the columns it owns; the per-pair
totals and the diagonal terms are summed across ranks, so every rank returns the global loss,
exactly as the official code (which computes the whole B_g×B_g loss on every rank).

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

Memory: forward saves the row log-sum-exps (P,Q,B) and column log-sum-exps (P,Q,N) per group;
backward recomputes S tile by tile.

Implementations here: :func:`blockwise_fwd` / :func:`blockwise_bwd` (PyTorch tiles, the kernel's
CPU twin with its exact contract), the fused kernels of ``kernels/contrastive.py`` (imported on
first use: triton is an optional dependency), the autograd and distributed glue around both
(:func:`cosmos_loss_fast`), and :class:`CosmosLoss`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..reference.contrastive import cosmos_loss_reference
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


def blockwise_fwd(u, v, tau, p_count: int, b: int, q_count: int, n: int, tile_m: int = TILE_M,
                  tile_n: int = TILE_N):
    """Same contract as kernels.contrastive.contrastive_fwd, in PyTorch tiles (fp32, or fp64 for
    fp64 inputs)."""
    acc = torch.promote_types(u.dtype, torch.float32)
    t = tau.reshape(()).to(acc)
    rlse = torch.empty(p_count, q_count, b, device=u.device, dtype=acc)
    cmax = torch.full((p_count, q_count, n), float("-inf"), device=u.device, dtype=acc)
    csum = torch.zeros(p_count, q_count, n, device=u.device, dtype=acc)
    for p in range(p_count):
        for i0 in range(0, b, tile_m):
            ut = u[p * b + i0: p * b + min(i0 + tile_m, b)].to(acc) * t
            for q in range(q_count):
                row_m = torch.full((ut.shape[0],), float("-inf"), device=u.device, dtype=acc)
                row_l = torch.zeros(ut.shape[0], device=u.device, dtype=acc)
                for j0 in range(0, n, tile_n):
                    j1 = min(j0 + tile_n, n)
                    s = ut @ v[q * n + j0: q * n + j1].to(acc).T
                    m_new = torch.maximum(row_m, s.max(dim=1).values)
                    row_l = row_l * torch.exp(row_m - m_new) + torch.exp(s - m_new[:, None]).sum(dim=1)
                    row_m = m_new
                    cm_old = cmax[p, q, j0:j1]
                    cm_new = torch.maximum(cm_old, s.max(dim=0).values)
                    csum[p, q, j0:j1] = (csum[p, q, j0:j1] * torch.exp(cm_old - cm_new)
                                         + torch.exp(s - cm_new[None, :]).sum(dim=0))
                    cmax[p, q, j0:j1] = cm_new
                rlse[p, q, i0:i0 + ut.shape[0]] = row_m + torch.log(row_l)
    return rlse, cmax, csum


def blockwise_bwd(u, v, tau, rlse, clse, coef, p_count: int, b: int, q_count: int, n: int, need_dv: bool,
                  tile_m: int = TILE_M, tile_n: int = TILE_N):
    """Same contract as kernels.contrastive.contrastive_bwd, in PyTorch tiles (fp32 accumulation,
    fp64 for fp64 inputs)."""
    acc = torch.promote_types(u.dtype, torch.float32)
    t = tau.reshape(()).to(acc)
    d = u.shape[1]
    du = torch.zeros(p_count * b, d, device=u.device, dtype=acc)
    dv = torch.zeros(q_count * n, d, device=u.device, dtype=acc) if need_dv else None
    dtau = torch.zeros((), device=u.device, dtype=acc)
    coef = coef.to(acc)
    for p in range(p_count):
        for i0 in range(0, b, tile_m):
            i1 = min(i0 + tile_m, b)
            ut = u[p * b + i0: p * b + i1].to(acc)
            for q in range(q_count):
                c = coef[p, q]
                r = rlse[p, q, i0:i1, None]
                for j0 in range(0, n, tile_n):
                    j1 = min(j0 + tile_n, n)
                    vt = v[q * n + j0: q * n + j1].to(acc)
                    s = (ut * t) @ vt.T
                    ds = c * (torch.exp(s - r) + torch.exp(s - clse[p, q, None, j0:j1]))
                    dtau += (ds * s).sum()
                    du[p * b + i0: p * b + i1] += ds @ vt
                    if need_dv:
                        dv[q * n + j0: q * n + j1] += ds.T @ ut
    du = (du * t).to(u.dtype)
    dv = (dv * t).to(v.dtype) if need_dv else v.new_empty(0, d)
    return du, dv, dtau / t


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
    """Σ_i rlse_i + Σ_{owned j} clse_j for every pair (P, Q) of a group, summed over ranks."""

    @staticmethod
    def forward(ctx, u, v, tau, p_count, b, q_count, n, impl, need_dv):
        fwd, _ = _backend(impl)
        rlse, cmax, csum = fwd(u, v, tau, p_count, b, q_count, n)
        w, rank = world()
        if w > 1:
            gmax = cmax.clone()
            dist.all_reduce(gmax, op=dist.ReduceOp.MAX)
            csum = csum * torch.exp(cmax - gmax)
            dist.all_reduce(csum)
            cmax = gmax
        clse = cmax + torch.log(csum)
        own = clse[:, :, rank * b:(rank + 1) * b] if w > 1 else clse
        out = rlse.sum(dim=2) + own.sum(dim=2)
        if w > 1:
            dist.all_reduce(out)
        ctx.save_for_backward(u, v, tau, rlse, clse)
        ctx.dims = (p_count, b, q_count, n, impl, need_dv)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        u, v, tau, rlse, clse = ctx.saved_tensors
        p_count, b, q_count, n, impl, need_dv = ctx.dims
        _, bwd = _backend(impl)
        need_dv = need_dv and ctx.needs_input_grad[1]
        with torch.autocast(u.device.type, enabled=False):      # fp32 tiles even if backward runs under autocast
            du, dv, dtau = bwd(u, v, tau, rlse, clse, grad_out.contiguous(), p_count, b, q_count, n, need_dv)
        return (du if ctx.needs_input_grad[0] else None, dv if need_dv else None,
                        dtau.reshape(tau.shape).to(tau.dtype) if ctx.needs_input_grad[2] else None,
                None, None, None, None, None, None)


def _targets_layout(x: torch.Tensor, count: int, b: int, w: int) -> torch.Tensor:
    """Gathered rank-major (W·count·B, D) → target-major (count·W·B, D): V_q = rows q·N..(q+1)·N."""
    if w == 1:
        return x
    return x.view(w, count, b, -1).transpose(0, 1).reshape(count * w * b, -1)


def _diag(u, v, tau, p_count, b, q_count, n, offset):
    """τ·U_p[i]·V_q[offset + i] summed over i: (P, Q)."""
    acc = torch.promote_types(u.dtype, torch.float32)
    up = u[: p_count * b].reshape(p_count, -1)                          # a view: rows are contiguous
    vq = v.view(q_count, n, -1)[:, offset:offset + b].reshape(q_count, -1)   # a view when W = 1
    return tau.to(acc) * (up.to(acc) @ vq.to(acc).T)                   # one small matmul, no B×D copies


def group_pair_losses(u, v, tau, p_count: int, b: int, q_count: int, impl: str, need_dv: bool):
    """Per-pair global symmetric InfoNCE (P, Q) for students u (P·B rows on this rank) and
    gathered targets v (Q·N rows, N = B·W, target-major)."""
    w, rank = world()
    n = b * w
    # fp32 arithmetic, also under autocast: there the tiles' matmuls and the diagonal term (one
    # B·D-long dot product per pair) would otherwise run, and be rounded, in 16 bits
    with torch.autocast(u.device.type, enabled=False):
        lse = _PairLSE.apply(u, v, tau, p_count, b, q_count, n, impl, need_dv)
        diag = _diag(u, v, tau, p_count, b, q_count, n, rank * b)
    if w > 1:
        diag = _SumAcrossRanks.apply(diag)
    return (lse - 2 * diag) / (2 * n)


def cosmos_loss_fast(s_image, s_text, logit_scale, t_image, t_text, distill_logit_scale, s_xi, s_xt,
                     batch_size: int, impl: str = "blockwise", grad_semantics: str = "official") -> dict:
    """COSMOS loss from (n·B, D) feature tensors (crop-/caption-major views of the model outputs)."""
    check_grad_semantics(grad_semantics)
    b = batch_size
    w, _ = world()
    n_txt = s_text.shape[0] // b
    n_xi, n_xt = s_xi.shape[0] // b, s_xt.shape[0] // b
    tau, tau_d = logit_scale, distill_logit_scale
    if w > 1:
        tau, tau_d = _SumGrad.apply(tau), _SumGrad.apply(tau_d)
        if grad_semantics == "exact":
            s_image, s_text, s_xi, s_xt = (_ScaleGrad.apply(x, float(w)) for x in (s_image, s_text, s_xi, s_xt))
        text_all = _targets_layout(_GatherWithGrad.apply(s_text), n_txt, b, w)
        with torch.no_grad():
            t_img_all = _targets_layout(_all_gather(t_image.detach()), t_image.shape[0] // b, b, w)
            t_txt_all = _targets_layout(_all_gather(t_text.detach()), t_text.shape[0] // b, b, w)
    else:
        text_all, t_img_all, t_txt_all = s_text, t_image.detach(), t_text.detach()
    n_ti, n_tt = t_img_all.shape[0] // (b * w), t_txt_all.shape[0] // (b * w)
    clip = group_pair_losses(s_image[: 2 * b], text_all, tau, 2, b, n_txt, impl, need_dv=True).mean()
    parts = [group_pair_losses(xs, ts, tau_d, count, b, tq, impl, need_dv=False).mean()
             for xs, count in ((s_xi, n_xi), (s_xt, n_xt))
             for ts, tq in ((t_img_all, n_ti), (t_txt_all, n_tt))]
    return {"distill_loss": sum(parts) / 4, "clip_loss": clip}


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


class CosmosLoss(nn.Module):
    """The contrastive op's entry point: ``CosmosLoss(impl, grad_semantics)(...)``.

    The forward takes the official keyword arguments — lists of B×D blocks, as the official
    ``COSMOSLoss`` — or the model's (n·B, D) crop-/caption-major tensors directly with ``batch_size``
    (no copy: the fused and blockwise paths read them as views). It returns
    ``{"distill_loss", "clip_loss"}`` with ``output_dict=True``, else their sum. ``grad_semantics``
    matters only with several ranks (see the module docstring).
    """

    def __init__(self, impl: str = "auto", grad_semantics: str = "official"):
        super().__init__()
        check_grad_semantics(grad_semantics)
        self.impl = resolve_contrastive_impl(impl)
        self.grad_semantics = grad_semantics

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
        impl = resolve_contrastive_impl(self.impl, si[0].device)
        if impl == "reference":
            out = cosmos_loss_reference(si, st[0], logit_scale, ti[0], tt[0], distill_logit_scale, xi[0], xt[0])
        else:
            def base(arg, count=None):   # the (n·B, D) view, or one concatenation of a list
                blocks, whole = arg
                if whole is not None:
                    return whole if count is None else whole[: count * b]
                return torch.cat(blocks[:count])
            out = cosmos_loss_fast(base((si, si_base), 2), base(st), logit_scale, base(ti), base(tt),
                                   distill_logit_scale, base(xi), base(xt), batch_size=b, impl=impl,
                                   grad_semantics=self.grad_semantics)
        return out if output_dict else out["distill_loss"] + out["clip_loss"]
