"""benchmarks/bench_rank.py and its simulated world (benchmarks/rank_sim.py): the per-rank equality at
a small scale on CPU (every rank of W = 4, B = 8, fp32), the simulated collectives against a
single-process loss, and a CLI smoke run writing the CSV."""
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import bench_rank, comm_model, report  # noqa: E402
from benchmarks.rank_sim import SimLoss, SimWorld  # noqa: E402
from cosmos_fast.ops.contrastive import CosmosLoss  # noqa: E402

TINY = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 32, "layers": 1, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
ROWS = {"s_image_features": 8, "s_text_features": 8, "t_image_features": 2, "t_text_features": 2,
        "s_img_crossmodal_features": 8, "s_txt_crossmodal_features": 8}


pytestmark = pytest.mark.usefixtures("one_thread")    # conftest.py


def test_every_rank_equals_official_and_sums_to_the_full_batch():
    """For every rank of W = 4 (B = 8, fp32): the fast path (lockstep simulation) and the generic path
    give the official per-rank loss and gradients, and the official per-rank gradients sum to the
    single-process full-batch gradient (logit scales: each rank's is the full one)."""
    err = bench_rank.check_every_rank(json.dumps(TINY), world=4, batch=8)
    assert set(err) == {"generic_loss_rel_err", "generic_grad_rel_err", "fast_loss_rel_err", "fast_grad_rel_err",
                        "rank_loss_vs_full_rel_err", "scale_grad_vs_full_rel_err", "summed_grad_vs_full_rel_err"}
    assert max(err.values()) <= 1e-5


def _features(world, b, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: F.normalize(torch.randn(world, n * b, dim, generator=g, dtype=torch.float64), dim=-1)
            for k, n in ROWS.items()}


def _call(loss_fn, f, tau, tau_d, b):
    return loss_fn(s_image_features=f["s_image_features"], s_text_features=f["s_text_features"], logit_scale=tau,
                   t_image_features=f["t_image_features"], t_text_features=f["t_text_features"],
                   distill_logit_scale=tau_d, s_img_crossmodal_features=f["s_img_crossmodal_features"],
                   s_txt_crossmodal_features=f["s_txt_crossmodal_features"], output_dict=True, batch_size=b)


@pytest.mark.parametrize("impl,backend", [("reference", "gloo"), ("blockwise", "gloo"), ("blockwise", "nccl")])
def test_simulated_world_against_one_process(impl, backend):
    """The simulated collectives: in lockstep every rank's loss and feature/scale gradients equal the
    single-process loss on the global batch; in stand-in mode the gathers alone are exact (so the
    official loss is) and the rank's collectives are counted with ring bytes. ``nccl``: the loss's
    GPU code path (all_gather_into_tensor, reduce_scatter_tensor), run here on CPU tensors."""
    w, b, d = 3, 2, 8
    peers = _features(w, b, d)
    glob = {k: v.view(w, ROWS[k], b, d).transpose(0, 1).reshape(ROWS[k] * w * b, d).clone().requires_grad_(k[0] == "s")
            for k, v in peers.items()}                        # caption-/crop-major global layout
    tau = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    tau_d = torch.tensor(30.0, dtype=torch.float64, requires_grad=True)
    out = _call(CosmosLoss("reference"), glob, tau, tau_d, w * b)
    total = out["clip_loss"] + out["distill_loss"]
    total.backward()
    full = float(total.detach())
    for rank in range(w):
        for lockstep in (True, False):
            own = {k: v[rank].clone().requires_grad_(k[0] == "s") for k, v in peers.items()}
            t1, t2 = (t.detach().clone().requires_grad_() for t in (tau, tau_d))
            sim = SimWorld(w, rank, peers, backend=backend)
            with sim.active(lockstep=lockstep):
                o = _call(SimLoss(CosmosLoss(impl)), own, t1, t2, b)
                (o["clip_loss"] + o["distill_loss"]).backward()
            exact = lockstep or impl == "reference"
            loss = float((o["clip_loss"] + o["distill_loss"]).detach())
            assert (loss == pytest.approx(full, rel=1e-12)) == exact, (impl, lockstep, loss, full)
            if not exact:
                continue
            for k in ("s_text_features", "s_img_crossmodal_features", "s_image_features"):
                want = glob[k].grad.view(ROWS[k], w, b, d)[:, rank].reshape(ROWS[k] * b, d)
                torch.testing.assert_close(own[k].grad, want, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(t1.grad, tau.grad)      # each rank: the full scale gradient
            torch.testing.assert_close(t2.grad, tau_d.grad)
            calls = sim.comm()
            if impl == "reference":                             # 2 gathers of a B×D block per pair
                assert calls == {"all_gather": (160, comm_model.official_loss_allgather(b, w, d, feature_bytes=8))}
            else:                                               # one gather per distinct tensor
                assert calls["all_gather"] == (3, (w - 1) * (8 + 2 + 2) * b * d * 8)
                # the text-feature gradients back to their owners: a reduce-scatter (nccl) or an all-reduce
                assert ("reduce_scatter" in calls) == (backend == "nccl")
    with pytest.raises(RuntimeError, match="no row block"):
        with SimWorld(w, 0, peers).active():
            _call(CosmosLoss("reference"), {k: v[0].clone() for k, v in peers.items()}, tau, tau_d, b)


def test_cli_smoke_writes_the_csv(tmp_path):
    args = ["--model", json.dumps(TINY), "--batch", "2", "--world", "4", "--rank", "1", "--reps", "1", "--warmup", "1",
            "--paths", "official,fast", "--device", "cpu", "--no-small-check", "--out", str(tmp_path)]
    out = bench_rank.run(bench_rank.parse_args(args))
    assert Path(out["csv"]).parent == tmp_path / "rank"
    rows = report.read_csv(out["csv"])
    assert [r["path"] for r in rows] == ["official", "fast"]
    off, fast = rows
    assert off["pool_impl"] == "reference" and fast["loss_impl"] == "blockwise"
    for r in rows:
        assert r["B"] == "2" and r["world"] == "4" and r["B_g"] == "8" and r["rank"] == "1"
        assert float(r["samples_per_s"]) == pytest.approx(2 / (float(r["median_ms"]) / 1e3), rel=1e-6)
        # the fast path's fused update (optim.fused_update) runs the EMA inside the optimizer phase
        phases = ("towers_fwd", "pooling", "teacher_fwd", "loss", "backward", "optimizer")
        for ph in phases + (("ema",) if r["path"] == "official" else ()):
            assert float(r[f"t_{ph}_ms"]) > 0, ph
        assert float(r["flops_official_step"]) > 0 and float(r["mfu_official"]) > 0 and float(r["util_executed"]) > 0
        assert float(r["loss_rel_err_vs_official_fp32"]) <= 1e-4
        total = float(r["comm_loss_bytes"]) + float(r["comm_grad_bytes"])   # the table shows MB
        assert float(r["comm_total_mb"]) == pytest.approx(total / 1e6)
    # the official loss gathers both sides of all 80 pairs (fp32 features); the fast loss 3 tensors
    assert float(off["comm_all_gather_bytes"]) == comm_model.official_loss_allgather(2, 4, 32, feature_bytes=4)
    assert off["loss_collectives"] == "160" and int(fast["loss_collectives"]) < 40
    assert float(fast["comm_all_gather_bytes"]) < float(off["comm_all_gather_bytes"]) / 10
    assert float(off["flops_official_step"]) == float(fast["flops_official_step"])
    assert float(fast["flops_executed_step"]) < float(off["flops_official_step"])
    assert float(off["speedup_vs_official"]) == 1.0
    text = report.build_readme(tmp_path, plots=False)          # the README table of benchmarks/report.py
    table = [ln for ln in text.split("## rank")[1].splitlines() if ln.startswith("| ")]
    assert len(table) == 1 + 2 and "| official |" in table[1] and "| fast |" in table[2]   # header, 2 paths


def test_bad_paths_rejected():
    with pytest.raises(SystemExit, match="unknown"):
        bench_rank.run(bench_rank.parse_args(["--paths", "official,nope", "--device", "cpu", "--no-small-check"]))
