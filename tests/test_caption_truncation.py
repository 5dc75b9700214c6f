"""Caption truncation (model.truncate_captions): student captions 1+ and the teacher's captions run
only up to the batch's bucketed last end-of-text token; caption 0 keeps the full context.

Exact by the causal mask: every output and every parameter gradient equals the full-length run up
to the reassociation of shorter matrix products — fp32, each tensor within 1e-5 × its largest
magnitude (not bitwise: the products over fewer rows sum in another order; the gradients of the
shared weights gather terms from every position, so small entries carry the big ones' rounding).
"""
import pytest
import torch

from utils import TINY_MODEL_16

from cosmos_fast import build_teacher, create_model
from cosmos_fast.config import load_config
from cosmos_fast.model.cosmos import TEXT_BUCKET, executed_text_tokens, text_runs, truncated_length

CTX, EOT = 40, 19                       # 40 tokens: the buckets are 16, 32 and the full 40
MODEL = dict(TINY_MODEL_16, text_cfg=dict(TINY_MODEL_16["text_cfg"], context_length=CTX))


def _close(got, ref, name):
    got, ref = got.detach(), ref.detach()
    err, scale = float((got - ref).abs().max()), float(ref.abs().max())
    assert err <= 1e-5 * scale, f"{name}: max error {err:.3e} > 1e-5 × {scale:.3e}"


def _captions(b, n_caps, eot_rest, eot_first=30, seed=0):
    """Caption-major ids; caption 0's end-of-text at ``eot_first``, the others' at most ``eot_rest``,
    padding 0 after it (as the tokenizer writes)."""
    g = torch.Generator().manual_seed(seed)
    text = torch.zeros(n_caps * b, CTX, dtype=torch.long)
    ends = torch.randint(1, eot_rest + 1, (n_caps * b,), generator=g)
    ends[:b] = eot_first
    ends[b] = eot_rest                      # one caption reaches the maximum
    for i, e in enumerate(ends.tolist()):
        text[i, :e] = torch.randint(1, EOT, (e,), generator=g)
        text[i, e] = EOT
    return text


def _crops(b):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(b, 3, 16, 16, generator=g) for _ in range(2)] + [torch.randn(b, 3, 8, 8, generator=g)]


@pytest.mark.parametrize("eot_rest,expect", [(0, 16), (14, 16), (15, 16), (16, 32), (31, 32), (32, 40), (39, 40)])
def test_truncated_length_buckets(eot_rest, expect):
    text = torch.zeros(3, CTX, dtype=torch.long)
    text[0, eot_rest] = EOT
    text[1, min(eot_rest, 3)] = EOT
    text[2, 0] = EOT
    assert truncated_length(text, CTX) == expect
    assert TEXT_BUCKET == 16


@pytest.mark.parametrize("eot_rest", [5, 20])
def test_truncated_student_and_teacher_equal_full_length(eot_rest):
    """Outputs and all gradients of the student's multi-crop forward, and the teacher's features,
    with truncation against the full-length run (same weights, same inputs)."""
    b, n_caps = 3, 4
    torch.manual_seed(0)
    full = create_model(MODEL, truncate_captions=False)
    cut = create_model(MODEL)
    cut.load_state_dict(full.state_dict())
    assert cut.truncate_captions and not full.truncate_captions
    crops, text = _crops(b), _captions(b, n_caps, eot_rest)
    runs = text_runs(text, b, CTX)
    assert runs["student"] == [(b, CTX), ((n_caps - 1) * b, 16 if eot_rest < 16 else 32)]
    outs = []
    for model in (full, cut):
        out = model(crops, text, batch_size=b)
        loss = sum((v * torch.linspace(-1, 1, v.numel()).reshape(v.shape)).sum() for v in out.values())
        loss.backward()
        outs.append((out, {n: p.grad for n, p in model.named_parameters()}))
    (o_full, g_full), (o_cut, g_cut) = outs
    for k in o_full:
        _close(o_cut[k], o_full[k], k)
    assert g_full.keys() == g_cut.keys()
    for n in g_full:
        _close(g_cut[n], g_full[n], n)
    t_full, t_cut = build_teacher(full), build_teacher(cut)
    with torch.no_grad():
        a = t_full(torch.cat(crops[:2]), text[:2 * b])
        c = t_cut(torch.cat(crops[:2]), text[:2 * b])
    for k in a:
        _close(c[k], a[k], f"teacher {k}")
    with pytest.raises(ValueError, match="return_tokens"):
        cut.encode_text(text, return_tokens=True, truncate=True)


def test_executed_text_tokens():
    b, n_caps = 3, 4
    text = _captions(b, n_caps, eot_rest=20)                  # others at ≤ 20 → 32; caption 0 at 30 → 32
    got = executed_text_tokens(text, b, CTX)
    assert got == {"student": b * CTX + (n_caps - 1) * b * 32, "teacher": 2 * b * 32,
                   "official_student": n_caps * b * CTX, "official_teacher": 2 * b * CTX}
    off = executed_text_tokens(text, b, CTX, truncate=False)
    assert off["student"] == off["official_student"] and off["teacher"] == off["official_teacher"]
    long = _captions(b, n_caps, eot_rest=35)                   # nothing to cut: one call, as without truncation
    assert text_runs(long, b, CTX)["student"] == [(n_caps * b, CTX)]


def test_config_key_default_on():
    assert load_config("tiny-cpu").model.truncate_captions is True
    assert load_config("tiny-cpu", ["model.truncate_captions=false"]).model.truncate_captions is False
    assert create_model(MODEL).truncate_captions and not create_model(MODEL, truncate_captions=False).truncate_captions
