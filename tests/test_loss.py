"""CosmosLoss against a hand-written per-pair loop (values and every gradient, both scales), its
input validation, and the official multi-rank semantics on 2 gloo ranks."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from cosmos_fast import CosmosLoss
from cosmos_fast.reference.contrastive import cosmos_loss_reference


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
def test_loss_and_all_gradients_match_handwritten_loop(b, n_crops, n_caps):
    inputs, scales = make_inputs(b=b, n_crops=n_crops, n_caps=n_caps)
    out = CosmosLoss()(logit_scale=scales[0].exp(), distill_logit_scale=scales[1].exp(),
                       output_dict=True, **inputs)
    ref_d, ref_c = handwritten_cosmos(inputs["s_image_features"], inputs["s_text_features"], scales[0].exp(),
                                      inputs["t_image_features"], inputs["t_text_features"], scales[1].exp(),
                                      inputs["s_img_crossmodal_features"], inputs["s_txt_crossmodal_features"])
    torch.testing.assert_close(out["distill_loss"], ref_d, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out["clip_loss"], ref_c, rtol=1e-10, atol=1e-12)
    g_ours = _grads(inputs, scales, out["distill_loss"] + out["clip_loss"])
    g_ref = _grads(inputs, scales, ref_d + ref_c)
    for a, r in zip(g_ours, g_ref):
        if r is None:
            assert a is None or a.abs().max() == 0
        else:
            torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-12)
    if b > 1:   # with one sample every pair loss is identically 0
        assert g_ours[-1].abs().min() > 0


def test_sum_versus_dict():
    inputs, scales = make_inputs(b=3)
    loss = CosmosLoss()
    d = loss(logit_scale=scales[0].exp(), distill_logit_scale=scales[1].exp(), output_dict=True, **inputs)
    s = loss(logit_scale=scales[0].exp(), distill_logit_scale=scales[1].exp(), **inputs)
    torch.testing.assert_close(s, d["distill_loss"] + d["clip_loss"])


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


# ---------------------------------------------------------------- official distributed semantics
def _rank_worker(rank, world, init_file, result_dir):
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
    mp.spawn(_rank_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    inputs, scales = make_inputs(b=6, seed=3)
    out = cosmos_loss_reference(logit_scale=scales[0].exp(), distill_logit_scale=scales[1].exp(), **inputs)
    total = out["distill_loss"] + out["clip_loss"]
    full = _grads(inputs, scales, total)
    for rank in range(world):
        res = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        # every rank computes the whole global-batch loss
        torch.testing.assert_close(res["loss"], total.detach(), rtol=1e-10, atol=1e-12)
        for g_rank, g_full in zip(res["grads"][:-1], full[:-1]):
            if g_full is None:
                assert g_rank is None
            else:   # a rank's features get the full-loss gradient of its own rows
                torch.testing.assert_close(g_rank, g_full[rank * 3:(rank + 1) * 3], rtol=1e-9, atol=1e-12)
        # the scales see the whole loss on every rank
        torch.testing.assert_close(res["grads"][-1], full[-1], rtol=1e-9, atol=1e-12)
