"""What a batch-job user sees: shard patterns checked before anything is built, progress / checkpoint /
end lines in train.log, time and epoch in metrics.jsonl, a finished run that exits (issue 19)."""
import pytest

import cosmos_fast.trainer as trainer_mod
from cosmos_fast.config import ConfigError
from cosmos_fast.data.synthetic import write_demo_data
from cosmos_fast.train import main as train_main
from cosmos_fast.trainer import Trainer
from test_run_safety import cli_args
from test_trainer import rows, small_cfg


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_demo_data(tmp_path_factory.mktemp("demo"), n_train=128, n_val=32, samples_per_shard=32, seed=1)


def test_missing_shards_fail_before_the_model_is_built(data, tmp_path, monkeypatch):
    def no_build(*a, **k):
        raise AssertionError("the model was built before the shard check")

    monkeypatch.setattr(trainer_mod, "create_model", no_build)
    pattern = str(tmp_path / "none-{0000..0003}.tar")
    with pytest.raises(ConfigError, match=r"data.train_shards = .*none-\{0000..0003\}.tar' matches 0 of 4 local files"):
        Trainer(small_cfg(data, f"data.train_shards={pattern}"), tmp_path / "run")
    assert not (tmp_path / "run").exists()                      # no run folder left behind
    partial = data["train"].replace("000003}", "000005}")       # 4 of 6 exist
    with pytest.raises(ConfigError, match="matches 4 of 6 local files; missing: .*train-000004.tar"):
        Trainer(small_cfg(data, f"data.train_shards={partial}", "data.num_workers=0"), tmp_path / "run")
    with pytest.raises(ConfigError, match="data.val_shards"):
        Trainer(small_cfg(data, f"data.val_shards={tmp_path / 'val.tar'}"), tmp_path / "run")


def test_missing_shards_cli_one_line(data, tmp_path, capsys):
    args = cli_args(data, tmp_path / "run", f"data.train_shards={tmp_path / 'x-{0..3}.tar'}")
    assert train_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "matches 0 of 4 local files" in err[0]


def test_progress_checkpoint_and_end_lines_in_train_log(data, tmp_path):
    t = Trainer(small_cfg(data, "train.max_steps=4", "train.log_every_steps=2", "train.save_every_steps=3"), tmp_path)
    t.train()
    t.close()
    text = (tmp_path / "train.log").read_text()
    assert "24 steps in the schedule; train.max_steps = 4: this run stops at step 4" in text
    for step in (2, 4):
        assert f"step {step}/4 (epoch 1): loss " in text
    assert "step 1/4" not in text and "step 3/4" not in text
    assert "ETA 0:" in text and "samples/s" in text
    assert f"checkpoint saved at step 3: {tmp_path / 'checkpoints' / 'epoch_latest.pt'}" in text
    assert "finished at step 4 of 4: 4 steps in" in text
    r = rows(tmp_path / "metrics.jsonl")
    assert [x["epoch"] for x in r] == [1, 1, 1, 1]
    times = [x["time"] for x in r]
    assert times == sorted(times) and times[-1] - times[0] < 600


def test_epoch_field_counts_epochs(data, tmp_path):
    t = Trainer(small_cfg(data, "train.max_steps=10", "train.log_every_steps=0"), tmp_path)   # 8 steps/epoch
    t.train()
    t.close()
    assert [x["epoch"] for x in rows(tmp_path / "metrics.jsonl")] == [1] * 8 + [2] * 2
    assert "step 8/10" not in (tmp_path / "train.log").read_text()                      # log_every_steps=0: off


def test_finished_run_says_so_and_exits(data, tmp_path, caplog):
    args = [*cli_args(data, tmp_path, "train.max_steps=2"), f"data.val_shards={data['val']}"]
    assert train_main(args) == 0
    metrics, evals = (tmp_path / "metrics.jsonl").read_text(), (tmp_path / "eval.jsonl").read_text()
    assert len(evals.splitlines()) == 1
    with caplog.at_level("INFO", logger="cosmos_fast"):
        assert train_main(args) == 0
    assert "already finished at step 2 of 2: nothing to do" in caplog.text
    assert (tmp_path / "metrics.jsonl").read_text() == metrics
    assert (tmp_path / "eval.jsonl").read_text() == evals                       # not evaluated again


def test_overwrite_leaves_one_tensorboard_run(data, tmp_path):
    pytest.importorskip("tensorboard")
    for _ in range(2):
        t = Trainer(small_cfg(data, "train.max_steps=1", "train.tensorboard=true", "train.auto_resume=false"),
                    tmp_path, overwrite=True)
        t.train()
        t.close()
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1
