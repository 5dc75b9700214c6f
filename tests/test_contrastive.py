"""The contrastive op (the COSMOS loss) over all its implementations: the reference against a
hand-written per-pair loop (values and every gradient, both scales) and gradcheck; fused (Triton,
interpreter on CPU) and blockwise against the reference; CosmosLoss' inputs and switch; the LSE
primitives; memory (no B×B tensor saved); multi-rank semantics on 2 gloo ranks; tracing."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from utils import assert_close, assert_within_twice_torch_error

import cosmos_fast.ops.contrastive as contrastive
from cosmos_fast import CosmosLoss
from cosmos_fast.ops.contrastive import blockwise_fwd, resolve_contrastive_impl
from cosmos_fast.reference.contrastive import cosmos_loss_reference

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"       # the fused kernels run natively on CUDA, interpreted on CPU


def dev(impl):
    return DEV if impl == "fused" else "cpu"


def feats(b, d, n, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n * b, d, generator=g, dtype=torch.float64), dim=-1).to(device, dtype)


def make(b=13, d=48, n_crops=8, n_caps=8, dtype=torch.float32, seed=0, device="cpu", scales=(2.3, 3.1)):
    x = {"s_image_features": feats(b, d, n_crops, dtype, seed, device),
         "s_text_features": feats(b, d, n_caps, dtype, seed + 1, device),
         "t_image_features": feats(b, d, 2, dtype, seed + 2, device),
         "t_text_features": feats(b, d, 2, dtype, seed + 3, device),
         "s_img_crossmodal_features": feats(b, d, n_crops, dtype, seed + 4, device),
         "s_txt_crossmodal_features": feats(b, d, n_caps, dtype, seed + 5, device)}
    x = {k: v.requires_grad_(not k.startswith("t_")) for k, v in x.items()}
    p = torch.tensor(scales, dtype=torch.float32 if dtype != torch.float64 else dtype, device=device).requires_grad_()
    return x, p


def run(impl, x, p, b, **kw):
    out = CosmosLoss(impl, **kw)(logit_scale=p[0].exp(), distill_logit_scale=p[1].exp(), output_dict=True,
                                 batch_size=b, **x)
    leaves = [v for k, v in x.items() if v.requires_grad] + [p]
    grads = torch.autograd.grad(out["distill_loss"] + out["clip_loss"], leaves)
    return out, grads


def clone(x, p):
    return ({k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in x.items()},
            p.detach().clone().requires_grad_())


CASES = [pytest.param(13, 48, 8, 8, id="odd-B13-D48-80pairs"),
         pytest.param(37, 48, 4, 3, id="B37-over-two-blocks"),
         pytest.param(1, 16, 2, 2, id="B1")]


@pytest.mark.parametrize("b,d,n_crops,n_caps", CASES)
@pytest.mark.parametrize("impl", ["fused", "blockwise"])
def test_matches_reference_forward_and_all_gradients(impl, b, d, n_crops, n_caps):
    x, p = make(b, d, n_crops, n_caps, device=dev(impl))
    ref, g_ref = run("reference", *clone(x, p), b)
    out, g = run(impl, *clone(x, p), b)
    for k in ("distill_loss", "clip_loss"):
        assert_close(out[k], ref[k])
    assert len(g) == len(g_ref) == 5
    for a, r in zip(g, g_ref):
        assert_close(a, r, grad=True)


def brute(us, vs, tau, b, n):
    d = us[0].shape[1]
    u, v = torch.cat(us).double().view(-1, b, d), torch.cat(vs).double().view(-1, n, d)
    s = tau * torch.einsum("pbd,qnd->pqbn", u, v)
    return s.logsumexp(-1), (s - tau).exp().sum(-2), s


@pytest.mark.parametrize("impl", ["fused", "blockwise"])
@pytest.mark.parametrize("b,n,d,split,ws", [
    pytest.param(33, 70, 100, None, 1 << 20, id="odd-B33-N70-D100"),
    pytest.param(5, 5, 20, None, 1 << 20, id="B5"),
    pytest.param(8, 128, 40, None, 8192, id="B8-N128-swapped-tiny-workspace"),
    pytest.param(40, 40, 128, 50, 4000, id="B40-D128-rows-split-workspace-chunks")])
def test_lse_primitives(impl, b, n, d, split, ws, monkeypatch):
    """The backends' contract on blocks spread over several tensors (one a strided view): rlse and
    the fixed-reference column sums, then every gradient through a workspace of ``ws`` bytes."""
    fwd, bwd = contrastive._backend(impl)
    if impl == "fused":
        import cosmos_fast.kernels.contrastive as k

        monkeypatch.setattr(k, "SPLIT_TARGET", split)     # split the B side across programs
    torch.manual_seed(0)
    base = F.normalize(torch.randn(2 * b + 4, d + 3), dim=-1)
    us = [base[2:2 + 2 * b, :d], F.normalize(torch.randn(b, d), dim=-1)]      # P = 3 in two tensors
    vs = [F.normalize(torch.randn(n, d), dim=-1), F.normalize(torch.randn(n, d), dim=-1)]
    us, vs = [x.to(dev(impl)) for x in us], [x.to(dev(impl)) for x in vs]
    tau = torch.tensor(7.0, device=dev(impl))
    rlse, csum = fwd(us, vs, tau, b, n)
    r_rlse, r_csum, s = brute(us, vs, 7.0, b, n)
    assert rlse.shape == (3, 2, b) and csum.shape == (3, 2, n) and csum.dtype == torch.float64
    assert_close(rlse.double(), r_rlse, rtol=1e-5, atol=1e-5)
    assert_close(csum, r_csum, rtol=1e-5, atol=0)
    clse = (7.0 + csum.log()).float()
    coef = torch.rand(3, 2, device=dev(impl))
    du, dv, dtau = bwd(us, vs, tau, rlse, clse, coef, b, n, True, ws)
    ds = coef.double()[:, :, None, None] * ((s - r_rlse[..., None]).exp() + (s - clse.double()[:, :, None, :]).exp())
    ref_du = 7.0 * torch.einsum("pqbn,qnd->pbd", ds, torch.cat(vs).double().view(2, n, -1)).reshape(3 * b, d)
    ref_dv = 7.0 * torch.einsum("pqbn,pbd->qnd", ds, torch.cat(us).double().view(3, b, -1)).reshape(2 * n, d)
    assert [x.shape for x in du] == [x.shape for x in us] and [x.shape for x in dv] == [x.shape for x in vs]
    assert_close(torch.cat(du).double(), ref_du, rtol=1e-4, atol=1e-5)
    assert_close(torch.cat(dv).double(), ref_dv, rtol=1e-4, atol=1e-5)
    assert_close(dtau.double(), (ds * s).sum() / 7.0, rtol=1e-4, atol=1e-5)


def test_chunk_plan_bounds_the_workspace():
    from cosmos_fast.ops.contrastive_chunks import plan_chunks

    for p, b, q, n, elem, ws in [(2, 4096, 8, 32768, 2, 256 << 20), (8, 2048, 2, 2048, 4, 1 << 20),
                                 (2, 300, 8, 70, 4, 3000), (8, 32, 2, 4096, 2, 1 << 20), (1, 5, 3, 4096, 4, 100)]:
        plan = plan_chunks(p, b, q, n, elem, ws)
        covered = torch.zeros(p * b, q, dtype=torch.int32)
        for r0, r1, q0, q1 in plan:
            covered[r0:r1, q0:q1] += 1
            assert (r1 - r0) * (q1 - q0) * n * elem <= max(ws, n * elem)    # one row × one target at least
        assert (covered == 1).all()                                          # every (row, target) once
    assert len(plan_chunks(2, 4096, 8, 32768, 2, 256 << 20)) > 1                # B × N per pair never whole


def test_blockwise_larger_shapes_and_tiles(monkeypatch):
    c = contrastive
    monkeypatch.setattr(c, "blockwise_fwd", lambda *a: blockwise_fwd(*a, tile_m=64, tile_n=96))
    monkeypatch.setattr(c, "BLOCKWISE_WORKSPACE_BYTES", 1 << 20)     # 3 chunks of rows per group
    x, p = make(b=300, d=64, n_crops=3, n_caps=3, dtype=torch.float64)
    ref, g_ref = run("reference", *clone(x, p), 300)
    out, g = run("blockwise", *clone(x, p), 300)
    for k in ref:
        assert_close(out[k], ref[k])
    for a, r in zip(g, g_ref):
        assert_close(a, r, grad=True)


@pytest.mark.parametrize("impl", ["fused", "blockwise"])
def test_no_bxb_tensor_saved_for_backward(impl):
    b = 64
    x, p = make(b=b, d=24, n_crops=2, n_caps=2, device=dev(impl))      # inputs hold 2·B·D < B² elements
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = CosmosLoss(impl)(logit_scale=p[0].exp(), distill_logit_scale=p[1].exp(), batch_size=b, **x)
    out.backward()
    assert saved and max(saved) < b * b
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        CosmosLoss("reference")(logit_scale=p[0].exp(), distill_logit_scale=p[1].exp(), batch_size=b, **x)
    assert max(saved) >= b * b        # the reference does hold B×B tensors: the check can fail


def test_large_scale_does_not_underflow():
    x, p = make(b=24, d=32, n_crops=2, n_caps=2, scales=(4.6051, 4.6051), device=DEV)   # τ = 100
    ref, g_ref = run("reference", *clone(x, p), 24)
    for impl in ("fused", "blockwise"):
        out, g = run(impl, *clone(x, p), 24)
        assert all(torch.isfinite(v) for v in out.values())
        assert_close(out["clip_loss"], ref["clip_loss"], rtol=1e-5, atol=1e-4)
        for a, r in zip(g, g_ref):
            assert_close(a, r, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("impl", ["fused", "blockwise"])
def test_unnormalised_features_exact_in_range_loud_beyond(impl):
    """The fixed-reference sums assume |S| ≤ τ; a violation stays exact while |S − τ| fits fp64's
    exponent range, and an extreme one gives a non-finite loss, never a wrong finite one."""
    x, p = make(b=9, d=16, n_crops=2, n_caps=2, scales=(3.0, 3.0), device=dev(impl))   # τ = e³ ≈ 20
    x = {k: (1.3 * v).detach().requires_grad_(v.requires_grad) for k, v in x.items()}  # |S| up to 1.7 τ
    ref, g_ref = run("reference", *clone(x, p), 9)
    out, g = run(impl, *clone(x, p), 9)
    for k in ref:
        assert_close(out[k], ref[k], rtol=1e-5, atol=1e-5)
    for a, r in zip(g, g_ref):
        assert_close(a, r, rtol=1e-3, atol=1e-5)
    x, p = make(b=9, d=16, n_crops=2, n_caps=2, scales=(4.6051, 4.6051), device=dev(impl))   # τ = 100
    x = {k: 10 * v.detach() for k, v in x.items()}                                     # |S| up to 100 τ
    loss = CosmosLoss(impl)(logit_scale=p[0].exp(), distill_logit_scale=p[1].exp(), batch_size=9, output_dict=True, **x)
    assert torch.isfinite(CosmosLoss("reference")(logit_scale=p[0].exp(), distill_logit_scale=p[1].exp(),
                                                   batch_size=9, **x))
    assert not torch.isfinite(loss["clip_loss"]) and not torch.isfinite(loss["distill_loss"])


def as_lists(x, b):
    """The official list API's inputs: every B-row block a separate leaf tensor."""
    return {k: [blk.detach().clone().requires_grad_(v.requires_grad) for blk in v.split(b)] for k, v in x.items()}


@pytest.mark.parametrize("impl", ["fused", "blockwise"])
def test_list_api_equals_tensor_api(impl):
    b = 11
    x, p = make(b=b, d=40, n_crops=4, n_caps=3, device=dev(impl))
    out_t, g_t = run(impl, *clone(x, p), b)
    xl, pl = as_lists(x, b), p.detach().clone().requires_grad_()
    out_l = CosmosLoss(impl)(logit_scale=pl[0].exp(), distill_logit_scale=pl[1].exp(), output_dict=True, **xl)
    leaves = [blk for k, v in xl.items() if not k.startswith("t_") for blk in v] + [pl]
    g_l = iter(torch.autograd.grad(out_l["distill_loss"] + out_l["clip_loss"], leaves, allow_unused=True))
    for k in out_t:
        assert_close(out_l[k], out_t[k], rtol=1e-6, atol=1e-7)
    for k, gt in zip([k for k in x if not k.startswith("t_")] + ["scales"], g_t):
        n = 1 if k == "scales" else len(xl[k])
        got = [next(g_l) for _ in range(n)]
        if k == "s_image_features":        # only the 2 global crops enter the loss
            assert all(g is None for g in got[2:])
            got = got[:2] + [torch.zeros_like(c) for c in xl[k][2:]]
        assert_close(got[0] if k == "scales" else torch.cat(got), gt, rtol=1e-5, atol=1e-7, msg=k)


def test_list_api_does_not_concatenate_the_features():
    """No cat / stack of feature size runs for list inputs (the old path concatenated every list)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    b, d = 16, 32
    big = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.cat, torch.ops.aten.stack) and out.numel() >= b * d:
                big.append((str(func), tuple(out.shape)))
            return out

    x, p = make(b=b, d=d, n_crops=4, n_caps=4)
    xl = as_lists(x, b)
    with Watch():
        loss = CosmosLoss("blockwise")(logit_scale=p[0].exp(), distill_logit_scale=p[1].exp(), **xl)
        loss.backward()
    assert not big, big
    assert all(blk.grad is not None for blk in xl["s_txt_crossmodal_features"])


@pytest.mark.parametrize("impl", ["fused", "blockwise"])
def test_backward_allocates_within_the_workspace(impl, monkeypatch):
    """At a size where one pair's B×N logit gradient (16 KiB) exceeds a 4 KiB workspace, no tensor
    the backward allocates is larger than the workspace."""
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setattr(contrastive, "BLOCKWISE_WORKSPACE_BYTES", 1 << 30)
    fwd, bwd = contrastive._backend(impl)
    b = n = 64
    ws = 4096
    torch.manual_seed(0)
    us = [F.normalize(torch.randn(b, 4), dim=-1).to(dev(impl)) for _ in range(2)]
    vs = [F.normalize(torch.randn(n, 4), dim=-1).to(dev(impl)) for _ in range(2)]
    tau = torch.tensor(5.0, device=dev(impl))
    rlse, csum = fwd(us, vs, tau, b, n)
    clse = (5.0 + csum.log()).float()
    sizes = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (list, tuple)) else [out]):
                if isinstance(t, torch.Tensor):
                    sizes.append(t.numel() * t.element_size())
            return out

    with Watch():
        du, dv, _ = bwd(us, vs, tau, rlse, clse, torch.ones(2, 2, device=dev(impl)), b, n, True, ws)
    assert b * n * 4 > ws and sizes and max(sizes) <= ws
    ref_du, ref_dv, _ = bwd(us, vs, tau, rlse, clse, torch.ones(2, 2, device=dev(impl)), b, n, True, 1 << 20)
    for a, r in zip(du + dv, ref_du + ref_dv):
        assert_close(a, r, rtol=1e-5, atol=1e-6)


def test_loss_operands(monkeypatch):
    from cosmos_fast.ops.contrastive import resolve_loss_operands

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_loss_operands("auto", "fused", cuda, amp=True) == torch.bfloat16
    assert resolve_loss_operands("auto", "fused", cuda, amp=False) is None
    assert resolve_loss_operands("auto", "blockwise", cpu, amp=True) is None
    assert resolve_loss_operands("fp32", "fused", cuda, amp=True) == torch.float32
    with pytest.raises(ValueError, match="loss operands"):
        CosmosLoss("blockwise", operands="fp16")
    with pytest.raises(ValueError, match="workspace"):
        CosmosLoss("blockwise", workspace_mb=0)
    # bf16 operands: the LSE products read bf16 copies, gradients flow back to the fp32 features
    x, p = make(b=12, d=32, n_crops=2, n_caps=2)
    ref, g_ref = run("reference", *clone(x, p), 12)
    out, g = run("blockwise", *clone(x, p), 12, operands="bf16")
    for k in ref:
        assert_close(out[k], ref[k], dtype=torch.bfloat16)
        assert out[k].dtype == torch.float32
    for a, r in zip(g, g_ref):
        assert a.dtype == torch.float32
        assert_close(a, r, dtype=torch.bfloat16, atol=2e-3)


def test_impl_resolution_and_errors(monkeypatch):
    assert resolve_contrastive_impl("auto") == "auto"
    assert resolve_contrastive_impl("auto", torch.device("cpu")) == "blockwise"
    with pytest.raises(ValueError, match="unknown contrastive implementation"):
        CosmosLoss("fast")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="needs CUDA"):
        resolve_contrastive_impl("fused", torch.device("cpu"))
    import cosmos_fast.kernels.contrastive as k

    monkeypatch.setattr(k, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="needs CUDA"):
        k.contrastive_fwd([torch.zeros(4, 8)], [torch.zeros(4, 8)], torch.tensor(1.0), 4, 4)


def test_fake_impls_and_torch_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        us, vs, tau = [torch.empty(6, 16), torch.empty(3, 16)], [torch.empty(8, 16)], torch.empty(())
        rlse, csum = torch.ops.cosmos_fast.contrastive_fwd(us, vs, tau, 3, 4)
        assert rlse.shape == (3, 2, 3) and csum.shape == (3, 2, 4) and csum.dtype == torch.float64
        du, dv, dtau = torch.ops.cosmos_fast.contrastive_bwd(us, vs, tau, rlse, csum.float(), torch.empty(3, 2), 3, 4,
                                                            True, 1 << 20)
        assert [x.shape for x in du] == [(6, 16), (3, 16)] and [x.shape for x in dv] == [(8, 16)]
        assert dtau.shape == ()
    x, p = make(b=8, d=16, n_crops=2, n_caps=2, device=DEV)
    loss = CosmosLoss("fused")

    def f(p, **x):
        return loss(logit_scale=p[0].exp(), distill_logit_scale=p[1].exp(), batch_size=8, **x)

    eager = f(p, **x)
    compiled = torch.compile(f, backend="aot_eager")(p, **x)
    assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- two gloo ranks
def _rank_worker(rank, world, init_file, result_dir, impl, semantics, api):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    reductions = []
    all_reduce = dist.all_reduce

    def recording_all_reduce(t, op=dist.ReduceOp.SUM, **kw):
        reductions.append((str(op), str(t.dtype), tuple(t.shape)))
        return all_reduce(t, op=op, **kw)

    dist.all_reduce = recording_all_reduce
    try:
        x, p = make(b=12, d=24, n_crops=4, n_caps=3, seed=5)            # the global batch of 12 rows/crop
        b = 12 // world
        local = {}
        for k, v in x.items():
            n = v.shape[0] // 12
            rows = v.detach().view(n, 12, -1)[:, rank * b:(rank + 1) * b].reshape(n * b, -1)
            local[k] = rows.clone().requires_grad_(v.requires_grad)
        p = p.detach().clone().requires_grad_()
        if api == "list":
            local = as_lists(local, b)
            out = CosmosLoss(impl, grad_semantics=semantics)(logit_scale=p[0].exp(), distill_logit_scale=p[1].exp(),
                                                              output_dict=True, **local)
            blocks = [local[k] for k in local if not k.startswith("t_")]
            grads = torch.autograd.grad(out["distill_loss"] + out["clip_loss"], [t for v in blocks for t in v] + [p],
                                        allow_unused=True)
            it, merged = iter(grads), []
            for v in blocks:              # per-block gradients back to the tensor layout (unused crops: 0)
                merged.append(torch.cat([g if g is not None else torch.zeros_like(t) for t, g in zip(v, it)]))
            grads = (*merged, next(it))
        else:
            out, grads = run(impl, local, p, b, grad_semantics=semantics)
        torch.save({"out": {k: v.detach() for k, v in out.items()}, "grads": grads, "reductions": reductions},
                   os.path.join(result_dir, f"{impl}-{semantics}-{api}-{rank}.pt"))
    finally:
        dist.all_reduce = all_reduce
        dist.destroy_process_group()


@pytest.mark.parametrize("impl,semantics,api", [
    pytest.param("fused", "official", "tensor", marks=pytest.mark.skipif(
        CUDA, reason="gloo ranks hold CPU tensors; the fused kernels take CPU tensors only under the interpreter")),
    ("blockwise", "official", "tensor"), ("blockwise", "exact", "list")])
def test_two_ranks_equal_one_process(tmp_path, impl, semantics, api):
    """Two ranks give the one-process loss and gradients; the column statistics are completed by
    one SUM all-reduce of fp64 sums per group (no MAX reduction)."""
    world = 2
    mp.spawn(_rank_worker, args=(world, str(tmp_path / "init"), str(tmp_path), impl, semantics, api),
             nprocs=world, join=True)
    x, p = make(b=12, d=24, n_crops=4, n_caps=3, seed=5)
    ref, g_ref = run("reference", x, p, 12)
    names = [k for k, v in x.items() if v.requires_grad]
    factor = world if semantics == "exact" else 1
    for rank in range(world):
        res = torch.load(tmp_path / f"{impl}-{semantics}-{api}-{rank}.pt", weights_only=True)
        for k in ref:                        # every rank reports the global loss
            assert_close(res["out"][k], ref[k].detach())
        for name, g, gr in zip(names, res["grads"][:-1], g_ref[:-1]):
            n = gr.shape[0] // 12
            mine = gr.view(n, 12, -1)[:, rank * 6:(rank + 1) * 6].reshape(n * 6, -1)
            assert_close(g, factor * mine, grad=True, msg=name)
        assert_close(res["grads"][-1], g_ref[-1], grad=True)   # full ∇τ
        ops = res["reductions"]
        assert not any("MAX" in op for op, _, _ in ops), ops
        col_sums = [shape for op, dtype, shape in ops if dtype == "torch.float64" and len(shape) == 3]
        assert sorted(col_sums) == sorted([(2, 3, 12)] + [(4, 2, 12)] * 2 + [(3, 2, 12)] * 2), ops   # one per group


# ------------------------------------------------ the reference against a hand-written loop
def handwritten_pair(u, v, tau):
    """½·(mean_i [lse_j τu_i·v_j − τu_i·v_i] + mean_j [lse_i τu_i·v_j − τu_j·v_j]), by loops."""
    b = u.shape[0]
    rows, cols = [], []
    for i in range(b):
        s_row = torch.stack([tau * torch.dot(u[i], v[j]) for j in range(b)])
        rows.append(torch.logsumexp(s_row, 0) - s_row[i])
        s_col = torch.stack([tau * torch.dot(u[j], v[i]) for j in range(b)])
        cols.append(torch.logsumexp(s_col, 0) - s_col[i])
    return 0.5 * (torch.stack(rows).mean() + torch.stack(cols).mean())


def handwritten_cosmos(si, st, tau, ti, tt, tau_d, sxi, sxt):
    def mean(us, vs, scale):
        terms = [handwritten_pair(u, v, scale) for u in us for v in vs]
        return sum(terms) / len(terms)

    ti, tt = [t.detach() for t in ti], [t.detach() for t in tt]
    # ¼ of the four list means (§3.3); equals the mean over all 64 pairs when |XI| = |XT|
    distill = (mean(sxi, ti, tau_d) + mean(sxi, tt, tau_d) + mean(sxt, ti, tau_d) + mean(sxt, tt, tau_d)) / 4
    return distill, mean(si[:2], st, tau)


def make_inputs(b=5, d=16, n_crops=8, n_caps=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def feats(n):
        return [F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=-1).requires_grad_() for _ in range(n)]

    scales = torch.tensor([2.3, 3.1], dtype=dtype).requires_grad_()
    return {"s_image_features": feats(n_crops), "s_text_features": feats(n_caps),
            "t_image_features": feats(2), "t_text_features": feats(2),
            "s_img_crossmodal_features": feats(n_crops), "s_txt_crossmodal_features": feats(n_caps)}, scales


def _grads(inputs, scales, total):
    leaves = [x for v in inputs.values() for x in v] + [scales]
    return torch.autograd.grad(total, leaves, allow_unused=True)


@pytest.mark.parametrize("b,n_crops,n_caps", [(5, 8, 8), (3, 4, 3), (1, 2, 8)])
@pytest.mark.parametrize("impl", ["reference", "blockwise"])   # the fused kernels take no fp64
def test_loss_and_all_gradients_match_handwritten_loop(impl, b, n_crops, n_caps):
    inputs, scales = make_inputs(b=b, n_crops=n_crops, n_caps=n_caps)
    out = CosmosLoss(impl)(logit_scale=scales[0].exp(), distill_logit_scale=scales[1].exp(),
                       output_dict=True, **inputs)
    ref_d, ref_c = handwritten_cosmos(inputs["s_image_features"], inputs["s_text_features"], scales[0].exp(),
                                      inputs["t_image_features"], inputs["t_text_features"], scales[1].exp(),
                                      inputs["s_img_crossmodal_features"], inputs["s_txt_crossmodal_features"])
    assert_close(out["distill_loss"], ref_d)
    assert_close(out["clip_loss"], ref_c)
    g_ours = _grads(inputs, scales, out["distill_loss"] + out["clip_loss"])
    g_ref = _grads(inputs, scales, ref_d + ref_c)
    for a, r in zip(g_ours, g_ref):
        if r is None:
            assert a is None or a.abs().max() == 0
        else:
            assert_close(a, r, grad=True)
    if b > 1:   # with one sample every pair loss is identically 0
        assert g_ours[-1].abs().min() > 0


def test_sum_versus_dict():
    inputs, scales = make_inputs(b=3)
    loss = CosmosLoss()
    d = loss(logit_scale=scales[0].exp(), distill_logit_scale=scales[1].exp(), output_dict=True, **inputs)
    s = loss(logit_scale=scales[0].exp(), distill_logit_scale=scales[1].exp(), **inputs)
    assert_close(s, d["distill_loss"] + d["clip_loss"])


def test_gradcheck_small():
    inputs, scales = make_inputs(b=2, d=4, n_crops=2, n_caps=2)
    keys = list(inputs)

    def f(*args):
        *flat, sc = args
        it = iter(flat)
        kw = {k: [next(it) for _ in inputs[k]] for k in keys}
        out = cosmos_loss_reference(logit_scale=sc[0].exp(), distill_logit_scale=sc[1].exp(), **kw)
        return out["distill_loss"] + out["clip_loss"]

    flat = [x for k in keys for x in inputs[k] if not k.startswith("t_")]
    teacher = {k: inputs[k] for k in keys if k.startswith("t_")}

    def g(*args):
        *student, sc = args
        it = iter(student)
        kw = {k: ([next(it) for _ in inputs[k]] if not k.startswith("t_") else teacher[k]) for k in keys}
        return f(*[x for k in keys for x in kw[k]], sc)

    assert torch.autograd.gradcheck(g, (*flat, scales))


@pytest.mark.parametrize("field,value,match", [
    ("t_image_features", "three", "t_image_features must have exactly 2 entries"),
    ("s_text_features", "wrong_shape", r"s_text_features\[1\] must be a 5×16"),
    ("s_image_features", "tensor", "s_image_features is a tensor: pass batch_size"),
])
def test_bad_inputs(field, value, match):
    inputs, scales = make_inputs()
    if value == "three":
        inputs[field] = inputs[field] + inputs[field][:1]
    elif value == "wrong_shape":
        inputs[field][1] = torch.randn(4, 16, dtype=torch.float64)
    else:
        inputs[field] = torch.cat(inputs[field])
    with pytest.raises((ValueError, TypeError), match=match):
        CosmosLoss()(logit_scale=scales[0].exp(), distill_logit_scale=scales[1].exp(), **inputs)


def test_unknown_impl():
    with pytest.raises(ValueError, match="unknown contrastive implementation 'nope'"):
        CosmosLoss(impl="nope")


# ----------------------------------------------------- official distributed semantics (reference)
def _reference_rank_worker(rank, world, init_file, result_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        inputs, scales = make_inputs(b=6, seed=3)       # the global batch, identical on every rank
        b = 6 // world
        local = {k: [x.detach()[rank * b:(rank + 1) * b].clone().requires_grad_() for x in v]
                 for k, v in inputs.items()}
        sc = scales.detach().clone().requires_grad_()
        out = cosmos_loss_reference(logit_scale=sc[0].exp(), distill_logit_scale=sc[1].exp(), **local)
        total = out["distill_loss"] + out["clip_loss"]
        grads = torch.autograd.grad(total, [x for v in local.values() for x in v] + [sc], allow_unused=True)
        torch.save({"loss": total.detach(), "grads": grads}, os.path.join(result_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_official_multi_rank_semantics(tmp_path):
    world = 2
    mp.spawn(_reference_rank_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world,
             join=True)
    inputs, scales = make_inputs(b=6, seed=3)
    out = cosmos_loss_reference(logit_scale=scales[0].exp(), distill_logit_scale=scales[1].exp(), **inputs)
    total = out["distill_loss"] + out["clip_loss"]
    full = _grads(inputs, scales, total)
    for rank in range(world):
        res = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        # every rank computes the whole global-batch loss
        assert_close(res["loss"], total.detach())
        for g_rank, g_full in zip(res["grads"][:-1], full[:-1]):
            if g_full is None:
                assert g_rank is None
            else:   # a rank's features get the full-loss gradient of its own rows
                assert_close(g_rank, g_full[rank * 3:(rank + 1) * 3], grad=True)
        # the scales see the whole loss on every rank
        assert_close(res["grads"][-1], full[-1], grad=True)


# ---------------------------------------------------------------------------------- GPU only
@pytest.mark.skipif(not CUDA, reason="bf16/fp16 kernel equality needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,d", [(256, 512), (1000, 512), (77, 64)])
def test_fused_low_precision_on_gpu(dtype, b, d):
    x64, p = make(b=b, d=d, n_crops=8, n_caps=8, dtype=torch.float64, device="cuda")
    ref, g_ref = run("reference", *clone(x64, p.double()), b)
    xl = {k: v.detach().to(dtype).requires_grad_(v.requires_grad) for k, v in x64.items()}
    low_ref, g_low_ref = run("reference", *clone(xl, p), b)
    out, g = run("fused", *clone(xl, p), b)
    for k in ref:
        assert_within_twice_torch_error(out[k], low_ref[k], ref[k], f"fused {dtype} {k}")
    for i, (a, al, r) in enumerate(zip(g, g_low_ref, g_ref)):
        assert_within_twice_torch_error(a, al, r, f"fused {dtype} grad {i}")


@pytest.mark.skipif(not CUDA, reason="bf16 operands on the fused kernels need CUDA")
def test_fused_bf16_operands_on_gpu():
    """fp32 features (what autocast hands the loss) with operands='bf16': within 2× the error of the
    torch path on bf16 copies of the features, against fp64."""
    b, d = 512, 512
    x64, p = make(b=b, d=d, n_crops=8, n_caps=8, dtype=torch.float64, device="cuda")
    ref, g_ref = run("reference", *clone(x64, p.double()), b)
    x32 = {k: v.detach().float().requires_grad_(v.requires_grad) for k, v in x64.items()}
    xl = {k: v.detach().bfloat16().requires_grad_(v.requires_grad) for k, v in x64.items()}
    low_ref, g_low_ref = run("reference", *clone(xl, p), b)
    out, g = run("fused", *clone(x32, p), b, operands="bf16")
    for k in ref:
        assert_within_twice_torch_error(out[k], low_ref[k], ref[k], f"fused bf16 operands {k}")
    for i, (a, al, r) in enumerate(zip(g, g_low_ref, g_ref)):
        assert a.dtype == torch.float32
        assert_within_twice_torch_error(a, al, r, f"fused bf16 operands grad {i}")


@pytest.mark.skipif(not CUDA, reason="compiled-kernel checks need CUDA")
@pytest.mark.parametrize("b,dtype", [(1024, torch.bfloat16), (32, torch.bfloat16), (256, torch.float32)])
def test_compiled_kernels_on_gpu(b, dtype):
    """The kernels the autotuner picked: wgmma on Hopper (16-bit operands), no register spills, shared
    memory within the device's limit."""
    import triton

    import cosmos_fast.kernels.contrastive as k

    torch.manual_seed(0)
    n = 4 * b                                   # B < N: the swapped roles, as with 4 ranks
    us = [F.normalize(torch.randn(2 * b, 512, device="cuda"), dim=-1).to(dtype)]
    vs = [F.normalize(torch.randn(2 * n, 512, device="cuda"), dim=-1).to(dtype)]
    tau = torch.tensor(20.0, device="cuda")
    rlse, csum = k.contrastive_fwd(us, vs, tau, b, n)
    k.contrastive_bwd(us, vs, tau, rlse, (20.0 + csum.log()).float(), torch.ones(2, 2, device="cuda"), b, n, True,
                      1 << 28)
    torch.cuda.synchronize()
    compiled = k.compiled_kernels()
    assert compiled["fwd"] and compiled["grad"]
    limit = triton.runtime.driver.active.utils.get_device_properties(torch.cuda.current_device())["max_shared_mem"]
    hopper = torch.cuda.get_device_capability() == (9, 0)
    for name, kernels in compiled.items():
        for kern in kernels:
            print(name, kern.metadata.name, "spills", kern.n_spills, "shared", kern.metadata.shared,
                  "wgmma", "wgmma" in kern.asm["ptx"])
            assert kern.n_spills == 0, (name, kern.metadata)
            assert kern.metadata.shared <= limit
            if hopper and dtype != torch.float32:
                assert "wgmma" in kern.asm["ptx"], (name, kern.metadata)
