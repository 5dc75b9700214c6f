"""torch.compile: the loss and the pooler trace without graph breaks (every CPU-runnable
implementation, the fused custom ops under the Triton interpreter), and compiled transformer blocks
(regional: one graph per token shape, shared by every layer) give the eager features and gradients.

On CPU the blocks compile with ``backend="aot_eager"`` — Dynamo and AOTAutograd, the tracing that
can break, without inductor's code generation (minutes on CPU); inductor runs in the GPU suite."""
import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

from utils import assert_close

from cosmos_fast import CosmosLoss, create_model
from cosmos_fast.model.pooler import CrossAttentionPooler
from cosmos_fast.ops.cross_pool import cross_pool
from cosmos_fast.ops.switch import triton_runnable

B, D = 4, 16
# two layers per tower: the compiled block is shared by both
SMALL_MODEL = {"embed_dim": 32,
               "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
               "text_cfg": {"context_length": 12, "vocab_size": 50, "width": 32, "heads": 4, "layers": 2}}
FUSED = pytest.param("fused", marks=pytest.mark.skipif(not triton_runnable(torch.device("cpu"))
                                                       and not torch.cuda.is_available(),
                                                       reason="needs triton (interpreter on CPU)"))



pytestmark = pytest.mark.usefixtures("one_thread")    # conftest.py


def _feats(n, g):
    return F.normalize(torch.randn(n * B, D, generator=g), dim=-1).requires_grad_()


@pytest.mark.parametrize("impl", ["blockwise", FUSED])
def test_loss_traces_without_graph_breaks(impl):
    g = torch.Generator().manual_seed(0)
    loss_fn = CosmosLoss(impl=impl)
    args = dict(s_image_features=_feats(3, g), s_text_features=_feats(3, g),
                logit_scale=torch.tensor(2.0, requires_grad=True), t_image_features=_feats(2, g).detach(),
                t_text_features=_feats(2, g).detach(), distill_logit_scale=torch.tensor(2.5, requires_grad=True),
                s_img_crossmodal_features=_feats(3, g), s_txt_crossmodal_features=_feats(3, g))

    def total(**a):
        out = loss_fn(**a, output_dict=True, batch_size=B)
        return out["clip_loss"] + out["distill_loss"]

    torch._dynamo.reset()
    explained = torch._dynamo.explain(total)(**args)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("impl", ["absorbed", "shared", FUSED])
def test_pooler_traces_without_graph_breaks(impl):
    g = torch.Generator().manual_seed(0)
    pool = CrossAttentionPooler(32, 32, n_head=4)
    ctx, queries = torch.randn(2, 7, 32, generator=g), torch.randn(2, 3, 32, generator=g)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda c, q: cross_pool(pool, c, q, impl=impl))(ctx, queries)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def _multicrop(model, crops, text):
    out = model(crops, text, batch_size=crops[0].shape[0])
    return torch.cat([out[k] for k in ("image_features", "text_features", "img_crossmodal_features",
                                       "txt_crossmodal_features")])


def _compare_compiled_blocks(backend, device, tol):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    b = 2
    crops = [torch.randn(b, 3, 32, 32, generator=g) for _ in range(2)]
    crops += [torch.randn(b, 3, 16, 16, generator=g) for _ in range(2)]
    text = torch.randint(1, 48, (4 * b, 12), generator=g)
    text[:, 7] = 49
    crops, text = [c.to(device) for c in crops], text.to(device)
    eager = create_model(SMALL_MODEL).to(device)
    compiled = create_model(SMALL_MODEL).to(device)
    compiled.load_state_dict(eager.state_dict())
    compiled.set_compiled_blocks(True, backend=backend)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    results = []
    for model in (eager, compiled):
        feats = _multicrop(model, crops, text)
        (feats * torch.linspace(-1, 1, feats.numel(), device=device).view_as(feats)).sum().backward()
        with torch.no_grad():
            teacher = model(torch.cat(crops[:2]), text[:2 * b])["image_features"]
        results.append((feats.detach(), teacher, {n: p.grad for n, p in model.named_parameters()}))
    (f_e, t_e, g_e), (f_c, t_c, g_c) = results
    assert_close(f_c, f_e, **tol)
    assert_close(t_c, t_e, **tol)
    assert {n for n, x in g_c.items() if x is None} == {n for n, x in g_e.items() if x is None} == {
        "logit_scale", "distill_logit_scale"}                             # not in these features
    for name, grad in g_e.items():
        if grad is not None:
            assert_close(g_c[name], grad, grad=not tol, msg=name, **tol)
    stats = torch._dynamo.utils.counters["stats"]
    # 32-px, 16-px crops and captions with grad, 32-px crops and captions without: 5 graphs serve the
    # 10 block calls (2 layers × 5 tower calls)
    assert stats["unique_graphs"] == 5, dict(stats)
    compiled.eval()                                  # eval() runs the blocks eagerly: nothing new compiles
    with torch.no_grad():
        compiled.encode_image(torch.randn(3, 3, 32, 32, device=device))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 5


def test_compiled_blocks_equal_eager_features_and_gradients():
    """Student multicrop forward (2 global + 2 local crops, 4 captions) and a teacher-style no-grad
    forward: the same features and every parameter gradient as eager (fp32); one graph per token
    shape and grad mode, shared by both layers of each tower."""
    _compare_compiled_blocks("aot_eager", "cpu", {})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor's GPU code generation needs CUDA")
def test_inductor_blocks_equal_eager_on_cuda():
    """The same with inductor's kernels (fused and reordered: fp32 within 1e-4)."""
    _compare_compiled_blocks("inductor", "cuda", {"rtol": 1e-4, "atol": 1e-5})
