"""The fused (Triton) cross-attention pooling against the official formulation.

On machines without CUDA the kernels run under TRITON_INTERPRET=1 (set by conftest.py before any
kernel module is imported) in fp32 with small widths. bf16 equality and the production shapes
(D = 512, 8 heads, n = 8 / 1, L = 196 / 77) and head dim 8 on a real GPU are CUDA-only tests.
"""
import math
import os

import pytest
import torch

from cosmos_fast.fused_cross_pool import cross_pool_fused
from cosmos_fast.kernels import cross_pool as kc
from cosmos_fast.model.pooler import CrossAttentionPooler
from cosmos_fast.ops import cross_pool
from test_pooler import OfficialStylePooler, _randomise, official_features

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"          # the kernels run natively on CUDA, interpreted on CPU
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
needs_kernels = pytest.mark.skipif(not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
                                   reason="needs CUDA or TRITON_INTERPRET=1")


def _make(d, heads, dtype=torch.float32, device="cpu"):
    ours = CrossAttentionPooler(d, d, n_head=heads)
    _randomise(ours)
    official = OfficialStylePooler(d, heads)
    official.load_state_dict(ours.state_dict(), strict=True)
    return ours.to(device=device, dtype=dtype), official


def _inputs(b, length, n, d, dtype=torch.float32, device="cpu", seed=2):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(b, length, d, generator=g, dtype=torch.float64)
    q = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    w = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (ctx, q, w)]


def _features_and_grads(fn, module, ctx, q, w):
    """fn(module, ctx, q) and the gradients of <out, w> w.r.t. ctx, q and every parameter (by name)."""
    ctx = ctx.detach().clone().requires_grad_()
    q = q.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    out = fn(module, ctx, q)
    (out.float() * w.float()).sum().backward()
    grads = {"context": ctx.grad, "queries": q.grad}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    return out.detach(), grads


CASES = [  # (B, L, n, D, heads): interpreter-sized
    pytest.param(3, 77, 8, 64, 8, id="text-L77-n8-d8"),
    pytest.param(5, 49, 8, 32, 4, id="image-L49-n8-oddB"),
    pytest.param(2, 196, 1, 32, 2, id="image-L196-n1"),
    pytest.param(1, 9, 3, 16, 2, id="tiny"),
    pytest.param(2, 30, 20, 64, 2, id="n20-d32"),
]


@needs_kernels
@pytest.mark.parametrize("b,length,n,d,heads", CASES)
def test_fused_equals_official_fp32(b, length, n, d, heads):
    ours, official = _make(d, heads, device=DEVICE)
    official = official.to(DEVICE)
    ctx, q, w = _inputs(b, length, n, d, device=DEVICE)
    out, grads = _features_and_grads(cross_pool_fused, ours, ctx, q, w)
    # truth: the official formulation (nn.MultiheadAttention on the repeated context) in fp64
    ref, ref_grads = _features_and_grads(official_features, official.double(), ctx.double(), q.double(),
                                         w.double())
    assert out.shape == (b, n, d) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-6)
    assert set(grads) == set(ref_grads) and len(grads) == 2 + 8   # ctx, q + every pooler parameter
    for name, g in grads.items():
        r = ref_grads[name].float()
        assert g is not None and g.dtype == torch.float32, name
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5 * max(1.0, r.abs().max().item()), msg=name)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("b,h,n,length,d", [(2, 3, 8, 77, 8), (3, 2, 1, 70, 16), (1, 1, 17, 5, 40)],
                         ids=["n8-d8", "n1-d16", "n17-d40"])
def test_core_matches_softmax_attention(b, h, n, length, d, dtype):
    """The attention core alone on strided (head-split) and contiguous layouts: o, lse, dq, dk, dv."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, n, h, d, generator=g).to(DEVICE, dtype).transpose(1, 2)   # strided, as split_heads
    k = torch.randn(b, length, h, d, generator=g).to(DEVICE, dtype).transpose(1, 2)
    v = torch.randn(b, h, length, d, generator=g).to(DEVICE, dtype)               # contiguous
    do = torch.randn(b, h, n, d, generator=g).to(DEVICE, dtype)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = q64 @ k64.transpose(-1, -2) / math.sqrt(d)
    ref = torch.softmax(s, -1) @ v64
    ref.backward(do.double())

    o, lse = kc.cross_pool_attn_fwd(q, k, v)
    dq, dk, dv = kc.cross_pool_attn_bwd(do, q, k, v, o, lse)
    assert o.dtype == dq.dtype == dk.dtype == dv.dtype == dtype and lse.dtype == torch.float32
    assert o.shape == q.shape and dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    # fp32: accumulation order only; bf16: fp32 math on bf16 inputs, one rounding of each output
    tol = dict(rtol=2e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1).detach(), rtol=2e-6, atol=2e-6)
    for name, got, want in (("o", o, ref), ("dq", dq, q64.grad), ("dk", dk, k64.grad), ("dv", dv, v64.grad)):
        torch.testing.assert_close(got.double(), want.detach(), **tol, msg=name)


@needs_kernels
def test_output_layout_makes_head_merge_free():
    q = torch.randn(2, 3, 4, 16, device=DEVICE).transpose(1, 2)
    k = torch.randn(2, 7, 4, 16, device=DEVICE).transpose(1, 2)
    o = kc.cross_pool_attn(q, k, k)
    merged = o.transpose(1, 2).reshape(2, 3, 64)
    assert merged.data_ptr() == o.data_ptr() and merged.is_contiguous()


@needs_kernels
def test_autocast_bf16_close_to_shared_path():
    """Under autocast the projections give bf16 q/k/v; the kernel takes them as they are."""
    ours, _ = _make(32, 4, device=DEVICE)
    ctx, q, _ = _inputs(2, 20, 8, 32, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got = cross_pool_fused(ours, ctx, q)
        want = cross_pool(ours, ctx, q, impl="shared")
    ref = cross_pool(ours, ctx, q, impl="shared")                            # fp32
    assert got.dtype == want.dtype == torch.float32
    err_fused, err_torch = (got - ref).abs().max().item(), (want - ref).abs().max().item()
    print(f"autocast bf16: fused err {err_fused:.3e}, torch err {err_torch:.3e}")
    assert err_fused <= 2 * err_torch + 1e-3


# ---------------------------------------------------------------------------------------------
# torch.library registration: fake implementations, autograd, torch.compile
# ---------------------------------------------------------------------------------------------
@needs_kernels
def test_opcheck_fwd_and_bwd_ops():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, 2, 8, generator=g).to(DEVICE).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 5, 2, 8, generator=g).to(DEVICE).transpose(1, 2).requires_grad_()
    v = torch.randn(2, 2, 5, 8, generator=g).to(DEVICE).requires_grad_()
    res = torch.library.opcheck(torch.ops.cosmos_fast.cross_pool_attn_fwd.default, (q, k, v, 0.3))
    assert set(res.values()) == {"SUCCESS"}, res
    o, lse = kc.cross_pool_attn_fwd(q.detach(), k.detach(), v.detach(), 0.3)
    do = torch.randn(o.shape, generator=g).to(DEVICE)
    res = torch.library.opcheck(torch.ops.cosmos_fast.cross_pool_attn_bwd.default,
                                (do, q.detach(), k.detach(), v.detach(), o, lse, 0.3))
    assert set(res.values()) == {"SUCCESS"}, res


def test_fake_impl_gives_production_shapes():
    """Shapes, strides and dtypes of both ops under FakeTensorMode at the ViT-B/16 image pooler size."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    b, h, n, length, d = 64, 8, 8, 196, 64
    with FakeTensorMode():
        q = torch.empty(b, n, h * d, dtype=torch.bfloat16).view(b, n, h, d).transpose(1, 2)
        kv = torch.empty(b, length, h * d, dtype=torch.bfloat16).view(b, length, h, d).transpose(1, 2)
        o, lse = torch.ops.cosmos_fast.cross_pool_attn_fwd(q, kv, kv, 0.125)
        dq, dk, dv = torch.ops.cosmos_fast.cross_pool_attn_bwd(o, q, kv, kv, o, lse, 0.125)
    assert o.shape == (b, h, n, d) and o.dtype == torch.bfloat16
    assert o.stride() == (n * h * d, d, h * d, 1)                     # (B, n, H, d) buffer, transposed
    assert lse.shape == (b, h, n) and lse.dtype == torch.float32
    assert dq.shape == (b, h, n, d) and dk.shape == dv.shape == (b, h, length, d)
    assert dk.stride() == (length * h * d, d, h * d, 1) and dk.dtype == torch.bfloat16


@needs_kernels
def test_torch_compile_traces_fused_pooler():
    ours, _ = _make(32, 4, device=DEVICE)
    ctx, q, w = _inputs(3, 11, 8, 32, device=DEVICE)
    compiled = torch.compile(cross_pool_fused, backend="aot_eager", fullgraph=True)
    out, grads = _features_and_grads(cross_pool_fused, ours, ctx, q, w)
    out_c, grads_c = _features_and_grads(compiled, ours, ctx, q, w)
    torch.testing.assert_close(out_c, out, rtol=1e-6, atol=1e-7)
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
def test_fused_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    p = CrossAttentionPooler(16, 16, n_head=2)
    with pytest.raises(RuntimeError, match="impl='fused'.*needs CUDA tensors"):
        cross_pool_fused(p, torch.randn(1, 4, 16), torch.randn(1, 2, 16))
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*TRITON_INTERPRET=1"):
        kc.cross_pool_attn_fwd(q, q, q)


def test_launchers_validate_inputs():
    q, k = torch.randn(2, 2, 3, 8), torch.randn(2, 2, 5, 8)
    with pytest.raises(ValueError, match="4-D"):
        kc.cross_pool_attn_fwd(q[0], k, k)
    with pytest.raises(ValueError, match="equal B, H, d"):
        kc.cross_pool_attn_fwd(q, torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4))
    with pytest.raises(ValueError, match="equal B, H, d"):
        kc.cross_pool_attn_fwd(q, k, torch.randn(2, 2, 6, 8))
    with pytest.raises(ValueError, match="one dtype"):
        kc.cross_pool_attn_fwd(q.double(), k.double(), k.double())
    with pytest.raises(ValueError, match="one dtype"):
        kc.cross_pool_attn_fwd(q, k.half(), k)
    with pytest.raises(ValueError, match=r"queries per sample must be in \[1, 128\]"):
        kc.cross_pool_attn_fwd(torch.randn(1, 1, 129, 8), torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8))
    with pytest.raises(ValueError, match="at least one key"):
        kc.cross_pool_attn_fwd(q, torch.randn(2, 2, 0, 8), torch.randn(2, 2, 0, 8))
    o, lse = torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3)
    with pytest.raises(ValueError, match="lse must be fp32"):
        kc.cross_pool_attn_bwd(o, q, k, k, o, lse.double())
    with pytest.raises(ValueError, match="do and o must have q's shape"):
        kc.cross_pool_attn_bwd(o[:, :, :2], q, k, k, o, lse)


def test_fused_validates_shapes():
    p = CrossAttentionPooler(16, 16, n_head=2).to(DEVICE)
    with pytest.raises(ValueError, match="context batch 2 != queries batch 3"):
        cross_pool_fused(p, torch.randn(2, 5, 16, device=DEVICE), torch.randn(3, 1, 16, device=DEVICE))
    with pytest.raises(ValueError, match="query width 8"):
        cross_pool_fused(p, torch.randn(2, 5, 16, device=DEVICE), torch.randn(2, 1, 8, device=DEVICE))


# ---------------------------------------------------------------------------------------------
# GPU only: bf16 equality (flash-attention's rule), production shapes, head dim 8, inductor
# ---------------------------------------------------------------------------------------------
GPU_CASES = [  # (B, L, n, D, heads)
    pytest.param(3, 196, 8, 512, 8, id="vitb16-image-L196-n8"),
    pytest.param(5, 77, 8, 512, 8, id="text-L77-n8-oddB"),
    pytest.param(4, 49, 8, 512, 8, id="vitb32-image-L49-n8"),
    pytest.param(3, 196, 1, 512, 8, id="image-L196-n1"),
    pytest.param(3, 77, 1, 512, 8, id="text-L77-n1"),
    pytest.param(5, 77, 8, 64, 8, id="headdim8-n8"),
    pytest.param(2, 49, 1, 64, 8, id="headdim8-n1"),
    pytest.param(2, 33, 20, 128, 2, id="n20-d64"),
]


def _max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def _absorbed(pooler, context, queries):
    return cross_pool(pooler, context, queries, impl="absorbed")


GPU_PATHS = [pytest.param(cross_pool_fused, id="fused"), pytest.param(_absorbed, id="absorbed")]


@needs_cuda
@pytest.mark.parametrize("path", GPU_PATHS)
@pytest.mark.parametrize("b,length,n,d,heads", GPU_CASES)
def test_gpu_fp32_equals_official(b, length, n, d, heads, path):
    ours, official = _make(d, heads, device="cuda")
    official = official.cuda()
    ctx, q, w = _inputs(b, length, n, d, device="cuda")
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        out, grads = _features_and_grads(path, ours, ctx, q, w)
        ref, ref_grads = _features_and_grads(official_features, official.double(), ctx.double(),
                                             q.double(), w.double())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    torch.testing.assert_close(out, ref.float(), rtol=1e-4, atol=1e-5)
    for name, g in grads.items():
        r = ref_grads[name].float()
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-4 * max(1.0, r.abs().max().item()), msg=name)


@needs_cuda
@pytest.mark.parametrize("path", GPU_PATHS)
@pytest.mark.parametrize("b,length,n,d,heads", GPU_CASES)
def test_gpu_bf16_error_within_twice_torch_bf16(b, length, n, d, heads, path):
    """Kernel error vs an fp32 reference ≤ 2× the error of the bf16 torch path (+ a small floor)."""
    ours, official = _make(d, heads, device="cuda")
    ours_bf16 = ours.to(torch.bfloat16)
    official_bf16 = OfficialStylePooler(d, heads).cuda().to(torch.bfloat16)
    official_bf16.load_state_dict(ours_bf16.state_dict(), strict=True)
    official_fp32 = OfficialStylePooler(d, heads).cuda()
    official_fp32.load_state_dict(ours_bf16.state_dict(), strict=True)     # the same bf16-rounded weights
    ctx, q, w = _inputs(b, length, n, d, dtype=torch.bfloat16, device="cuda")
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ref, ref_g = _features_and_grads(official_features, official_fp32, ctx.float(), q.float(), w)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    out, g = _features_and_grads(path, ours_bf16, ctx, q, w)
    base, base_g = _features_and_grads(official_features, official_bf16, ctx, q, w)
    assert out.dtype == torch.bfloat16
    for name, got, torch_path, want in [("features", out, base, ref)] + [
            (k, g[k], base_g[k], ref_g[k]) for k in ref_g]:
        err_k, err_t = _max_err(got, want), _max_err(torch_path, want)
        floor = 1e-3 * want.abs().max().item() + 1e-6
        print(f"{name:32s} fused err {err_k:.3e}   torch bf16 err {err_t:.3e}   floor {floor:.1e}")
        assert err_k <= 2 * err_t + floor, name


@needs_cuda
def test_gpu_inductor_compile_matches_eager():
    ours, _ = _make(512, 8, device="cuda", dtype=torch.bfloat16)
    ctx, q, w = _inputs(4, 196, 8, 512, dtype=torch.bfloat16, device="cuda")
    out, grads = _features_and_grads(cross_pool_fused, ours, ctx, q, w)
    out_c, grads_c = _features_and_grads(torch.compile(cross_pool_fused), ours, ctx, q, w)
    torch.testing.assert_close(out_c, out, rtol=2e-2, atol=2e-2)
    for name in grads:
        r = grads[name].float()
        torch.testing.assert_close(grads_c[name].float(), r, rtol=5e-2,
                                   atol=2e-2 * max(1.0, r.abs().max().item()), msg=name)
