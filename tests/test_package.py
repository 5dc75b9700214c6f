import json
from pathlib import Path

import cosmos_fast
from cosmos_fast.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_kernels_package_resolves_into_this_repo():
    import cosmos_fast.kernels as kernels

    assert Path(kernels.__file__).resolve().parent == REPO / "kernels"


def test_public_api():
    for name in ("create_model", "CosmosLoss", "load_checkpoint", "save_checkpoint", "build_teacher",
                 "ema_update", "CrossAttentionPooler"):
        assert hasattr(cosmos_fast, name)


def test_demo_trains_to_five_times_chance(tmp_path, capsys):
    """The README's first command on its defaults: R@1 ≥ 5× chance for both models and directions;
    the teacher's zero-shot segmentation of the held-out scenes is reported before and after
    (metrics.json, the summary, segmentation.png)."""
    rc = main(["demo", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    chance = metrics["chance_r1"]
    assert set(metrics["before"]) == set(metrics["after"]) == {"student", "teacher"}
    for model in ("student", "teacher"):
        for k in ("i2t_r1", "t2i_r1"):
            assert metrics["after"][model][k] >= 5 * chance, (model, k, metrics["after"][model][k])
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    seg = metrics["segmentation"]
    assert seg["model"] == "teacher" and seg["csa"] is True and seg["n_images"] == 128
    for when in ("before", "after"):
        assert 0.0 <= seg[when]["mIoU"] <= 1.0 and len(seg[when]["per_class_iou"]) == len(seg["classes"]) == 9
    assert seg["after"]["mIoU"] != seg["before"]["mIoU"]                 # the teacher's weights were trained
    assert "mIoU" in out and (tmp_path / "segmentation.png").stat().st_size > 10_000
    assert "PASS" in out
    assert (tmp_path / "checkpoints" / "epoch_latest.pt").is_file()


def test_cli_rejects_bad_override(tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path), "optim.lrr=1"]) == 2
    assert "optim.lrr" in capsys.readouterr().err
