"""``python -m cosmos_fast.train --config PRESET_OR_YAML --output-dir DIR [--resume DIR_OR_FILE] [key=value ...]``

Also reachable as ``cosmos-fast train``. Presets ship in ``cosmos_fast/configs`` (``--list-presets``);
``--help-config`` prints every config key with its default and meaning.
"""
from __future__ import annotations

import argparse
import logging
import sys

from .config import ConfigError, describe, list_presets, load_config


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
    p.add_argument("--help-config", action="store_true", help="list every config key and exit")
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


def run_train(args) -> int:
    if args.list_presets:
        print("\n".join(list_presets()))
        return 0
    if args.help_config:
        for key, default, text in describe():
            print(f"{key:32s} {default:14s} {text}")
        return 0
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
    parser = add_train_args(argparse.ArgumentParser(prog="cosmos_fast.train", description=__doc__.split("\n\n")[0]))
    return run_train(parse_with_overrides(parser, argv))


if __name__ == "__main__":
    sys.exit(main())
