"""``python -m cosmos_fast.train [--config PRESET_OR_YAML] [--output-dir DIR] [--resume DIR_OR_FILE] [key=value ...]``

Also reachable as ``cosmos-fast train``. Presets ship in ``cosmos_fast/configs`` (``--list-presets``);
``--help-config`` prints every config key with its default and meaning, ``--print-config`` the
resolved config of a preset plus overrides. Without flags: ``--config tiny-cpu --output-dir
runs/train``, continuing that folder's newest complete checkpoint (``train.auto_resume``).
"""
from __future__ import annotations

import argparse
import logging
import sys

from .config import ConfigError, describe, list_presets, load_config


TRAIN_DESCRIPTION = """\
Train COSMOS from a preset or a YAML config. Without flags, 'cosmos-fast train' means
'--config tiny-cpu --output-dir runs/train', and continues the newest complete checkpoint in the
output folder if there is one (train.auto_resume)."""

TRAIN_EPILOG = """\
examples:
  cosmos-fast train --config cc3m-vitb16 --output-dir runs/cc3m data.train_shards='/data/cc3m/{0000..0575}.tar'
  cosmos-fast train --config cc3m-vitb16 --print-config optim.lr=1e-3     # the resolved YAML, no run
  cosmos-fast train --help-config                                          # every config key"""


def add_train_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--config", default="tiny-cpu", help=f"preset name ({', '.join(list_presets())}) or a YAML path")
    p.add_argument("--output-dir", default="runs/train", help="run folder (checkpoints, metrics.jsonl, tb/)")
    p.add_argument("--resume", default=None, help="run folder or checkpoint file to continue from")
    p.add_argument("--overwrite", action="store_true",
                   help="delete another run's outputs (metrics, checkpoints, tb/) in --output-dir and start anew")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even when the config changes what exact resume depends on (batch, data, seed, "
                        "schedule lengths, world size)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load checkpoint files with full unpickling: such a file can run arbitrary code, so only "
                        "for files you trust (default: only tensors and plain containers are read)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--list-presets", action="store_true", help="list the shipped presets and exit")
    p.add_argument("--help-config", action="store_true",
                   help="list every config key with its built-in default and meaning, and exit")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (--config plus overrides) as YAML and exit without training")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides (anywhere on the line; numbers as you write them, e.g. optim.lr=5e-4)")
    return p


def parse_with_overrides(parser: argparse.ArgumentParser, argv):
    """parse_args that accepts ``key=value`` overrides anywhere on the line (also after options)."""
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if rest:
        args.overrides = [*getattr(args, "overrides", []), *rest]
    return args


def config_help(rows=None) -> str:
    """The ``--help-config`` table: key, built-in default, meaning; columns as wide as their longest entry."""
    rows = describe() if rows is None else rows
    wk = max(len("key"), *(len(k) for k, _, _ in rows))
    wd = max(len("default"), *(len(d) for _, d, _ in rows))
    lines = [f"{'key':{wk}s}  {'default':{wd}s}  meaning"]
    lines += [f"{k:{wk}s}  {d:{wd}s}  {t}" for k, d, t in rows]
    lines.append("(built-in defaults; a preset's values: --config PRESET --print-config)")
    return "\n".join(lines)


def _info(args) -> int | None:
    """--list-presets, --help-config, --print-config: print and return the exit status; None otherwise."""
    if args.list_presets:
        print("\n".join(list_presets()))
        return 0
    if args.help_config:
        print(config_help())
        return 0
    if getattr(args, "print_config", False):
        import yaml

        try:
            cfg = load_config(args.config, args.overrides)
        except ConfigError as e:
            print(f"cosmos-fast train: {e}", file=sys.stderr)
            return 2
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    return None


def run_train(args) -> int:
    rc = _info(args)
    if rc is not None:
        return rc
    from .model.checkpoint import CheckpointMismatchError
    from .trainer import ConfigChangeError, NonFiniteLossError, Preempted, RunFolderError, Trainer

    log = logging.getLogger("cosmos_fast")
    try:
        cfg = load_config(args.config, args.overrides)
        trainer = Trainer(cfg, args.output_dir, resume=args.resume, local_rank=args.local_rank,
                          overwrite=args.overwrite, allow_config_change=args.allow_config_change,
                          trust_checkpoint=args.trust_checkpoint)
    except (ConfigError, FileNotFoundError, RunFolderError, ConfigChangeError, CheckpointMismatchError,
            ValueError, OSError) as e:
        print(f"cosmos-fast train: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cosmos-fast train: interrupted while starting", file=sys.stderr)
        return 130
    if trainer.finished:                      # a finished run is not trained or evaluated again
        log.info("%s already finished at step %d of %d: nothing to do (to train further raise train.max_steps, "
                 "or optim.epochs with --allow-config-change; --overwrite starts anew)",
                 args.output_dir, trainer.step, trainer.target_steps)
        trainer.close()
        return 0
    try:
        trainer.train()
        if cfg.data.val_shards:
            trainer.log_eval(trainer.evaluate())
        trainer.zero_shot_eval()
    except NonFiniteLossError as e:
        log.error("%s", e)
        return 3
    except Preempted as e:
        log.warning("%s", e)
        return 128 + int(e.signum)
    except KeyboardInterrupt:
        log.warning("interrupted (second Ctrl-C) at step %d; not saved since the last checkpoint", trainer.step)
        return 130
    except OSError as e:              # e.g. a full disk (ENOSPC) while writing a checkpoint or metrics
        log.error("cosmos-fast train: %s", e)
        return 2
    finally:
        trainer.close()
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("cosmos_fast").setLevel(logging.INFO)   # third-party INFO chatter stays quiet
    parser = add_train_args(argparse.ArgumentParser(prog="python -m cosmos_fast.train", description=TRAIN_DESCRIPTION,
                                                    epilog=TRAIN_EPILOG,
                                                    formatter_class=argparse.RawDescriptionHelpFormatter))
    return run_train(parse_with_overrides(parser, argv))


if __name__ == "__main__":
    sys.exit(main())
