"""Smoke tests of the benchmark scripts: train-step benchmark, communication formulas and the
scaling model, the profile's collective classification, the README generator and the GPU suite's
dependency check. Results go to tmp dirs (``--results-dir``), never into bench_results/."""
import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import bench_train, comm_model, report, scaling  # noqa: E402
from benchmarks.profile_train import classify, size_factor, wire_factor  # noqa: E402
from cosmos_fast.profiling import PHASES  # noqa: E402

TINY = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 32, "layers": 1, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


pytestmark = pytest.mark.usefixtures("one_thread")    # conftest.py


def _read(path):
    """One row per case from a results CSV (the long format read back as the report reads it)."""
    return report.read_csv(path)


# ----------------------------------------------------------------------------- bench_train
def test_bench_train_tiny_writes_breakdown_and_mfu(tmp_path):
    args = ["--model", json.dumps(TINY), "--batch", "2", "--warmup", "0", "--reps", "1", "--no-data",
            "--device", "cpu", "--threads", "1", "--results-dir", str(tmp_path)]
    out = bench_train.run(bench_train.parse_args(args))
    rows = _read(out["csv"])
    assert Path(out["csv"]).parent == tmp_path / "train"
    assert [r["path"] for r in rows] == ["reference", "fast"]
    assert rows[0]["pool_impl"] == "reference" and rows[1]["pool_impl"] == "absorbed"
    assert rows[1]["loss_impl"] == "blockwise"
    for r in rows:
        for ph in PHASES:
            assert f"t_{ph}_ms" in r and float(r[f"t_{ph}_ms"]) >= 0.0
        assert float(r["t_student_forward_ms"]) > 0 and float(r["t_backward_ms"]) > 0
        flops = float(r["flops_step"])
        assert flops > 0
        assert float(r["flops_student_forward"]) > 0 and float(r["flops_backward"]) > 0
        mfu = flops / (float(r["median_ms"]) / 1e3) / (float(r["peak_tflops"]) * 1e12)
        assert float(r["mfu"]) == pytest.approx(mfu, rel=1e-6) and float(r["mfu"]) > 0
        assert float(r["samples_per_s"]) == pytest.approx(2 / (float(r["median_ms"]) / 1e3), rel=1e-6)
        assert float(r["loss_rel_err"]) <= 1e-4 and float(r["grad_rel_err"]) <= 1e-3
        assert float(r["loss_ref"]) == pytest.approx(float(r["loss_fast"]), rel=1e-4)
    assert rows[0]["flops_step"] == rows[1]["flops_step"]          # one count, used for both paths
    for key in ("device", "torch", "triton", "commit", "date"):
        assert rows[0][key]


def test_equality_check_rejects_a_different_fast_path():
    from cosmos_fast.ema import build_teacher
    from cosmos_fast.model import create_model

    torch.manual_seed(0)
    student = create_model(TINY, pool_impl="reference")
    teacher = build_teacher(student)
    dev = torch.device("cpu")
    ref = bench_train.TrainPath("reference", student, teacher, "reference", "reference", dev, None)
    fast = bench_train.TrainPath("fast", student, teacher, "shared", "blockwise", dev, None)
    batch = bench_train.make_batch(2, 32, 16, 49408, 77)
    ok = bench_train.check_equal(ref, fast, batch, low_precision=False)
    assert ok["loss_rel_err"] <= 1e-4
    with torch.no_grad():
        fast.student.text_projection.mul_(1.5)                      # now a different model
    with pytest.raises(SystemExit, match="differs from the reference"):
        bench_train.check_equal(ref, fast, batch, low_precision=False)


def test_low_precision_equality_is_measured_against_fp32():
    """Under autocast the fast path is compared with the reference's own bf16 error, both measured
    against the reference in fp32; a different model still fails."""
    from cosmos_fast.ema import build_teacher
    from cosmos_fast.model import create_model

    torch.manual_seed(0)
    student = create_model(TINY, pool_impl="reference")
    teacher = build_teacher(student)
    dev = torch.device("cpu")
    ref = bench_train.TrainPath("reference", student, teacher, "reference", "reference", dev, torch.bfloat16)
    fast = bench_train.TrainPath("fast", student, teacher, "absorbed", "blockwise", dev, torch.bfloat16)
    batch = bench_train.make_batch(2, 32, 16, 49408, 77)
    ok = bench_train.check_equal(ref, fast, batch, low_precision=True)
    assert 0 < ok["ref_lowp_grad_err"] and ok["fast_lowp_grad_err"] <= 2 * ok["ref_lowp_grad_err"] + 1e-3
    with torch.no_grad():
        fast.student.text_projection.mul_(1.5)
    with pytest.raises(SystemExit, match="further from the fp32 reference"):
        bench_train.check_equal(ref, fast, batch, low_precision=True)


# ----------------------------------------------------------------------------- bench_cross_pool
def test_bench_cross_pool_checks_every_provider_then_times(tmp_path):
    from benchmarks import bench_cross_pool as bcp

    args = argparse.Namespace(warmup=0, reps=1, max_reference_batch=0)
    providers = bcp.available_providers(torch.device("cpu"))
    assert {"reference", "absorbed", "shared"} <= set(providers)
    rows = bcp.run_case("text", 20, 3, 8, 64, 4, "fwd+bwd", providers, torch.device("cpu"), torch.float32, args)
    assert {r["provider"] for r in rows} == set(providers)
    assert all(r["max_rel_err_vs_ref"] <= 1e-4 and r["median_ms"] > 0 for r in rows)

    def wrong(pooler, context, queries):                            # drops the pooled vector
        return torch.nn.functional.normalize(queries * 1.0 + 0 * context.sum(), dim=-1)
    with pytest.raises(SystemExit, match="wrong differs from the reference"):
        bcp.run_case("text", 20, 3, 8, 64, 4, "fwd", {"reference": providers["reference"], "wrong": wrong},
                     torch.device("cpu"), torch.float32, args)


# ----------------------------------------------------------------------------- scaling formulas
def test_comm_volume_matches_hand_computed_values():
    p, w, b, d = 1_000_000, 4, 8, 64
    v0 = comm_model.comm_volume(p, 0, w, batch=b, dim=d)             # bf16 (2 bytes) defaults
    assert v0["grad_reduce"] == pytest.approx(1.5 * p * 2)             # all-reduce 2(W-1)/W · 2P bytes
    assert v0["param_allgather_after_step"] == 0 and v0["zero3_param_gather"] == 0
    for stage in (1, 2):
        v = comm_model.comm_volume(p, stage, w, batch=b, dim=d)
        assert v["grad_reduce"] == pytest.approx(0.75 * p * 2)         # reduce-scatter
        assert v["param_allgather_after_step"] == pytest.approx(0.75 * p * 2)
        assert v["zero3_param_gather"] == 0 and v["zero3_teacher_gather"] == 0
    v3 = comm_model.comm_volume(p, 3, w, batch=b, dim=d)
    assert v3["grad_reduce"] == pytest.approx(1.5e6)
    assert v3["zero3_param_gather"] == pytest.approx(1.5e6)
    assert v3["zero3_teacher_gather"] == pytest.approx(0.75 * p * 4)   # fp32 teacher
    assert v3["param_allgather_after_step"] == 0
    assert comm_model.comm_volume(p, 3, w, batch=b, dim=d, zero3_regather=True)["zero3_param_gather"] == pytest.approx(3e6)
    assert comm_model.comm_volume(p, 3, w, batch=b, dim=d, teacher_partitioned=False)["zero3_teacher_gather"] == 0
    assert comm_model.comm_volume(p, 2, w, batch=b, dim=d, reduce_scatter=False)["grad_reduce"] == pytest.approx(3e6)
    # loss traffic, B_g = 32: 12 feature blocks gathered; 2·80·B_g + 160 fp32 statistics all-reduced;
    # the 8 text-feature gradient blocks reduce-scattered plus the 2 logit-scale gradients
    assert v0["feature_allgather"] == pytest.approx(0.75 * 12 * 32 * 64 * 2)
    assert v0["loss_stats_allreduce"] == pytest.approx(1.5 * (2 * 80 * 32 + 160) * 4)
    assert v0["feature_grad_reduce"] == pytest.approx(0.75 * 8 * 32 * 64 * 2 + 1.5 * 8)
    assert all(x == 0 for x in comm_model.comm_volume(p, 3, 1, batch=b, dim=d).values())


def test_loss_flops_formula():
    assert scaling.loss_flops(32, 128, 512, "fast") == pytest.approx(176 * 2 * 32 * 4096 * 512)
    assert scaling.loss_flops(32, 128, 512, "reference") == pytest.approx(176 * 2 * 4096 * 4096 * 512)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("overlap", ["none", "overlap"])
@pytest.mark.parametrize("ib", ["hdr4", "hdr8"])
def test_projection_is_monotone(stage, overlap, ib):
    cl = scaling.Cluster(inter_busbw=scaling.IB_BUSBW[ib])
    rows = scaling.project(scaling.PROJECT_GPUS, n_params=150_000_000, flops_per_sample=559e9, batch=64,
                           stage=stage, dim=512, cluster=cl, overlap=overlap)
    assert [r["gpus"] for r in rows] == [1, 8, 16, 32, 64, 128]
    assert rows[0]["efficiency"] == pytest.approx(1.0) and rows[0]["comm_share"] == 0.0
    eff = [r["efficiency"] for r in rows]
    share = [r["comm_share"] for r in rows]
    assert all(e <= 1.0 + 1e-12 for e in eff)
    assert all(a >= b - 1e-12 for a, b in zip(eff, eff[1:])), eff          # more ranks: never more efficient
    assert all(a <= b + 1e-12 for a, b in zip(share, share[1:])), share    # communication share never shrinks
    if overlap == "none":
        assert rows[-1]["t_exposed_ms"] > 0


def test_projection_uses_measured_compute_and_volume_scale():
    kw = dict(n_params=10_000_000, flops_per_sample=1e9, batch=8, stage=2, dim=64)
    a = scaling.project([8], compute_s=0.5, **kw)
    assert a[0]["t_compute_ms"] == pytest.approx(500.0)
    b = scaling.project([8], compute_s=0.5, volume_scale={"grad_reduce": 2.0}, **kw)
    assert b[1]["wire_mb_grad_reduce"] == pytest.approx(2 * a[1]["wire_mb_grad_reduce"])
    assert b[1]["t_step_ms"] > a[1]["t_step_ms"]


# ----------------------------------------------------------------------------- profile accounting
def test_collective_classification_and_factors():
    assert classify("all_gather", "loss", False) == "feature_allgather"
    assert classify("all_reduce", "loss", False) == "loss_stats_allreduce"
    assert classify("all_reduce", "backward", True) == "feature_grad_reduce"
    assert classify("all_reduce", "backward", False) == "grad_reduce"
    assert classify("all_gather", "student_forward", False) == "zero3_param_gather"
    assert classify("all_gather", "teacher_forward", False) == "zero3_teacher_gather"
    assert classify("all_gather", "optimizer", False, stage=2) == "param_allgather_after_step"
    assert classify("all_gather", "optimizer", False, stage=3) == "zero3_param_gather"
    assert classify("broadcast", None, False) == "other"
    assert wire_factor("all_reduce", 4) == pytest.approx(1.5) and wire_factor("all_gather", 4) == pytest.approx(0.75)
    assert wire_factor("all_reduce", 1) == 0.0
    assert size_factor("all_gather", 4) == 4 and size_factor("all_reduce", 4) == 1


# ----------------------------------------------------------------------------- report
def _write(path, rows, case):
    """``rows`` (one dict per case, environment included) as harness.write_csv writes them."""
    from benchmarks.harness import LONG_COLUMNS, long_rows

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=[*report.ENV, *case, *LONG_COLUMNS])
        w.writeheader()
        w.writerows(long_rows(rows, case, report.ENV))


def test_results_csv_is_long_with_one_unit_per_quantity(tmp_path):
    """write_csv stores one row per case and quantity, times in ms and memory in bytes whatever unit a
    benchmark reported; read_csv gives the rows back (in the unit the README table shows)."""
    from benchmarks import harness

    rows = [{"provider": "reference", "B": 8, "median_s": 0.25, "peak_mib": 3.0, "wire_mb_grad": 2.0,
             "samples_per_s": 32.0, "speedup_vs_ref": 1.0},
            {"provider": "fast", "B": 8, "median_s": 0.125, "peak_mib": 1.5, "wire_mb_grad": 2.0,
             "samples_per_s": 64.0, "speedup_vs_ref": 2.0}]
    path = harness.write_csv("cross_pool", rows, torch.device("cpu"), case=("provider", "B"), root=tmp_path)
    long = list(csv.DictReader(open(path, newline="")))
    assert list(long[0]) == [*report.ENV, "provider", "B", "quantity", "value"]
    assert len(long) == 2 * 5
    got = {(r["provider"], r["quantity"]): float(r["value"]) for r in long}
    assert got[("fast", "median_ms")] == 125.0 and got[("fast", "peak_bytes")] == 1.5 * 2 ** 20
    assert got[("fast", "wire_bytes_grad")] == 2e6 and got[("fast", "samples_per_s")] == 64.0
    assert {q for _, q in got} == {"median_ms", "peak_bytes", "wire_bytes_grad", "samples_per_s", "speedup_vs_ref"}
    back = report.read_csv(path)                                    # cross_pool's table shows peak_mib
    assert [r["provider"] for r in back] == ["reference", "fast"]
    assert float(back[1]["peak_mib"]) == 1.5 and float(back[1]["median_ms"]) == 125.0
    assert back[1]["speedup_vs_ref"] == "2.0" and back[0]["device"] == harness.env_info(torch.device("cpu"))["device"]
    assert harness.write_csv("cross_pool", rows, torch.device("cpu"), case=("provider", "B"), root=tmp_path) == path
    assert len(report.read_csv(path)) == 4                           # appended: two more cases


def test_report_builds_readme_table_from_latest_csv(tmp_path):
    env = {"device": "cpu-x86_64-2threads", "torch": "2.14.1", "triton": "3.8.0", "cuda": "none"}
    old = [{**env, "commit": "aaaaaaa", "date": "2026-01-01", "model": "tiny", "B": 2, "path": "reference",
            "median_ms": 100.0, "speedup_vs_ref": 1.0}]
    new = [{**env, "commit": "bbbbbbb", "date": "2026-02-01", "model": "tiny", "B": 2, "path": p, "median_ms": ms,
            "samples_per_s": 2 / ms * 1e3, **{f"t_{ph}_ms": 1.0 for ph in PHASES}, "peak_mib": 5.0, "mfu": 0.0123,
            "speedup_vs_ref": 200.0 / ms, "mem_ratio_vs_ref": 1.0} for p, ms in (("reference", 200.0), ("fast", 50.0))]
    _write(tmp_path / "train" / "cpu-x86_64-2threads_2026-01-01_aaaaaaa.csv", old, ("model", "B", "path"))
    _write(tmp_path / "train" / "cpu-x86_64-2threads_2026-02-01_bbbbbbb.csv", new, ("model", "B", "path"))
    _write(tmp_path / "mystery" / "gpu_2026-02-02_ccccccc.csv",
           [{**env, "commit": "ccccccc", "date": "2026-02-02", "case": "x", "speedup_vs_ref": 3.0}], ("case",))
    text = report.build_readme(tmp_path, plots=True)
    assert "## train" in text and "## mystery" in text
    assert "bbbbbbb" in text and "2026-02-01" in text and "aaaaaaa" not in text      # newest CSV only
    assert "| model | B | path |" in text.replace("precision | ", "")
    lines = [ln for ln in text.splitlines() if ln.startswith("| tiny | 2 |")]
    assert len(lines) == 2 and lines[1].split("|")[3].strip() == "fast"
    assert lines[1].rstrip(" |").endswith("| 4 | 1")                                  # speedup 4×, memory 1×
    assert "1.23%" in lines[1]                                                       # MFU shown in percent
    assert (tmp_path / "train" / "cpu-x86_64-2threads_2026-02-01_bbbbbbb.png").stat().st_size > 0
    assert report.main(["--results-dir", str(tmp_path), "--no-plots"]) == 0
    assert (tmp_path / "README.md").read_text().startswith("# Benchmark results")


def _results_copy(dst: Path) -> Path:
    """The committed inputs of bench_results/ (CSVs, manifest, scaling reports) without README or PNGs."""
    import shutil

    src = REPO / "bench_results"
    for p in src.glob("*/*"):
        if p.suffix == ".csv" or (p.suffix == ".md" and p.name != "README.md"):
            (dst / p.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(p, dst / p.parent.name / p.name)
    shutil.copy(src / "manifest.json", dst / "manifest.json")
    return dst


def test_report_reproduces_committed_readme_and_pngs(tmp_path):
    """report.py on the committed CSVs and manifest rewrites bench_results/README.md and every
    committed PNG byte for byte (so the committed results are what the script makes of them)."""
    pytest.importorskip("matplotlib")
    out = _results_copy(tmp_path)
    assert report.main(["--results-dir", str(out)]) == 0
    assert (out / "README.md").read_bytes() == (REPO / "bench_results" / "README.md").read_bytes()
    committed = sorted(p.relative_to(REPO / "bench_results") for p in (REPO / "bench_results").glob("*/*.png"))
    made = sorted(p.relative_to(out) for p in out.glob("*/*.png"))
    assert committed and made == committed
    for rel in committed:
        assert (out / rel).read_bytes() == (REPO / "bench_results" / rel).read_bytes(), rel


def test_report_shows_recorded_headline_not_newest_csv(tmp_path, capsys):
    """A benchmark in the manifest shows its recorded run even when a newer smoke CSV exists; a
    benchmark absent from it falls back to the newest CSV and says so; a missing headline fails."""
    from benchmarks import harness

    env = {"device": "cpu-x", "torch": "2", "triton": "3", "cuda": "none"}

    def rows(commit, date, b):
        return [{**env, "commit": commit, "date": date, "B": b, "mode": "fwd", "provider": p, "median_s": s,
                 "speedup_vs_reference": 1.0 / s} for p, s in (("reference", 1.0), ("blockwise", 0.5))]

    case = ("B", "mode", "provider")
    _write(tmp_path / "contrastive" / "cpu-x_2026-01-01_aaaaaaa.csv", rows("aaaaaaa", "2026-01-01", 2048), case)
    _write(tmp_path / "contrastive" / "cpu-x_2026-02-01_bbbbbbb.csv", rows("bbbbbbb", "2026-02-01", 256), case)
    _write(tmp_path / "cross_pool" / "cpu-x_2026-01-01_ccccccc.csv", rows("ccccccc", "2026-01-01", 8), case)
    _write(tmp_path / "cross_pool" / "cpu-x_2026-02-01_ddddddd.csv", rows("ddddddd", "2026-02-01", 16), case)
    harness.record(tmp_path / "contrastive" / "cpu-x_2026-01-01_aaaaaaa.csv")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["headline"] == {"contrastive": {"cpu-x": "contrastive/cpu-x_2026-01-01_aaaaaaa.csv"}}
    text = report.build_readme(tmp_path, plots=False)
    contrastive, cross_pool = text.split("## cross_pool")
    assert "aaaaaaa" in contrastive and "| 2048 |" in contrastive and "bbbbbbb" not in contrastive
    assert "No headline recorded" not in contrastive
    assert "ddddddd" in cross_pool and "ccccccc" not in cross_pool and "No headline recorded" in cross_pool
    assert "cross_pool has no headline" in capsys.readouterr().out
    (tmp_path / "contrastive" / "cpu-x_2026-01-01_aaaaaaa.csv").unlink()
    with pytest.raises(SystemExit, match="aaaaaaa.csv"):
        report.build_readme(tmp_path, plots=False)


def test_record_flag_writes_the_manifest(tmp_path, monkeypatch):
    """A benchmark run with --record names its CSV in the manifest; a run without it leaves it alone."""
    from benchmarks import bench_contrastive, harness

    monkeypatch.setattr(harness, "RESULTS", tmp_path)
    small = ["--sizes", "8", "--dim", "8", "--reps", "1", "--warmup", "0"]
    bench_contrastive.main(small)
    assert not (tmp_path / "manifest.json").exists()
    bench_contrastive.main(small + ["--record"])
    (csv_path,) = (tmp_path / "contrastive").glob("*.csv")
    headline = json.loads((tmp_path / "manifest.json").read_text())["headline"]["contrastive"]
    assert headline == {_read(csv_path)[0]["device"]: f"contrastive/{csv_path.name}"}


def test_ratio_plot_colours_by_provider_without_reference_bars(tmp_path, monkeypatch):
    """Speed-up panels: no 1× reference bars (a dashed line instead), one fixed colour per provider,
    tick labels like "B=2048 fwd" without error values, the legend outside the axes, axis labels."""
    pytest.importorskip("matplotlib")
    from matplotlib.colors import to_hex

    figs = []
    monkeypatch.setattr(report, "_save", lambda plt, fig, png: figs.append(fig) or True)
    env = {"device": "cpu-x", "torch": "2", "triton": "3", "cuda": "none", "commit": "aaaaaaa", "date": "2026-01-01"}
    rows = [{**env, "B": b, "mode": m, "provider": p, "max_rel_err_vs_truth": 1.2192084594541e-07 if p != "reference"
             else 0.0, "speedup_vs_reference": s, "memory_reduction_vs_reference": s}
            for b in (1024, 2048) for m in ("fwd", "bwd")
            for p, s in (("reference", 1.0), ("blockwise", 1.5), ("fused", 0.5))]
    assert report.plot_ratio(rows, "contrastive", tmp_path / "x.png")
    fig = figs[0]
    fig.canvas.draw()
    speed = fig.axes[0]
    colours = [to_hex(b.get_facecolor()) for b in speed.patches]
    assert len(colours) == 8                                           # 4 cases × 2 non-reference providers
    assert colours.count(report.PROVIDER_COLORS["blockwise"]) == 4 and colours.count(report.PROVIDER_COLORS["fused"]) == 4
    assert [t.get_text() for t in fig.axes[-1].get_xticklabels()] == ["B=1024 fwd", "B=1024 bwd", "B=2048 fwd",
                                                                     "B=2048 bwd"]
    assert any(ln.get_linestyle() == "--" and list(ln.get_ydata()) == [1.0, 1.0] for ln in speed.get_lines())
    for ax in fig.axes:
        assert ax.get_ylabel() and ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1
    assert fig.axes[-1].get_xlabel()
    assert "reference" in fig._suptitle.get_text() and "cpu-x" in fig._suptitle.get_text()


# ----------------------------------------------------------------------------- GPU suite
def test_gpu_suite_is_valid_bash_and_checks_dependencies_first(tmp_path):
    script = REPO / "benchmarks" / "gpu_suite.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the suite would run for minutes")
    env = {**os.environ, "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(script), str(tmp_path / "out")], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "no CUDA GPU" in r.stdout
    assert (tmp_path / "out" / "status.txt").read_text().strip() == "deps FAIL"
    assert not (REPO / "cosmos_fast" / "kernels").is_symlink()


# ----------------------------------------------------------------------------- bench_multicrop
def test_bench_multicrop_checks_equality_then_times(tmp_path, monkeypatch):
    """The crop-kernel benchmark checks every numba crop against torchvision's before it times, refuses
    to time a kernel whose crops differ, and writes one row per provider."""
    pytest.importorskip("numba")
    from benchmarks import bench_multicrop, harness
    from cosmos_fast.reference import multicrop as multicrop_ref

    monkeypatch.setattr(harness, "RESULTS", tmp_path / "results")
    args = ["--images", "2", "--size", "64x48", "--global-size", "32", "--local-size", "16", "--n-local", "2",
            "--warmup", "0", "--reps", "1"]
    assert bench_multicrop.main(args) == 0
    rows = _read(next((tmp_path / "results" / "multicrop").glob("*.csv")))
    assert [r["provider"] for r in rows] == ["torchvision", "numba"]
    assert all(float(r["median_ms_per_image"]) > 0 for r in rows) and rows[0]["ratio_vs_torchvision"] == "1.0"
    real = multicrop_ref.reference_crop
    monkeypatch.setattr(multicrop_ref, "reference_crop", lambda img, p, size: real(img, p, size) + 1e-6)
    with pytest.raises(SystemExit, match="differs from torchvision"):
        bench_multicrop.main(args)


# ----------------------------------------------------------------------------- bench_data
def test_bench_data_checks_exactness_then_times(tmp_path, monkeypatch):
    """The data benchmark compares DALI's CPU crops with torchvision's before it times, refuses to time
    a pipeline whose crops differ, and writes one row per provider."""
    pytest.importorskip("nvidia.dali")
    pytest.importorskip("numba")
    from benchmarks import bench_data, harness
    from cosmos_fast.reference import multicrop as multicrop_ref

    monkeypatch.setattr(harness, "RESULTS", tmp_path / "results")
    args = ["--images", "16", "--per-shard", "8", "--batch-size", "4", "--steps", "1", "--warmup", "0", "--reps", "1",
            "--size", "160x120", "--data-dir", str(tmp_path / "shards")]
    assert bench_data.main(["--providers", "torchvision", "torchvision-fused", "dali"] + args) == 0
    rows = _read(next((tmp_path / "results" / "data").glob("*.csv")))
    assert [r["provider"] for r in rows] == ["torchvision", "torchvision-fused", "dali"]
    assert all(float(r["images_per_s"]) > 0 for r in rows) and rows[0]["ratio_vs_torchvision"] == "1.0"
    batch = {"keys": ["a"], "captions": torch.zeros(8, 77, dtype=torch.int64), "crops": [torch.zeros(1, 3, 4, 4)]}
    bench_data.check_same_batch(batch, batch, "torchvision-fused")
    other = dict(batch, crops=[torch.full((1, 3, 4, 4), 1e-7)])
    with pytest.raises(SystemExit, match="differs from torchvision"):
        bench_data.check_same_batch(batch, other, "torchvision-fused")
    real = multicrop_ref.reference_crop
    monkeypatch.setattr(multicrop_ref, "reference_crop", lambda img, p, size: real(img, p, size) + 1e-6)
    with pytest.raises(SystemExit, match="differs from torchvision"):
        bench_data.main(["--providers", "dali"] + args)


# ----------------------------------------------------------------------------- bench_contrastive
def test_bench_contrastive_list_api_memory_split_and_flop_rate(tmp_path, monkeypatch):
    """The loss benchmark checks the official list API against the reference before timing it, reports
    the 256-pass FLOP rate and the memory beyond the inputs' gradients, measures memory-only sizes, and
    writes the per-op split to its own CSV; an unknown API suffix is refused."""
    from benchmarks import bench_contrastive, harness

    monkeypatch.setattr(harness, "RESULTS", tmp_path)
    bench_contrastive.main(["--sizes", "16", "--dim", "8", "--reps", "1", "--warmup", "0", "--providers",
                            "reference", "blockwise", "blockwise:list", "--memory-sizes", "24", "--kernel-split"])
    rows = _read(next((tmp_path / "contrastive").glob("*.csv")))
    timed = [r for r in rows if r["mode"] == "fwd+bwd"]
    assert sorted(r["provider"] for r in timed) == ["blockwise", "blockwise:list", "reference"]
    for r in timed:
        assert float(r["tflops_256"]) > 0 and float(r["extra_mem_bytes"]) >= 0
        assert float(r["peak_mem_bytes"]) == float(r["extra_mem_bytes"]) + float(r["input_grad_bytes"])
    listed = next(r for r in timed if r["provider"] == "blockwise:list")
    assert float(listed["max_rel_err_vs_truth"]) < 1e-5
    memory = [r for r in rows if r["mode"] == "fwd+bwd memory"]
    assert {r["provider"] for r in memory} == {"blockwise", "blockwise:list"} and {r["B"] for r in memory} == {"24"}
    assert all(r["grads_finite"] == "1" for r in memory)
    split = _read(next((tmp_path / "contrastive_split").glob("*.csv")))
    assert {r["kernel"] for r in split if r["provider"] == "blockwise"} >= {"(all)"}
    with pytest.raises(SystemExit, match=":list"):
        bench_contrastive.main(["--sizes", "8", "--providers", "blockwise:tuple"])


def test_ceilings_write_one_row_per_ceiling(tmp_path):
    """The device-ceiling benchmark measures a copy, a GEMM per dtype and fp64 atomics, each with a rate."""
    from benchmarks import ceilings

    assert ceilings.main(["--quick", "--reps", "1", "--results-dir", str(tmp_path)]) == 0
    rows = _read(next((tmp_path / "ceilings").glob("*.csv")))
    assert [r["what"] for r in rows][0] == "copy" and "gemm" in {r["what"] for r in rows}
    assert float(next(r for r in rows if r["what"] == "copy")["gb_per_s"]) > 0
    assert float(next(r for r in rows if r["what"] == "atomic_add_fp64")["g_adds_per_s"]) > 0


def test_gpu_summary_reads_targets_from_the_run_and_never_guesses(tmp_path):
    """The GPU run's verdict table: ratios computed from the run's own rows (here the committed H200
    pooling CSV), "not measured" where a phase left no rows."""
    import shutil

    from benchmarks import gpu_summary

    (tmp_path / "cross_pool").mkdir()
    src = REPO / "bench_results" / "cross_pool" / "NVIDIA-H200_2026-11-30_d33d4c3.csv"
    shutil.copy(src, tmp_path / "cross_pool" / src.name)
    rows = {what: (value, met) for what, value, _, met in gpu_summary.targets(tmp_path)}
    case = {r["provider"]: float(r["median_ms"]) for r in _read(src)
            if (r["pooler"], r["L"], r["B"], r["mode"]) == ("image", "196", "64", "fwd+bwd")}
    value, met = rows["pooling fwd+bwd B=64 L=196: fused ÷ repeat reference (×)"]
    assert value == pytest.approx(case["reference"] / case["fused"]) and met is (value >= 6.0)
    assert rows["loss fwd+bwd B=4096: fused ÷ reference speed (×)"] == (None, None)
    assert gpu_summary.main([str(tmp_path)]) == 0
    assert "not measured" in (tmp_path / "summary.md").read_text()
