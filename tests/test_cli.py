"""The ``cosmos-fast`` command line: help without torch, a bare command prints help, every option has a
help line, ``--print-config``, ``--help-config``, did-you-mean for config fields, and the README and
``--help`` carry the data layouts a user needs."""
import argparse
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from cosmos_fast import cli
from cosmos_fast.config import ConfigError, describe, load_config
from cosmos_fast.data.captions import DREAMLIP_FIELDS
from cosmos_fast.train import config_help, config_markdown
from cosmos_fast.train import main as train_main

REPO = Path(__file__).resolve().parents[1]


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0
    return capsys.readouterr().out


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action


def test_help_does_not_import_torch():
    """Importing the CLI, building its parser and rendering --help (top level and train) leaves torch
    unimported; the title is printed once, as plain text."""
    code = textwrap.dedent("""
        import contextlib, io, sys
        import cosmos_fast.cli as cli
        cli.build_parser()
        out = io.StringIO()
        for argv in (["--help"], ["train", "--help"], ["demo", "--help"]):
            with contextlib.redirect_stdout(out):
                try:
                    cli.main(argv)
                except SystemExit:
                    pass
        print(out.getvalue())
        print("TORCH_LOADED" if "torch" in sys.modules else "TORCH_ABSENT")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("TORCH_ABSENT"), r.stdout[-300:]
    top = r.stdout.split("usage: cosmos-fast train")[0]
    assert top.count(cli.DESCRIPTION) == 1 and "``" not in r.stdout


def test_bare_command_prints_help_and_demo_still_runs(monkeypatch, capsys, tmp_path):
    calls = []
    import cosmos_fast.demo

    monkeypatch.setattr(cosmos_fast.demo, "run_demo", lambda *a, **k: calls.append((a, k)))
    assert cli.main([]) == 0
    assert "usage: cosmos-fast" in capsys.readouterr().out and calls == []
    assert cli.main(["demo", "--output-dir", str(tmp_path), "optim.epochs=8"]) == 0
    assert calls == [((str(tmp_path), ["optim.epochs=8"]), {"seed": 0})]


def test_every_option_has_help():
    """Every option and positional of every sub-command (eval and make-shards fully built) has help text."""
    parser = cli.build_parser(full=tuple(cli._LAZY))
    missing = []
    for name, sub in _subparsers(parser).choices.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            if not action.help:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


def test_lazy_stubs_carry_the_real_help_lines():
    """The stubs registered for eval / make-shards show the same one-line help as the real parsers."""
    def lines(parser):
        return {a.dest: a.help for a in _subparsers(parser)._choices_actions}
    assert lines(cli.build_parser()) == lines(cli.build_parser(full=tuple(cli._LAZY)))


def test_eval_help_lists_the_data_layouts(capsys):
    out = _help(["eval", "--help"], capsys)
    for needle in ("coco/annotations/captions_val2017.json", "coco/images/val2017", "flickr30k_val.json",
                   "<wnid>/*.JPEG", "ClassName.txt"):
        assert needle in out, needle


def test_make_shards_help_lists_the_csv_columns(capsys):
    out = _help(["make-shards", "--help"], capsys)
    for column in ("Image Path", *DREAMLIP_FIELDS, "original_caption", "vlm_caption"):
        assert column in out, column


def test_train_help_says_what_no_flags_mean(capsys):
    out = " ".join(_help(["train", "--help"], capsys).split())
    assert "--config tiny-cpu --output-dir runs/train" in out and "auto_resume" in out


@pytest.mark.parametrize("entry", ["cosmos-fast", "python -m cosmos_fast.train"])
def test_print_config_resolves_preset_and_overrides(entry, tmp_path, capsys):
    """--print-config prints the preset plus overrides as YAML, exits 0 and creates no run folder."""
    argv = ["--config", "cc3m-vitb16", "--output-dir", str(tmp_path / "run"), "--print-config",
            "optim.lr=1e-3", "data.batch_size=8"]
    rc = cli.main(["train", *argv]) if entry == "cosmos-fast" else train_main(argv)
    assert rc == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    want = load_config("cc3m-vitb16", ["optim.lr=1e-3", "data.batch_size=8"]).to_dict()
    assert printed == want and printed["optim"]["lr"] == 1e-3 and printed["data"]["batch_size"] == 8
    assert printed["data"]["train_num_samples"] != describe_default("data.train_num_samples")   # the preset's value
    assert not (tmp_path / "run").exists()


def describe_default(key):
    return next(eval(default) for k, default, _ in describe() if k == key)


def test_print_config_bad_value_is_one_line_exit_2(capsys):
    assert cli.main(["train", "--print-config", "optim.lr=fast"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "optim.lr" in err and "'fast'" in err


def test_help_config_columns_align_on_the_longest_key():
    text = config_help()
    rows = describe()
    starts = set()
    for line, (key, default, meaning) in zip(text.splitlines()[1:], rows):
        assert line.startswith(key)
        starts.add(line.index(default, len(key)))
        starts.add(line.rindex(meaning) if meaning else -1)
    longest = max(len(k) for k, _, _ in rows)
    assert len(starts - {-1}) == 2 and min(starts - {-1}) == longest + 2


@pytest.mark.parametrize("override,expect", [
    ("optim.learning_rate=1", r"did you mean 'lr'\?"),          # abbreviation: initials
    ("optim.wd=0.1", r"did you mean 'weight_decay'\?"),         # the reverse
    ("data.batch_sise=4", r"did you mean 'batch_size'\?"),      # spelling (difflib)
    ("optim.clip_grad=1", r"did you mean 'grad_clip_norm'\?"),   # the one option sharing most words
    ("model.colour=1", r"; known: name, pool_impl, loss_impl, loss_operands, loss_workspace_mb, attention,"
     r" grad_checkpointing, truncate_captions$"),  # no match
    ("optim.lr_decay_epochs=1", r"; known: lr, beta1"),         # ties between shared words: the list
])
def test_unknown_field_suggests_or_lists(override, expect):
    with pytest.raises(ConfigError, match=expect):
        load_config(None, [override])


def test_readme_and_messages_do_not_cite_a_missing_file():
    """README and user-facing messages cite behaviour, not cosmos_method.md (not in the repository)."""
    assert not (REPO / "cosmos_method.md").exists() and not (REPO / "docs" / "cosmos_method.md").exists()
    readme = (REPO / "README.md").read_text()
    assert "cosmos_method" not in readme
    cfg = load_config("tiny-cpu", ["data.num_workers=64"])
    from cosmos_fast.trainer import check_config

    with pytest.raises(ConfigError, match="every worker needs a shard") as exc:
        check_config(cfg, world_size=1, cuda=False)
    assert "cosmos_method" not in str(exc.value)
    help_text = " ".join(t for _, _, t in describe())
    assert "cosmos_method" not in help_text


def _words(path: Path) -> str:
    return " ".join(path.read_text().split())


def test_readmes_document_eval_layouts_csv_columns_and_train_defaults():
    """The README says what no flags mean; the eval layouts and make-shards columns it moved to the
    eval and data folder READMEs, which it links."""
    readme = _words(REPO / "README.md")
    for needle in ("--config tiny-cpu --output-dir runs/train", "--print-config",
                   "`cosmos-fast` without a command prints its help",
                   "cosmos_fast/eval/README.md", "cosmos_fast/data/README.md"):
        assert needle in readme, needle
    eval_readme = _words(REPO / "cosmos_fast" / "eval" / "README.md")
    for needle in ("coco/annotations/captions_val2017.json", "flickr30k-images/flickr30k_val.json",
                   "SUN397/ClassName.txt"):
        assert needle in eval_readme, needle
    data_readme = _words(REPO / "cosmos_fast" / "data" / "README.md")
    for needle in ("`Image Path`", *(f"`{f}`" for f in DREAMLIP_FIELDS)):
        assert needle in data_readme, needle


STALE = "stale: regenerate with `cosmos-fast train --help-config --markdown > cosmos_fast/configs/README.md`"


def test_config_reference_is_generated_from_the_dataclasses():
    """cosmos_fast/configs/README.md is exactly what --help-config --markdown prints now."""
    committed = (REPO / "cosmos_fast" / "configs" / "README.md").read_text()
    assert committed == config_markdown(), STALE


def test_help_config_markdown_prints_one_row_per_key(capsys):
    """Both entry points print the markdown reference: a heading per section, then one table row per
    describe() key with its default and meaning; --markdown alone is a one-line error."""
    assert cli.main(["train", "--help-config", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert train_main(["--help-config", "--markdown"]) == 0
    assert capsys.readouterr().out == out == config_markdown()
    rows = re.findall(r"^\| `([a-z_]+\.[a-z_0-9]+)` \| `(.*?)` \| (.*) \|$", out, re.M)
    assert rows == [tuple(r) for r in describe()]
    sections = re.findall(r"^## (\w+)$", out, re.M)
    assert sections == list(dict.fromkeys(k.split(".")[0] for k, _, _ in describe()))
    assert cli.main(["train", "--markdown"]) == 2
    assert "--help-config" in capsys.readouterr().err


def test_config_markdown_escapes_pipes():
    text = config_markdown([("data.x", "'a|b'", "one | two")])
    assert "| `data.x` | `'a\\|b'` | one \\| two |" in text.splitlines()


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", path.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("readme", ["README.md", "cosmos_fast/README.md", "cosmos_fast/data/README.md",
                                    "cosmos_fast/eval/README.md", "examples/README.md", "kernels/README.md",
                                    "benchmarks/README.md"])
def test_readme_relative_links_point_to_existing_files(readme):
    """Every relative markdown link (``[text](path#fragment)``) names an existing file or folder, a
    fragment names a heading of that file (GitHub's anchor rule), and the README stays within 150 lines."""
    path = REPO / readme
    targets = [t for t in LINK.findall(path.read_text()) if not re.match(r"[a-z]+:", t)]
    assert targets, f"{readme} links nothing"
    missing = []
    for target in targets:
        file, _, fragment = target.partition("#")
        linked = path.parent / file if file else path
        if not linked.exists():
            missing.append(target)
        elif fragment and fragment not in _anchors(linked):
            missing.append(target)
    assert missing == [], f"{readme}: links to missing files or headings {missing}"
    if readme == "README.md":
        assert len(path.read_text().splitlines()) <= 150
