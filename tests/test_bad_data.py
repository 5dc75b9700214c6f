"""Untrusted shard lists: ``data.allow_pipe`` in the config, and the README's documentation of the
data keys (the loaders' own bad-data tests are in test_loader.py, test_dali.py and test_shards.py)."""
import re
from pathlib import Path

import pytest

from cosmos_fast.config import ConfigError, describe, load_config, validate

SHARDS = "/data/train-{000000..000007}.tar"


@pytest.mark.parametrize("field,value", [
    ("train_shards", f"pipe:cat {SHARDS}"),
    ("train_shards", f"{SHARDS}:: PIPE:curl -s http://x/{{0..7}}.tar"),   # one source of two, any case
    ("train_shards", "s3://bucket/{000000..000007}.tar"),
    ("val_shards", "pipe:cat /data/val.tar"),
], ids=["pipe", "pipe-in-second-source", "s3", "val-shards"])
def test_allow_pipe_false_refuses_shell_urls_at_start(field, value):
    overrides = [f"data.train_shards={SHARDS}", f"data.{field}='{value}'"]
    validate(load_config("tiny-cpu", overrides), cuda=False)             # default true: webdataset's behaviour
    with pytest.raises(ConfigError, match=f"data.{field} URL .* but data.allow_pipe is false") as e:
        validate(load_config("tiny-cpu", overrides + ["data.allow_pipe=false"]), cuda=False)
    assert "pipe:" in str(e.value) or "s3://" in str(e.value)
    validate(load_config("tiny-cpu", [f"data.train_shards={SHARDS}", "data.allow_pipe=false"]), cuda=False)


def test_readme_lists_every_config_key_as_help_config_prints_it():
    """The README's config-keys table equals ``describe()`` (what --help-config prints), row for row."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = {m.group(1): (m.group(2), m.group(3))
            for m in re.finditer(r"^\| `([a-z_]+\.[a-z_0-9]+)` \| `(.*?)` \| (.*) \|$", readme, re.M)}
    want = {key: (default, text) for key, default, text in describe()}
    assert {k: v for k, v in rows.items() if k.split(".")[0] in {k2.split(".")[0] for k2 in want}} == want
    assert "pipe:CMD" in readme and "data.allow_pipe=false" in readme
