"""The cross_pool op over all its implementations (absorbed, shared, fused, reference) against the
official formulation: nn.MultiheadAttention on the context repeated once per query, then residual
add and L2 normalisation (cosmos_fast.reference.cross_pool). Also the pooler module, the switch,
the fused LayerNorm + attention-pooling kernel alone, its torch.library registration and the
ZeRO-3 contract (weights read inside their module's forward).

On machines without CUDA the kernels run under TRITON_INTERPRET=1 (set by conftest.py before any
kernel module is imported) in fp32 with small widths (and a bf16/fp16 context for the kernel
alone). bf16/fp16 equality at the production shapes (D = 512, 8 heads, n = 8 / 1, L = 196 / 77 / 49)
and head dim 8 on a real GPU are CUDA-only tests.
"""
import functools
import math
import os

import pytest
import torch
import torch.nn.functional as F

from utils import assert_close, assert_within_twice_torch_error, max_err

from cosmos_fast.kernels import cross_pool as kc
from cosmos_fast.model.pooler import CrossAttentionPooler
from cosmos_fast.ops.cross_pool import cross_pool, resolve_cross_pool_impl
from cosmos_fast.reference.cross_pool import OfficialPooler, cross_pool_reference, official_features, pool_repeat

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"          # the kernels run natively on CUDA, interpreted on CPU
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
needs_kernels = pytest.mark.skipif(not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
                                   reason="needs CUDA or TRITON_INTERPRET=1")
TORCH_IMPLS = ["absorbed", "shared", "reference"]
ALL_IMPLS = TORCH_IMPLS + [pytest.param("fused", marks=needs_kernels)]


def _randomise(module):
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            is_ln_gain = name.startswith("ln_") and name.endswith("weight")
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if is_ln_gain else 0.0))


def _make(d, heads, dtype=torch.float32, device="cpu"):
    """Our pooler with random weights and the official module holding the same weights."""
    ours = CrossAttentionPooler(d, d, n_head=heads)
    _randomise(ours)
    official = OfficialPooler(d, heads)
    official.load_state_dict(ours.state_dict(), strict=True)     # same keys as the official module
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


def _op(impl):
    return functools.partial(cross_pool, impl=impl)


# ---------------------------------------------------------------------------------------------
# Every implementation against the official formulation
# ---------------------------------------------------------------------------------------------
FP64_CASES = [  # (B, L, n, D, heads)
    pytest.param(3, 77, 8, 64, 8, id="text-L77-n8"),
    pytest.param(5, 49, 8, 64, 8, id="image-L49-n8-oddB"),
    pytest.param(2, 196, 1, 32, 8, id="image-L196-n1"),
    pytest.param(1, 9, 3, 16, 2, id="tiny"),
]


@pytest.mark.parametrize("b,length,n,d,heads", FP64_CASES)
@pytest.mark.parametrize("impl", TORCH_IMPLS)
def test_equals_official_fp64(b, length, n, d, heads, impl):
    """The PyTorch implementations (the kernel takes no fp64) in fp64: features and every gradient."""
    ours, official = _make(d, heads, dtype=torch.float64)
    ctx, q, w = _inputs(b, length, n, d, dtype=torch.float64)
    out, grads = _features_and_grads(_op(impl), ours, ctx, q, w)
    ref, ref_grads = _features_and_grads(official_features, official.double(), ctx, q, w)
    assert_close(out, ref)
    assert set(grads) == set(ref_grads) and len(grads) == 2 + 8   # ctx, q + every pooler parameter
    for name, g in grads.items():
        assert_close(g, ref_grads[name], grad=True, msg=name)


FP32_CASES = [  # (B, L, n, D, heads): interpreter-sized
    pytest.param(3, 77, 8, 64, 8, id="text-L77-n8-d8"),
    pytest.param(5, 49, 8, 32, 4, id="image-L49-n8-oddB"),
    pytest.param(2, 196, 1, 32, 2, id="image-L196-n1"),
    pytest.param(3, 77, 1, 64, 8, id="text-L77-n1-oddB"),
    pytest.param(1, 9, 3, 16, 2, id="tiny"),
    pytest.param(2, 30, 20, 64, 2, id="n20-d32"),
]


@pytest.mark.parametrize("b,length,n,d,heads", FP32_CASES)
@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_equals_official_fp32(b, length, n, d, heads, impl):
    """Every implementation in fp32 (the fused one on CUDA, or interpreted) against the official
    formulation in fp64."""
    device = DEVICE if impl == "fused" else "cpu"
    ours, official = _make(d, heads, device=device)
    official = official.to(device)
    ctx, q, w = _inputs(b, length, n, d, device=device)
    out, grads = _features_and_grads(_op(impl), ours, ctx, q, w)
    ref, ref_grads = _features_and_grads(official_features, official.double(), ctx.double(), q.double(),
                                         w.double())
    assert out.shape == (b, n, d) and out.dtype == torch.float32
    assert_close(out, ref.float())
    assert set(grads) == set(ref_grads) and len(grads) == 2 + 8
    for name, g in grads.items():
        r = ref_grads[name].float()
        assert g is not None and g.dtype == torch.float32, name
        assert_close(g, r, grad=True, atol=1e-5 * max(1.0, r.abs().max().item()), msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_official_module_and_reference_impl_agree(dtype):
    """The two spellings of the official formulation in reference/cross_pool.py: the
    nn.MultiheadAttention module (OfficialPooler) and the op's "reference" implementation on a
    CrossAttentionPooler's weights."""
    ours, official = _make(32, 4, dtype=dtype)
    official = official.to(dtype)
    ctx, q, w = _inputs(3, 20, 5, 32, dtype=dtype)
    out, grads = _features_and_grads(cross_pool_reference, ours, ctx, q, w)
    ref, ref_grads = _features_and_grads(official_features, official, ctx, q, w)
    assert_close(out, ref)
    for name, g in grads.items():
        assert_close(g, ref_grads[name], grad=True, msg=name)


def test_pool_output_is_pre_residual_and_fp32_equal():
    pooler = CrossAttentionPooler(64, 64)
    _randomise(pooler)
    ctx, q = torch.randn(4, 20, 64), torch.randn(4, 8, 64)
    out = pooler(ctx, q)
    assert_close(out, pool_repeat(pooler, ctx, q), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(F.normalize(out, dim=-1), cross_pool(pooler, ctx, q))


def test_absorbed_production_width_fp32_and_key_bias_gradient():
    """D = 512, 8 heads, n = 8 in fp32 against the repeat formulation; b_k has an exactly zero gradient
    (the softmax is invariant to it), which the reference reproduces up to rounding."""
    pooler = CrossAttentionPooler(512, 512, n_head=8)
    _randomise(pooler)
    torch.manual_seed(3)
    ctx = torch.randn(3, 49, 512, requires_grad=True)
    q = torch.randn(3, 8, 512, requires_grad=True)
    w = torch.randn(3, 8, 512)
    params = list(pooler.parameters())
    got = cross_pool(pooler, ctx, q, impl="absorbed")
    g_got = torch.autograd.grad((got * w).sum(), [ctx, q] + params)
    want = cross_pool(pooler, ctx, q, impl="reference")
    g_want = torch.autograd.grad((want * w).sum(), [ctx, q] + params)
    assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(["context", "queries"] + [n for n, _ in pooler.named_parameters()], g_got, g_want):
        assert_close(a, b, rtol=1e-4, atol=2e-5 * b.abs().max().item(), msg=name)
    bias_grad = g_got[2 + [n for n, _ in pooler.named_parameters()].index("attn.in_proj_bias")]
    assert torch.count_nonzero(bias_grad[512:1024]) == 0 and torch.count_nonzero(bias_grad[:512]) > 0


@pytest.mark.parametrize("impl", ["absorbed", pytest.param("fused", marks=needs_kernels)])
def test_cpu_autocast_bf16_within_twice_shared_error(impl):
    """Under autocast the projections give bf16 q/k/v: absorbed and fused stay within 2× the error of
    the shared-K/V PyTorch path, against the fp32 shared path."""
    device = DEVICE if impl == "fused" else "cpu"
    ours, _ = _make(64, 4, device=device)
    ctx, q, _ = _inputs(4, 30, 8, 64, device=device)
    ref = cross_pool(ours, ctx, q, impl="shared")                            # fp32
    with torch.autocast(device, dtype=torch.bfloat16):
        got = cross_pool(ours, ctx, q, impl=impl)
        shared = cross_pool(ours, ctx, q, impl="shared")
    assert got.dtype == shared.dtype == torch.float32
    assert max_err(got, ref) < 5e-2
    assert_within_twice_torch_error(got, shared, ref, f"autocast bf16 {impl}")


# ---------------------------------------------------------------------------------------------
# The pooler module and the switch
# ---------------------------------------------------------------------------------------------
def test_pooler_rejects_other_context_width_and_bad_shapes():
    with pytest.raises(ValueError, match="context_dim=32, d_model=64"):
        CrossAttentionPooler(64, 32)
    p = CrossAttentionPooler(16, 16, n_head=2)
    with pytest.raises(ValueError, match="context batch 2 != queries batch 3"):
        p(torch.randn(2, 5, 16), torch.randn(3, 1, 16))
    with pytest.raises(ValueError, match="query width 8"):
        p(torch.randn(2, 5, 16), torch.randn(2, 1, 8))
    with pytest.raises(ValueError, match="CrossAttention runs impl.*got 'reference'"):
        p(torch.randn(2, 5, 16), torch.randn(2, 1, 16), impl="reference")


@pytest.mark.parametrize("impl", ["shared", "absorbed", pytest.param("fused", marks=needs_kernels)])
def test_every_impl_validates_shapes(impl):
    p = CrossAttentionPooler(16, 16, n_head=2).to(DEVICE)
    with pytest.raises(ValueError, match="context batch 2 != queries batch 3"):
        cross_pool(p, torch.randn(2, 5, 16, device=DEVICE), torch.randn(3, 1, 16, device=DEVICE), impl=impl)
    with pytest.raises(ValueError, match="query width 8"):
        cross_pool(p, torch.randn(2, 5, 16, device=DEVICE), torch.randn(2, 1, 8, device=DEVICE), impl=impl)


def test_pooler_keys_and_init_order():
    """The official state-dict keys in the official order, and nn.MultiheadAttention's initialisation
    drawn in the order of the official module (in-projection, out-projection)."""
    torch.manual_seed(0)
    ours = CrossAttentionPooler(32, 32, n_head=4)
    torch.manual_seed(0)
    official = OfficialPooler(32, 4)
    assert list(ours.state_dict()) == list(official.state_dict())
    for (name, a), b in zip(ours.state_dict().items(), official.state_dict().values()):
        assert torch.equal(a, b), name


def test_unknown_impl_is_rejected():
    p = CrossAttentionPooler(16, 16, n_head=2)
    with pytest.raises(ValueError, match="unknown cross_pool implementation 'fast'"):
        cross_pool(p, torch.randn(1, 2, 16), torch.randn(1, 1, 16), impl="fast")


def test_auto_picks_absorbed_when_it_saves_flops(monkeypatch):
    monkeypatch.delenv("COSMOS_FAST_IMPL", raising=False)
    cpu = torch.device("cpu")
    assert resolve_cross_pool_impl("auto", cpu, (8, 8, 512)) == "absorbed"      # COSMOS: n·H = 64 < 512
    assert resolve_cross_pool_impl("auto", cpu, (8, 4, 32)) == "shared"         # n·H ≥ D: K/V is cheaper
    assert resolve_cross_pool_impl("absorbed", cpu, (8, 4, 32)) == "absorbed"
    assert resolve_cross_pool_impl("auto", torch.device("cuda", 0), (8, 8, 512)) == "shared"  # measured fastest
    monkeypatch.setenv("COSMOS_FAST_IMPL", "reference")
    assert resolve_cross_pool_impl("auto", cpu, (8, 8, 512)) == "reference"
    assert resolve_cross_pool_impl("shared", cpu, (8, 8, 512)) == "shared"      # only "auto" is overridden


# ---------------------------------------------------------------------------------------------
# The fused LayerNorm + attention-pooling kernel alone
# ---------------------------------------------------------------------------------------------
def _ln_pool_reference(x, q, do, eps=1e-5):
    """softmax(q·x̂ᵀ)·x̂ in fp64 with x̂ the context normalised without affine; o and the gradients."""
    x64, q64 = (t.detach().double().requires_grad_() for t in (x, q))
    xh = F.layer_norm(x64, x64.shape[-1:], eps=eps)
    s = q64 @ xh.transpose(1, 2)
    o = torch.softmax(s, -1) @ xh
    o.backward(do.double())
    return o.detach(), torch.logsumexp(s, -1).detach(), x64.grad, q64.grad


KERNEL_CASES = [  # (B, L, M, D)
    pytest.param(3, 49, 32, 32, id="L49-M32-oddB"),
    pytest.param(2, 77, 8, 64, id="L77-M8"),
    pytest.param(1, 196, 40, 48, id="L196-M40-D48"),
    pytest.param(2, 5, 3, 20, id="tiny"),
]


@needs_kernels
@pytest.mark.parametrize("b,length,m,d", KERNEL_CASES)
def test_kernel_matches_layernorm_softmax_pooling(b, length, m, d):
    """o, lse, the rows' LayerNorm statistics, dx and dq against fp64, on strided context rows."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(b, d, length, generator=g) * 2 + 0.5).to(DEVICE).transpose(1, 2)   # strided rows
    q = (torch.randn(b, m, d, generator=g) * 0.5).to(DEVICE)
    do = torch.randn(b, m, d, generator=g).to(DEVICE)
    ref, ref_lse, ref_dx, ref_dq = _ln_pool_reference(x, q, do)

    o, lse, mean, rstd = kc.ln_attention_pool_fwd(x, q)
    dx, dq = kc.ln_attention_pool_bwd(do, x, q, o, lse, mean, rstd)
    assert o.shape == dq.shape == q.shape and dx.shape == x.shape and o.dtype == dx.dtype == torch.float32
    assert_close(lse.double() / math.log2(math.e), ref_lse, rtol=2e-6, atol=2e-6, msg="lse (base 2)")
    assert_close(mean.double(), x.double().mean(-1), rtol=1e-6, atol=1e-6, msg="mean")
    assert_close(rstd.double(), x.double().var(-1, unbiased=False).add(1e-5).rsqrt(), rtol=1e-5, msg="rstd")
    for name, got, want in (("o", o, ref), ("dx", dx, ref_dx), ("dq", dq, ref_dq)):
        assert_close(got.double(), want, rtol=2e-5, atol=2e-6 * max(1.0, want.abs().max().item()), msg=name)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_kernel_low_precision_context_within_twice_torch_error(dtype):
    """A bf16/fp16 context (fp32 queries, as the pooler passes them): o, dx and dq within 2× the
    error of the same formula in torch on the same low-precision context, against fp64."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 49, 64, generator=g).to(DEVICE, dtype)
    q = torch.randn(3, 16, 64, generator=g).to(DEVICE) * 0.3
    do = torch.randn(3, 16, 64, generator=g).to(DEVICE)
    want = _ln_pool_reference(x, q, do)
    xt, qt = x.detach().clone().requires_grad_(), q.detach().clone().requires_grad_()
    xh = F.layer_norm(xt, xt.shape[-1:])                                  # torch in the context's dtype
    base = torch.softmax(qt.to(dtype) @ xh.transpose(1, 2), -1) @ xh
    base.backward(do.to(dtype))
    xk, qk = x.detach().clone().requires_grad_(), q.detach().clone().requires_grad_()
    got = kc.ln_attention_pool(xk, qk)
    got.backward(do)
    assert xk.grad.dtype == dtype and qk.grad.dtype == torch.float32
    for name, g_, b_, w_ in (("o", got, base, want[0]), ("dx", xk.grad, xt.grad, want[2]),
                             ("dq", qk.grad, qt.grad, want[3])):
        assert_within_twice_torch_error(g_.double(), b_.double(), w_, f"{dtype} {name}")


# ---------------------------------------------------------------------------------------------
# torch.library registration, torch.compile, ZeRO-3's contract
# ---------------------------------------------------------------------------------------------
@needs_kernels
def test_opcheck_fwd_and_bwd_ops():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 7, generator=g).to(DEVICE).transpose(1, 2).requires_grad_()   # strided
    q = torch.randn(2, 5, 16, generator=g).to(DEVICE).requires_grad_()
    res = torch.library.opcheck(torch.ops.cosmos_fast.ln_attention_pool_fwd.default, (x, q, 1e-5))
    assert set(res.values()) == {"SUCCESS"}, res
    o, lse, mean, rstd = kc.ln_attention_pool_fwd(x.detach(), q.detach())
    do = torch.randn(o.shape, generator=g).to(DEVICE)
    res = torch.library.opcheck(torch.ops.cosmos_fast.ln_attention_pool_bwd.default,
                                (do, x.detach(), q.detach(), o, lse, mean, rstd))
    assert set(res.values()) == {"SUCCESS"}, res


def test_fake_impl_gives_production_shapes():
    """Shapes and dtypes of both ops under FakeTensorMode at the ViT-B/16 image pooler size."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    b, length, m, d = 64, 196, 64, 512
    with FakeTensorMode():
        x = torch.empty(b, length, d, dtype=torch.bfloat16)
        q = torch.empty(b, m, d, dtype=torch.float32)
        o, lse, mean, rstd = torch.ops.cosmos_fast.ln_attention_pool_fwd(x, q, 1e-5)
        dx, dq = torch.ops.cosmos_fast.ln_attention_pool_bwd(o, x, q, o, lse, mean, rstd)
    assert o.shape == dq.shape == (b, m, d) and o.dtype == dq.dtype == torch.float32
    assert lse.shape == (b, m) and mean.shape == rstd.shape == (b, length)
    assert lse.dtype == mean.dtype == rstd.dtype == torch.float32
    assert dx.shape == (b, length, d) and dx.dtype == torch.bfloat16


@needs_kernels
def test_torch_compile_traces_fused_pooler():
    """No graph break through the op (dynamo's explain, and fullgraph=True), and the compiled
    features and gradients equal eager."""
    ours, _ = _make(32, 4, device=DEVICE)
    ctx, q, w = _inputs(3, 11, 8, 32, device=DEVICE)
    explanation = torch._dynamo.explain(_op("fused"))(ours, ctx, q)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    assert "ln_attention_pool_fwd" in str(explanation.graphs[0].graph)
    compiled = torch.compile(_op("fused"), backend="aot_eager", fullgraph=True)
    out, grads = _features_and_grads(_op("fused"), ours, ctx, q, w)
    out_c, grads_c = _features_and_grads(compiled, ours, ctx, q, w)
    assert_close(out_c, out, rtol=1e-6, atol=1e-7)
    for name in grads:
        assert_close(grads_c[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("impl", ["shared", "absorbed", pytest.param("fused", marks=needs_kernels)])
def test_weights_are_read_inside_their_modules_forward(impl):
    """ZeRO-3's contract, simulated: every module's own parameters hold data only while its forward
    runs (DeepSpeed gathers them in a pre-forward hook and frees them after); the features still
    equal those of the unpartitioned pooler."""
    device = DEVICE if impl == "fused" else "cpu"
    pooler, _ = _make(32, 4, device=device)
    ctx, q, _ = _inputs(3, 13, 4, 32, device=device)
    with torch.no_grad():
        want = cross_pool(pooler, ctx, q, impl=impl)
        full = {p: p.data for p in pooler.parameters()}

        def release(module, *_):
            for p in module.parameters(recurse=False):
                p.data = torch.empty(0, device=device)

        def gather(module, *_):
            for p in module.parameters(recurse=False):
                p.data = full[p]

        for module in pooler.modules():
            module.register_forward_pre_hook(gather)
            module.register_forward_hook(release)
            release(module)
        got = cross_pool(pooler, ctx, q, impl=impl)
    assert all(p.numel() == 0 for p in pooler.parameters())
    assert_close(got, want, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
def test_fused_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    p = CrossAttentionPooler(16, 16, n_head=2)
    with pytest.raises(RuntimeError, match="impl='fused'.*needs CUDA tensors"):
        cross_pool(p, torch.randn(1, 4, 16), torch.randn(1, 2, 16), impl="fused")
    x = torch.randn(1, 3, 8)
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*TRITON_INTERPRET=1"):
        kc.ln_attention_pool_fwd(x, x)


def test_launchers_validate_inputs():
    x, q = torch.randn(2, 5, 8), torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"context must be \(B, L, D\)"):
        kc.ln_attention_pool_fwd(x[0], q)
    with pytest.raises(ValueError, match=r"queries must be \(B, M, D\) = \(2, M, 8\)"):
        kc.ln_attention_pool_fwd(x, torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"queries must be \(B, M, D\)"):
        kc.ln_attention_pool_fwd(x, torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match="must be among"):
        kc.ln_attention_pool_fwd(x.double(), q)
    with pytest.raises(ValueError, match=r"width D must be in \[1, 512\]"):
        kc.ln_attention_pool_fwd(torch.randn(1, 2, 513), torch.randn(1, 1, 513))
    with pytest.raises(ValueError, match="at least one row"):
        kc.ln_attention_pool_fwd(torch.randn(2, 0, 8), q)
    with pytest.raises(ValueError, match="at least one query"):
        kc.ln_attention_pool_fwd(x, torch.randn(2, 0, 8))
    lse, stats = torch.randn(2, 3), torch.randn(2, 5)
    with pytest.raises(ValueError, match="lse must be fp32 of shape"):
        kc.ln_attention_pool_bwd(q, x, q, q, lse.double(), stats, stats)
    with pytest.raises(ValueError, match="rstd must be fp32 of shape"):
        kc.ln_attention_pool_bwd(q, x, q, q, lse, stats, stats[:, :4])
    with pytest.raises(ValueError, match="do and o must have the queries' shape"):
        kc.ln_attention_pool_bwd(q[:, :2], x, q, q, lse, stats, stats)
    with pytest.raises(ValueError, match="takes the raw context and the pooler's ln_k"):
        CrossAttentionPooler(16, 16, n_head=2).attn(torch.randn(1, 2, 16), torch.randn(1, 4, 16), impl="fused")
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
GPU_IMPLS = ["fused", "absorbed"]


@needs_cuda
@pytest.mark.parametrize("impl", GPU_IMPLS)
@pytest.mark.parametrize("b,length,n,d,heads", GPU_CASES)
def test_gpu_fp32_equals_official(b, length, n, d, heads, impl):
    ours, official = _make(d, heads, device="cuda")
    official = official.cuda()
    ctx, q, w = _inputs(b, length, n, d, device="cuda")
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        out, grads = _features_and_grads(_op(impl), ours, ctx, q, w)
        ref, ref_grads = _features_and_grads(official_features, official.double(), ctx.double(),
                                             q.double(), w.double())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    assert_close(out, ref.float(), rtol=1e-4, atol=1e-5)
    for name, g in grads.items():
        r = ref_grads[name].float()
        assert_close(g, r, rtol=1e-3, atol=1e-4 * max(1.0, r.abs().max().item()), msg=name)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("impl", GPU_IMPLS)
@pytest.mark.parametrize("b,length,n,d,heads", GPU_CASES)
def test_gpu_low_precision_error_within_twice_torch(b, length, n, d, heads, impl, dtype):
    """Error vs an fp32 reference ≤ 2× the error of the same-precision torch path (tests/utils.py's
    rule), for the features and every gradient."""
    ours, official = _make(d, heads, device="cuda")
    ours_bf16 = ours.to(dtype)
    official_bf16 = OfficialPooler(d, heads).cuda().to(dtype)
    official_bf16.load_state_dict(ours_bf16.state_dict(), strict=True)
    official_fp32 = OfficialPooler(d, heads).cuda()
    official_fp32.load_state_dict(ours_bf16.state_dict(), strict=True)     # the same rounded weights
    ctx, q, w = _inputs(b, length, n, d, dtype=dtype, device="cuda")
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ref, ref_g = _features_and_grads(official_features, official_fp32, ctx.float(), q.float(), w)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    out, g = _features_and_grads(_op(impl), ours_bf16, ctx, q, w)
    base, base_g = _features_and_grads(official_features, official_bf16, ctx, q, w)
    assert out.dtype == dtype
    for name, got, torch_path, want in [("features", out, base, ref)] + [
            (k, g[k], base_g[k], ref_g[k]) for k in ref_g]:
        assert_within_twice_torch_error(got, torch_path, want, f"{impl} {name}")


@needs_cuda
def test_gpu_inductor_compile_matches_eager():
    ours, _ = _make(512, 8, device="cuda", dtype=torch.bfloat16)
    ctx, q, w = _inputs(4, 196, 8, 512, dtype=torch.bfloat16, device="cuda")
    out, grads = _features_and_grads(_op("fused"), ours, ctx, q, w)
    out_c, grads_c = _features_and_grads(torch.compile(_op("fused")), ours, ctx, q, w)
    assert_close(out_c, out, rtol=2e-2, atol=2e-2)
    for name in grads:
        r = grads[name].float()
        assert_close(grads_c[name].float(), r, rtol=5e-2, atol=2e-2 * max(1.0, r.abs().max().item()), msg=name)
