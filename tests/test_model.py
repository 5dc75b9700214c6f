"""The COSMOS CLIP: key layout, open_clip tower equality, contract of both forward paths, errors."""
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from utils import assert_close

from cosmos_fast import create_model
from cosmos_fast.model.attention import attention, attention_backend, available_backends, resolve_backend
from cosmos_fast.model.config import resolve_model_config

SMALL = {"embed_dim": 32,
         "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
         "text_cfg": {"context_length": 12, "vocab_size": 50, "width": 32, "heads": 4, "layers": 2}}


def expected_keys(patch: int, grid: int) -> dict:
    """§1.10 of the spec, written out independently of the model code."""
    keys = {"positional_embedding": (77, 512), "text_projection": (512, 512), "logit_scale": (),
            "distill_logit_scale": (), "visual.class_embedding": (768,),
            "visual.positional_embedding": (grid * grid + 1, 768), "visual.proj": (768, 512),
            "visual.conv1.weight": (768, 3, patch, patch), "visual.ln_pre.weight": (768,),
            "visual.ln_pre.bias": (768,)}

    def block(prefix, w, h):
        return {f"{prefix}.ln_1.weight": (w,), f"{prefix}.ln_1.bias": (w,),
                f"{prefix}.attn.in_proj_weight": (3 * w, w), f"{prefix}.attn.in_proj_bias": (3 * w,),
                f"{prefix}.attn.out_proj.weight": (w, w), f"{prefix}.attn.out_proj.bias": (w,),
                f"{prefix}.ln_2.weight": (w,), f"{prefix}.ln_2.bias": (w,),
                f"{prefix}.mlp.c_fc.weight": (h, w), f"{prefix}.mlp.c_fc.bias": (h,),
                f"{prefix}.mlp.c_proj.weight": (w, h), f"{prefix}.mlp.c_proj.bias": (w,)}

    def pooler(prefix):
        return {f"{prefix}.attn.in_proj_weight": (1536, 512), f"{prefix}.attn.in_proj_bias": (1536,),
                f"{prefix}.attn.out_proj.weight": (512, 512), f"{prefix}.attn.out_proj.bias": (512,),
                f"{prefix}.ln_q.weight": (512,), f"{prefix}.ln_q.bias": (512,),
                f"{prefix}.ln_k.weight": (512,), f"{prefix}.ln_k.bias": (512,)}

    for i in range(12):
        keys.update(block(f"visual.transformer.resblocks.{i}", 768, 3072))
    keys.update(pooler("visual.attn_cross_pool"))
    keys.update({"visual.ln_post.weight": (768,), "visual.ln_post.bias": (768,)})
    for i in range(12):
        keys.update(block(f"transformer.resblocks.{i}", 512, 2048))
    keys.update({"token_embedding.weight": (49408, 512), "ln_final.weight": (512,), "ln_final.bias": (512,)})
    keys.update(pooler("text_attn_cross_pool"))
    keys.update({"image_token_mapping.weight": (512, 768), "image_token_mapping.bias": (512,),
                 "text_token_mapping.weight": (512, 512), "text_token_mapping.bias": (512,)})
    return keys


@pytest.mark.parametrize("name,patch,grid,values", [("ViT-B-16", 16, 14, 152_382_466),
                                                    ("ViT-B-32", 32, 7, 154_039_042)])
def test_full_size_key_set_and_counts(name, patch, grid, values):
    model = create_model(name, device="meta")
    sd = model.state_dict()
    exp = expected_keys(patch, grid)
    assert len(sd) == 323
    assert list(sd) == list(exp)
    assert {k: tuple(v.shape) for k, v in sd.items()} == exp
    assert sum(v.numel() for v in sd.values()) == values
    # upstream open_clip's CLIP holds exactly our keys minus the COSMOS extras
    upstream = open_clip.create_model(name, pretrained=None, device="meta").state_dict()
    extras = {k for k in sd if k.startswith(("visual.attn_cross_pool", "text_attn_cross_pool",
                                             "image_token_mapping", "text_token_mapping"))}
    extras.add("distill_logit_scale")
    assert set(upstream) == set(sd) - extras


def _open_clip_pair(cfg):
    torch.manual_seed(0)
    ours = create_model(cfg).eval()
    theirs = open_clip.model.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=dict(cfg["vision_cfg"]),
                                  text_cfg=dict(cfg["text_cfg"])).eval()
    sd = {k: v for k, v in ours.state_dict().items() if k in theirs.state_dict()}
    theirs.load_state_dict(sd, strict=True)
    return ours, theirs


@torch.no_grad()
def assert_towers_equal(ours, theirs, images, text, rtol=None, atol=None):
    assert_close(ours.encode_image(images), theirs.encode_image(images, normalize=True), rtol=rtol, atol=atol)
    assert_close(ours.encode_text(text), theirs.encode_text(text, normalize=True), rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_towers_equal_open_clip(backend):
    ours, theirs = _open_clip_pair(SMALL)
    torch.manual_seed(1)
    images = torch.randn(3, 3, 32, 32)
    text = torch.randint(1, 48, (3, 12))
    text[:, -1] = 49          # EOT (largest id) somewhere
    text[0, 5] = 49
    with attention_backend(backend):
        assert_towers_equal(ours, theirs, images, text)


def test_vit_b32_towers_equal_open_clip_at_224():
    torch.manual_seed(0)
    ours = create_model("ViT-B-32").eval()
    theirs = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    theirs.load_state_dict({k: v for k, v in ours.state_dict().items() if k in theirs.state_dict()})
    images = torch.randn(1, 3, 224, 224)
    text = open_clip.get_tokenizer("ViT-B-32")(["a photo of a red square next to a blue circle"])
    assert_towers_equal(ours, theirs, images, text, rtol=1e-4, atol=1e-5)


def test_attention_switch_sdpa_equals_math():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, requires_grad=True) for n in (5, 7, 7))
    for causal in (False, True):
        qq, kk, vv = (q, k[:, :, :5], v[:, :, :5]) if causal else (q, k, v)
        a = attention(qq, kk, vv, causal=causal, backend="sdpa")
        b = attention(qq, kk, vv, causal=causal, backend="math")
        assert_close(a, b)
        ga = torch.autograd.grad(a.square().sum(), (q, k, v), allow_unused=True)
        gb = torch.autograd.grad(b.square().sum(), (q, k, v), allow_unused=True)
        for x, y in zip(ga, gb):
            assert_close(x, y)


def test_attention_switch_fallbacks_and_errors():
    q = torch.randn(1, 1, 4, 8)
    assert resolve_backend(q, "auto") == "sdpa"      # CPU: optional backends never chosen
    assert "sdpa" in available_backends() and "math" in available_backends()
    with pytest.raises(RuntimeError, match="flash"):
        resolve_backend(q, "flash")
    with pytest.raises(RuntimeError, match="xformers"):
        resolve_backend(q, "xformers")
    with pytest.raises(ValueError, match="bogus"):
        resolve_backend(q, "bogus")


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return create_model(SMALL)


def _batch(b=3, n_local=6, caps=8, gsize=32, lsize=16):
    crops = [torch.randn(b, 3, gsize, gsize) for _ in range(2)]
    crops += [torch.randn(b, 3, lsize, lsize) for _ in range(n_local)]
    text = torch.randint(1, 48, (caps * b, 12))
    text[:, 8] = 49
    return crops, text


def test_student_forward_contract(small_model):
    crops, text = _batch()
    out = small_model(crops, text, batch_size=3)
    for k in ("image_features", "text_features", "img_crossmodal_features", "txt_crossmodal_features"):
        assert out[k].shape == (24, 32), k
        assert_close(out[k].norm(dim=-1), torch.ones(24))
    assert torch.allclose(out["logit_scale"], torch.tensor(1 / 0.07))
    assert torch.allclose(out["distill_logit_scale"], torch.tensor(1 / 0.07))
    # crop-major: rows c·B..(c+1)·B-1 are crop c; the unimodal rows equal a per-crop tower call
    with torch.no_grad():
        ref = small_model.encode_image(crops[4])
    assert_close(out["image_features"][12:15], ref)
    # cross-modal features = norm(f + pooled) with contexts from global crop 0 / caption 0 only
    with torch.no_grad():
        f = small_model.visual(crops[5])
        _, tok = small_model.encode_text(text[:3], normalize=False, return_tokens=True)
        ctx = small_model.text_attn_cross_pool(small_model.text_token_mapping(tok), f[:, None])
    assert_close(out["img_crossmodal_features"][15:18], F.normalize(f + ctx[:, 0], dim=-1))


def test_student_forward_uses_only_rows_needed(small_model):
    crops, text = _batch()
    seen = {}

    def recorder(name):
        def hook(module, inputs, output):
            seen[name] = inputs[0].shape[0]
        return hook

    hooks = [getattr(small_model, name).register_forward_hook(recorder(name))
             for name in ("image_token_mapping", "text_token_mapping")]
    try:
        small_model(crops, text, batch_size=3)
    finally:
        for h in hooks:
            h.remove()
    assert seen == {"image_token_mapping": 3, "text_token_mapping": 3}


def test_teacher_path_touches_no_pooler_or_mapping(small_model):
    crops, text = _batch()
    called = []
    mods = [small_model.image_token_mapping, small_model.text_token_mapping,
            small_model.visual.attn_cross_pool, small_model.text_attn_cross_pool]
    hooks = [m.register_forward_hook(lambda *a: called.append(1)) for m in mods]
    try:
        out = small_model(torch.cat(crops[:2]), text[:6])
    finally:
        for h in hooks:
            h.remove()
    assert not called
    assert set(out) == {"image_features", "text_features", "logit_scale", "distill_logit_scale"}
    assert out["image_features"].shape == (6, 32) and out["text_features"].shape == (6, 32)


def test_multicrop_variable_counts(small_model):
    crops, text = _batch(b=2, n_local=0, caps=3)
    out = small_model(crops, text, batch_size=2)
    assert out["img_crossmodal_features"].shape == (4, 32)
    assert out["txt_crossmodal_features"].shape == (6, 32)


def test_return_tokens(small_model):
    img = torch.randn(2, 3, 32, 32)
    f, tok = small_model.encode_image(img, return_tokens=True)
    assert f.shape == (2, 32) and tok.shape == (2, 16, 32)
    g, ttok = small_model.encode_text(torch.randint(0, 50, (2, 12)), return_tokens=True)
    assert ttok.shape == (2, 12, 32)


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    m = create_model(SMALL)
    crops, text = _batch(b=2)

    def grads():
        m.zero_grad()
        out = m(crops, text, batch_size=2)
        sum(v.sum() for k, v in out.items() if "features" in k).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    plain = grads()
    m.set_grad_checkpointing(True)
    ckpt = grads()
    assert plain.keys() == ckpt.keys()
    for n in plain:
        assert_close(plain[n], ckpt[n], atol=1e-7)


@pytest.mark.parametrize("crops_fn,text_fn,match", [
    (lambda c: c[:1], lambda t: t, "crop list has length 1"),
    (lambda c: [c[0][:2]] + c[1:], lambda t: t, "crop 0 must be a 3×3×H×W"),
    (lambda c: c, lambda t: t[:-1], "not a positive multiple of batch_size 3"),
    (lambda c: c[:2] + [torch.randn(3, 3, 16, 24)], lambda t: t, "not square"),
    (lambda c: c[:2] + [torch.randn(3, 3, 20, 20)], lambda t: t, "image size 20 is not a multiple of the patch size 8"),
    (lambda c: [c[0], c[2]] + c[2:], lambda t: t, "global crops differ"),
])
def test_bad_inputs_are_named(small_model, crops_fn, text_fn, match):
    crops, text = _batch()
    with pytest.raises(ValueError, match=match):
        small_model(crops_fn(crops), text_fn(text), batch_size=3)


def test_bad_caption_tokens(small_model):
    with pytest.raises(ValueError, match=r"\(N, 12\)"):
        small_model.encode_text(torch.zeros(2, 11, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        small_model.encode_text(torch.full((2, 12), 50))


def test_config_validation():
    with pytest.raises(ValueError, match="unknown model name 'ViT-Q-99'"):
        create_model("ViT-Q-99")
    bad = {**SMALL, "quick_gelu": True}
    with pytest.raises(ValueError, match="quick_gelu"):
        resolve_model_config(bad)
    with pytest.raises(ValueError, match="vision_cfg.*dropout"):
        resolve_model_config({**SMALL, "vision_cfg": {**SMALL["vision_cfg"], "dropout": 0.1}})
    with pytest.raises(ValueError, match="image_size 30 is not a multiple"):
        resolve_model_config({**SMALL, "vision_cfg": {**SMALL["vision_cfg"], "image_size": 30}})
    with pytest.raises(ValueError, match="text_cfg.width == embed_dim"):
        resolve_model_config({**SMALL, "embed_dim": 48})
    with pytest.raises(ValueError, match="text_cfg.layers must be a positive"):
        resolve_model_config({**SMALL, "text_cfg": {**SMALL["text_cfg"], "layers": 0}})


def test_tiny_config():
    cfg = resolve_model_config("tiny")
    assert cfg.text_cfg.context_length == 77 and cfg.text_cfg.vocab_size == 49408
    assert cfg.vision_cfg.heads == cfg.vision_cfg.width // 64
    m = create_model("tiny")
    assert sum(p.numel() for p in m.parameters()) < 10_000_000


def test_initialisation_matches_spec():
    torch.manual_seed(0)
    m = create_model("ViT-B-32")
    assert math.isclose(m.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    assert math.isclose(m.visual.positional_embedding.std().item(), 768 ** -0.5, rel_tol=0.02)
    assert math.isclose(m.token_embedding.weight.std().item(), 0.02, rel_tol=0.02)
    assert math.isclose(m.positional_embedding.std().item(), 0.01, rel_tol=0.05)
    blk = m.transformer.resblocks[0]
    assert math.isclose(blk.attn.out_proj.weight.std().item(), 512 ** -0.5 * 24 ** -0.5, rel_tol=0.02)
    assert torch.count_nonzero(m.text_attn_cross_pool.attn.in_proj_bias) == 0
