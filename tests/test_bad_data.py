"""Untrusted shard lists: ``data.allow_pipe`` in the config, and the READMEs' warning about shell
URLs (the loaders' own bad-data tests are in test_loader.py, test_dali.py and test_shards.py)."""
from pathlib import Path

import pytest

from cosmos_fast.config import ConfigError, load_config
from cosmos_fast.trainer import check_config

SHARDS = "/data/train-{000000..000007}.tar"


@pytest.mark.parametrize("field,value", [
    ("train_shards", f"pipe:cat {SHARDS}"),
    ("train_shards", f"{SHARDS}:: PIPE:curl -s http://x/{{0..7}}.tar"),   # one source of two, any case
    ("train_shards", "s3://bucket/{000000..000007}.tar"),
    ("val_shards", "pipe:cat /data/val.tar"),
], ids=["pipe", "pipe-in-second-source", "s3", "val-shards"])
def test_allow_pipe_false_refuses_shell_urls_at_start(field, value):
    overrides = [f"data.train_shards={SHARDS}", f"data.{field}='{value}'"]
    check_config(load_config("tiny-cpu", overrides), cuda=False)             # default true: webdataset's behaviour
    with pytest.raises(ConfigError, match=f"data.{field} URL .* but data.allow_pipe is false") as e:
        check_config(load_config("tiny-cpu", overrides + ["data.allow_pipe=false"]), cuda=False)
    assert "pipe:" in str(e.value) or "s3://" in str(e.value)
    check_config(load_config("tiny-cpu", [f"data.train_shards={SHARDS}", "data.allow_pipe=false"]), cuda=False)


def test_readmes_warn_that_shell_urls_run_commands():
    """README and the data README say that a ``pipe:CMD`` shard URL runs a shell command and how to
    refuse it (the config reference itself is checked in test_cli.py)."""
    repo = Path(__file__).resolve().parents[1]
    for readme in (repo / "README.md", repo / "cosmos_fast" / "data" / "README.md"):
        text = readme.read_text()
        assert "pipe:CMD" in text and "data.allow_pipe=false" in text, readme
