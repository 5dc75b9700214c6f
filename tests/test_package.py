from pathlib import Path

import pytest

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


def test_demo_runs_and_learns(tmp_path, capsys):
    rc = main(["demo", "--steps", "3", "--batch-size", "4", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "teacher weights identical" in out and "samples_s" in out
    assert (tmp_path / "epoch_1.pt").is_file()


def test_demo_rejects_bad_values():
    with pytest.raises(SystemExit):
        main(["demo", "--steps", "0"])
