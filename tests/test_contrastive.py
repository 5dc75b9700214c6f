"""Fused (Triton, interpreter on CPU) and blockwise COSMOS loss against the reference: values and
every gradient, the LSE primitives, memory (no B×B tensor saved), multi-rank semantics, tracing."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from cosmos_fast import CosmosLoss
from cosmos_fast.contrastive import blockwise_bwd, blockwise_fwd
from cosmos_fast.ops import resolve_contrastive_impl

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
        torch.testing.assert_close(out[k], ref[k], rtol=1e-5, atol=1e-6)
    assert len(g) == len(g_ref) == 5
    for a, r in zip(g, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)


def brute(u, v, tau, p_count, b, q_count, n):
    s = tau * torch.einsum("pbd,qnd->pqbn", u.view(p_count, b, -1).double(), v.view(q_count, n, -1).double())
    return s.logsumexp(-1), s.max(-2).values, (s - s.max(-2, keepdim=True).values).exp().sum(-2), s


@pytest.mark.parametrize("impl", ["fused", "blockwise"])
@pytest.mark.parametrize("b,n,d", [(33, 70, 48), (5, 5, 20)])
def test_lse_primitives(impl, b, n, d):
    from cosmos_fast.contrastive import _backend

    fwd, bwd = _backend(impl)
    torch.manual_seed(0)
    p_count, q_count = 3, 2
    u = F.normalize(torch.randn(p_count * b + 4, d), dim=-1)[2:2 + p_count * b].to(dev(impl))   # an offset view
    v = F.normalize(torch.randn(q_count * n, d), dim=-1).to(dev(impl))
    tau = torch.tensor(7.0, device=dev(impl))
    kw = {"tile_m": 16, "tile_n": 32} if impl == "blockwise" else {}
    rlse, cmax, csum = fwd(u, v, tau, p_count, b, q_count, n, **kw)
    r_rlse, r_cmax, r_csum, s = brute(u, v, tau, p_count, b, q_count, n)
    torch.testing.assert_close(rlse.double(), r_rlse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((cmax + csum.log()).double(), (r_cmax + r_csum.log()), rtol=1e-5, atol=1e-5)
    clse = (cmax + csum.log())
    coef = torch.rand(p_count, q_count, device=dev(impl))
    du, dv, dtau = bwd(u, v, tau, rlse, clse, coef, p_count, b, q_count, n, True, **kw)
    ds = coef.double()[:, :, None, None] * ((s - r_rlse[..., None]).exp() + (s - clse.double()[:, :, None, :]).exp())
    ref_du = 7.0 * torch.einsum("pqbn,qnd->pbd", ds, v.view(q_count, n, -1).double()).reshape(p_count * b, d)
    ref_dv = 7.0 * torch.einsum("pqbn,pbd->qnd", ds, u.view(p_count, b, -1).double()).reshape(q_count * n, d)
    torch.testing.assert_close(du.double(), ref_du, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dv.double(), ref_dv, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dtau.double(), (ds * s).sum() / 7.0, rtol=1e-4, atol=1e-5)


def test_blockwise_larger_shapes_and_tiles(monkeypatch):
    import cosmos_fast.contrastive as c

    monkeypatch.setattr(c, "TILE_M", 64)
    monkeypatch.setattr(c, "TILE_N", 96)
    monkeypatch.setattr(c, "blockwise_fwd", lambda *a: blockwise_fwd(*a, tile_m=64, tile_n=96))
    monkeypatch.setattr(c, "blockwise_bwd", lambda *a: blockwise_bwd(*a, tile_m=64, tile_n=96))
    x, p = make(b=300, d=64, n_crops=3, n_caps=3, dtype=torch.float64)
    ref, g_ref = run("reference", *clone(x, p), 300)
    out, g = run("blockwise", *clone(x, p), 300)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-10, atol=1e-12)
    for a, r in zip(g, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-12)


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
        torch.testing.assert_close(out["clip_loss"], ref["clip_loss"], rtol=1e-5, atol=1e-4)
        for a, r in zip(g, g_ref):
            torch.testing.assert_close(a, r, rtol=1e-3, atol=1e-5)


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
        k.contrastive_fwd(torch.zeros(4, 8), torch.zeros(4, 8), torch.tensor(1.0), 1, 4, 1, 4)


def test_fake_impls_and_torch_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        u, v, tau = torch.empty(6, 16), torch.empty(8, 16), torch.empty(())
        rlse, cmax, csum = torch.ops.cosmos_fast.contrastive_fwd(u, v, tau, 2, 3, 2, 4)
        assert rlse.shape == (2, 2, 3) and cmax.shape == csum.shape == (2, 2, 4)
        du, dv, dtau = torch.ops.cosmos_fast.contrastive_bwd(u, v, tau, rlse, cmax, torch.empty(2, 2), 2, 3, 2, 4, True)
        assert du.shape == (6, 16) and dv.shape == (8, 16) and dtau.shape == ()
    x, p = make(b=8, d=16, n_crops=2, n_caps=2, device=DEV)
    loss = CosmosLoss("fused")

    def f(p, **x):
        return loss(logit_scale=p[0].exp(), distill_logit_scale=p[1].exp(), batch_size=8, **x)

    eager = f(p, **x)
    compiled = torch.compile(f, backend="aot_eager")(p, **x)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- two gloo ranks
def _rank_worker(rank, world, init_file, result_dir, impl, semantics):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, p = make(b=12, d=24, n_crops=4, n_caps=3, seed=5)            # the global batch of 12 rows/crop
        b = 12 // world
        local = {}
        for k, v in x.items():
            n = v.shape[0] // 12
            rows = v.detach().view(n, 12, -1)[:, rank * b:(rank + 1) * b].reshape(n * b, -1)
            local[k] = rows.clone().requires_grad_(v.requires_grad)
        p = p.detach().clone().requires_grad_()
        out, grads = run(impl, local, p, b, grad_semantics=semantics)
        torch.save({"out": {k: v.detach() for k, v in out.items()}, "grads": grads},
                   os.path.join(result_dir, f"{impl}-{semantics}-{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("impl,semantics", [
    pytest.param("fused", "official", marks=pytest.mark.skipif(
        CUDA, reason="gloo ranks hold CPU tensors; the fused kernels take CPU tensors only under the interpreter")),
    ("blockwise", "official"), ("blockwise", "exact")])
def test_two_ranks_equal_one_process(tmp_path, impl, semantics):
    world = 2
    mp.spawn(_rank_worker, args=(world, str(tmp_path / "init"), str(tmp_path), impl, semantics),
             nprocs=world, join=True)
    x, p = make(b=12, d=24, n_crops=4, n_caps=3, seed=5)
    ref, g_ref = run("reference", x, p, 12)
    names = [k for k, v in x.items() if v.requires_grad]
    factor = world if semantics == "exact" else 1
    for rank in range(world):
        res = torch.load(tmp_path / f"{impl}-{semantics}-{rank}.pt", weights_only=True)
        for k in ref:                        # every rank reports the global loss
            torch.testing.assert_close(res["out"][k], ref[k].detach(), rtol=1e-5, atol=1e-6)
        for name, g, gr in zip(names, res["grads"][:-1], g_ref[:-1]):
            n = gr.shape[0] // 12
            mine = gr.view(n, 12, -1)[:, rank * 6:(rank + 1) * 6].reshape(n * 6, -1)
            torch.testing.assert_close(g, factor * mine, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(res["grads"][-1], g_ref[-1], rtol=1e-4, atol=1e-6)   # full ∇τ


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
        err, err_torch = (out[k].double() - ref[k]).abs().item(), (low_ref[k].double() - ref[k]).abs().item()
        print(f"{k}: fused err {err:.3e}, torch {dtype} err {err_torch:.3e}")
        assert err <= 2 * err_torch + 1e-3
    for a, al, r in zip(g, g_low_ref, g_ref):
        err = (a.double() - r).abs().max().item()
        err_torch = (al.double() - r).abs().max().item()
        print(f"grad: fused err {err:.3e}, torch {dtype} err {err_torch:.3e}")
        assert err <= 2 * err_torch + 1e-3 * r.abs().max().item()
