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
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--list-presets", action="store_true", help="list the shipped presets and exit")
    p.add_argument("--help-config", action="store_true", help="list every config key and exit")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return p


def run_train(args) -> int:
    if args.list_presets:
        print("\n".join(list_presets()))
        return 0
    if args.help_config:
        for key, default, text in describe():
            print(f"{key:32s} {default:14s} {text}")
        return 0
    from .trainer import NonFiniteLossError, Preempted, Trainer

    try:
        cfg = load_config(args.config, args.overrides)
        trainer = Trainer(cfg, args.output_dir, resume=args.resume, local_rank=args.local_rank)
    except (ConfigError, FileNotFoundError) as e:
        print(f"cosmos-fast train: {e}", file=sys.stderr)
        return 2
    try:
        trainer.train()
        if cfg.data.val_shards:
            trainer.log_eval(trainer.evaluate())
        trainer.zero_shot_eval()
    except NonFiniteLossError as e:
        logging.getLogger("cosmos_fast").error("%s", e)
        return 3
    except Preempted as e:
        logging.getLogger("cosmos_fast").warning("%s", e)
        return 143
    finally:
        trainer.close()
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("cosmos_fast").setLevel(logging.INFO)   # third-party INFO chatter stays quiet
    parser = add_train_args(argparse.ArgumentParser(prog="cosmos_fast.train", description=__doc__.split("\n\n")[0]))
    return run_train(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
