"""``cosmos-fast`` command line.

    cosmos-fast demo [--output-dir DIR] [key=value ...]      the embedded default (CPU, a few minutes)
    cosmos-fast train --config PRESET_OR_YAML --output-dir DIR [--resume DIR_OR_FILE] [key=value ...]
    cosmos-fast eval --checkpoint PATH [--model student|teacher|both] --retrieval-root DIR --imagenet-val DIR
    cosmos-fast export --checkpoint RUN_OR_CHECKPOINT --output FILE    (the official single-file format)
    cosmos-fast make-shards --source dreamlip|pixelprose ... --output-dir DIR   (webdataset + DALI index)
    cosmos-fast make-demo-data --output-dir DIR [--n-train N] [--n-val N] [--seed S]

Without a command, ``demo`` runs.
"""
from __future__ import annotations

import argparse
import logging
import sys


def cmd_demo(args) -> int:
    from .config import ConfigError
    from .demo import run_demo

    try:
        run_demo(args.output_dir, args.overrides, seed=args.seed)
    except ConfigError as e:
        print(f"cosmos-fast demo: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_make_demo_data(args) -> int:
    from .data.synthetic import write_demo_data

    patterns = write_demo_data(args.output_dir, n_train=args.n_train, n_val=args.n_val,
                               samples_per_shard=args.samples_per_shard, seed=args.seed,
                               image_size=args.image_size)
    print(f"train shards: {patterns['train']}\nval shards:   {patterns['val']}")
    return 0


def cmd_export(args) -> int:
    from .export import export_checkpoint
    from .model.checkpoint import CheckpointMismatchError

    try:
        path = export_checkpoint(args.checkpoint, args.output, args.model_name, trust=args.trust_checkpoint)
    except (FileNotFoundError, ValueError, CheckpointMismatchError, OSError) as e:
        print(f"cosmos-fast export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def cmd_train(args) -> int:
    from .train import run_train

    return run_train(args)


def build_parser() -> argparse.ArgumentParser:
    from .train import add_train_args

    p = argparse.ArgumentParser(prog="cosmos-fast", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command")
    d = sub.add_parser("demo", help="train the tiny model on synthetic scenes on CPU (default)")
    d.add_argument("--output-dir", default="runs/demo")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("overrides", nargs="*", metavar="section.key=value")
    d.set_defaults(func=cmd_demo)
    t = add_train_args(sub.add_parser("train", help="train from a preset or YAML config"))
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("export", help="write a run's checkpoint as one official-format file")
    e.add_argument("--checkpoint", required=True, help="run folder, DeepSpeed tag folder or checkpoint file")
    e.add_argument("--output", required=True)
    e.add_argument("--model-name", default=None, help="model config name when the checkpoint lacks it")
    e.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle the checkpoint in full: such a file can run arbitrary code, so only for files "
                        "you trust (default: only tensors, plain containers and a few known types are read)")
    e.set_defaults(func=cmd_export)
    from .data.shards import add_make_shards_parser
    from .eval.cli import add_eval_parser

    add_eval_parser(sub)
    add_make_shards_parser(sub)
    m = sub.add_parser("make-demo-data", help="write the synthetic webdataset shards")
    m.add_argument("--output-dir", default="runs/demo/data")
    m.add_argument("--n-train", type=int, default=2048)
    m.add_argument("--n-val", type=int, default=128)
    m.add_argument("--samples-per-shard", type=int, default=256)
    m.add_argument("--image-size", type=int, default=128)
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=cmd_make_demo_data)
    return p


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("cosmos_fast").setLevel(logging.INFO)   # third-party INFO chatter stays quiet
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("demo", "train", "eval", "export", "make-shards", "make-demo-data", "-h", "--help"):
        argv = ["demo", *argv]
    if argv and argv[0] in ("demo", "train"):
        from .train import parse_with_overrides

        args = parse_with_overrides(parser, argv)
    else:
        args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
