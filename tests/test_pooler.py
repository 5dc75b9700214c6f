"""The shared-context pooler against the official formulation: nn.MultiheadAttention on the
context repeated once per query, then residual add and L2 normalisation."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cosmos_fast.model.pooler import CrossAttentionPooler
from cosmos_fast.ops import cross_pool
from cosmos_fast.reference.cross_pool import pool_repeat


class OfficialStylePooler(nn.Module):
    """LN_q / LN_k + nn.MultiheadAttention with the same state-dict keys as the official module."""

    def __init__(self, d, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln_q = nn.LayerNorm(d)
        self.ln_k = nn.LayerNorm(d)

    def forward(self, context_repeated, query):          # (nB, L, D), (nB, 1, D)
        c = self.ln_k(context_repeated)
        return self.attn(self.ln_q(query), c, c, need_weights=False)[0]


def official_features(pooler, context, queries):
    b, n, d = queries.shape
    ctx = context.repeat(n, 1, 1)                         # query-major tiling, as in the official code
    q = queries.transpose(0, 1).reshape(n * b, 1, d)
    pooled = pooler(ctx, q).squeeze(1)
    return F.normalize(q.squeeze(1) + pooled, dim=-1).view(n, b, d).transpose(0, 1)


CASES = [  # (B, L, n, D, heads)
    pytest.param(3, 77, 8, 64, 8, id="text-L77-n8"),
    pytest.param(5, 49, 8, 64, 8, id="image-L49-n8-oddB"),
    pytest.param(2, 196, 1, 32, 8, id="image-L196-n1"),
    pytest.param(1, 9, 3, 16, 2, id="tiny"),
]


def _randomise(module):
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            is_ln_gain = name.startswith("ln_") and name.endswith("weight")
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if is_ln_gain else 0.0))


@pytest.mark.parametrize("b,length,n,d,heads", CASES)
@pytest.mark.parametrize("impl", ["absorbed", "shared", "reference"])
def test_pooler_equals_repeat_formulation(b, length, n, d, heads, impl):
    ours = CrossAttentionPooler(d, d, n_head=heads).double()
    _randomise(ours)
    official = OfficialStylePooler(d, heads).double()
    official.load_state_dict(ours.state_dict(), strict=True)     # same keys as the official module
    torch.manual_seed(2)
    ctx = torch.randn(b, length, d, dtype=torch.float64, requires_grad=True)
    q = torch.randn(b, n, d, dtype=torch.float64, requires_grad=True)
    ctx2, q2 = ctx.detach().clone().requires_grad_(), q.detach().clone().requires_grad_()
    a = cross_pool(ours, ctx, q, impl=impl)
    r = official_features(official, ctx2, q2)
    torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
    w = torch.randn_like(a)
    (a * w).sum().backward()
    (r * w).sum().backward()
    torch.testing.assert_close(ctx.grad, ctx2.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(q.grad, q2.grad, rtol=1e-9, atol=1e-12)
    theirs = dict(official.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-9, atol=1e-12, msg=name)


def test_pool_output_is_pre_residual_and_fp32_equal():
    pooler = CrossAttentionPooler(64, 64)
    _randomise(pooler)
    ctx, q = torch.randn(4, 20, 64), torch.randn(4, 8, 64)
    out = pooler(ctx, q)
    torch.testing.assert_close(out, pool_repeat(pooler, ctx, q), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(F.normalize(out, dim=-1), cross_pool(pooler, ctx, q))


def test_pooler_rejects_other_context_width_and_bad_shapes():
    with pytest.raises(ValueError, match="context_dim=32, d_model=64"):
        CrossAttentionPooler(64, 32)
    p = CrossAttentionPooler(16, 16, n_head=2)
    with pytest.raises(ValueError, match="context batch 2 != queries batch 3"):
        p(torch.randn(2, 5, 16), torch.randn(3, 1, 16))
    with pytest.raises(ValueError, match="query width 8"):
        p(torch.randn(2, 5, 16), torch.randn(2, 1, 8))


def test_unknown_impl_is_rejected():
    p = CrossAttentionPooler(16, 16, n_head=2)
    with pytest.raises(ValueError, match="unknown cross_pool implementation 'fast'"):
        cross_pool(p, torch.randn(1, 2, 16), torch.randn(1, 1, 16), impl="fast")


def test_auto_picks_absorbed_when_it_saves_flops():
    from cosmos_fast.ops import resolve_cross_pool_impl
    cpu = torch.device("cpu")
    assert resolve_cross_pool_impl("auto", cpu, (8, 8, 512)) == "absorbed"      # COSMOS: n·H = 64 < 512
    assert resolve_cross_pool_impl("auto", cpu, (8, 4, 32)) == "shared"         # n·H ≥ D: K/V is cheaper
    assert resolve_cross_pool_impl("absorbed", cpu, (8, 4, 32)) == "absorbed"
    assert resolve_cross_pool_impl("auto", torch.device("cuda", 0), (8, 8, 512)) == "shared"  # measured fastest


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
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(["context", "queries"] + [n for n, _ in pooler.named_parameters()], g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5 * b.abs().max().item(), msg=name)
    bias_grad = g_got[2 + [n for n, _ in pooler.named_parameters()].index("attn.in_proj_bias")]
    assert torch.count_nonzero(bias_grad[512:1024]) == 0 and torch.count_nonzero(bias_grad[:512]) > 0


def test_absorbed_under_cpu_autocast_close_to_fp32():
    pooler = CrossAttentionPooler(64, 64, n_head=4)
    _randomise(pooler)
    ctx, q = torch.randn(4, 30, 64), torch.randn(4, 8, 64)
    ref = cross_pool(pooler, ctx, q, impl="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cross_pool(pooler, ctx, q, impl="absorbed")
        shared = cross_pool(pooler, ctx, q, impl="shared")
    err, err_shared = (got.float() - ref).abs().max().item(), (shared.float() - ref).abs().max().item()
    assert err < 5e-2 and err <= 2 * err_shared + 1e-3
