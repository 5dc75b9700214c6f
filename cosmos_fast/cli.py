"""The ``cosmos-fast`` command line: one sub-command per job (demo, train, eval, export, make-shards,
make-demo-data).

Building the parser imports neither torch nor the data stack, so ``--help`` is instant: ``eval`` and
``make-shards`` define their options in modules that import torch, and are registered as stubs
(name and one-line help) until one of them is the command being run.
"""
from __future__ import annotations

import argparse
import logging
import sys

from .config import TRUST_CHECKPOINT_HELP, ConfigError

# The sub-commands import their modules when they run: those import torch, and `cosmos-fast --help`
# must not (tests/test_cli.py).


def cmd_demo(args) -> int:
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
    print(f"train shards: {patterns['train']}\nval shards:   {patterns['val']}\n"
          f"val segmentation set (VOC layout): {patterns['val_seg']}")
    return 0


def cmd_export(args) -> int:
    from .export import export_checkpoint
    from .model.checkpoint import CheckpointMismatchError

    try:
        path = export_checkpoint(args.checkpoint, args.output, args.model_name, trust=args.trust_checkpoint)
    except (FileNotFoundError, ValueError, KeyError, TypeError, CheckpointMismatchError, OSError) as e:
        print(f"cosmos-fast export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def cmd_train(args) -> int:
    from .train import run_train

    return run_train(args)


DESCRIPTION = "cosmos-fast: train, evaluate and export COSMOS CLIP models (CVPR 2025)."

EPILOG = """\
commands:
  cosmos-fast demo [--output-dir DIR] [key=value ...]       the tiny model on synthetic scenes (CPU, minutes)
  cosmos-fast train [--config PRESET_OR_YAML] [--output-dir DIR] [--resume DIR_OR_FILE] [key=value ...]
  cosmos-fast train --print-config [--config PRESET_OR_YAML] [key=value ...]   the resolved config, no run
  cosmos-fast eval --checkpoint PATH --retrieval-root DIR | --imagenet-val DIR | --sun397-root DIR
                   | --segmentation-root DIR
  cosmos-fast export --checkpoint RUN_OR_CHECKPOINT --output FILE   (the official single-file format)
  cosmos-fast make-shards --captions CSV --images DIR --output-dir DIR   (webdataset + DALI index)
  cosmos-fast make-demo-data --output-dir DIR [--n-train N] [--n-val N] [--seed S]

'cosmos-fast COMMAND --help' describes a command's options."""

# Eval data layouts (cosmos_fast/eval/datasets.py, seg_datasets.py), appended to the eval epilog.
EVAL_LAYOUTS = """\
data layouts (ROOT = --retrieval-root):
  coco, official split:   ROOT/coco/annotations/captions_val2017.json (COCO API) and
                          ROOT/coco/images/val2017/<file_name>
  coco, karpathy split:   ROOT/coco/annotations/coco_karpathy_test.json (list of {image, caption}; images
                          ROOT/coco/images/<image>) or Karpathy's dataset_coco.json (split == "test")
  flickr30k:              ROOT/flickr30k-images/flickr30k_val.json (official) or flickr30k_test.json
                          (karpathy): a list of {image: "flickr30k-images/<id>.jpg", caption: [5 strings]}
  imagenet (--imagenet-val DIR):  DIR/<wnid>/*.JPEG (or DIR/val_images/, DIR/data/val_images/); 1000
                          class folders get open_clip's names, others need --imagenet-classnames FILE
  sun397 (--sun397-root DIR):     DIR/SUN397/ClassName.txt and DIR/SUN397/<letter>/<class>[/<sub>]/*.jpg
                          (torchvision's layout; DIR may be SUN397 itself; a seeded 19,850-image subset)
  segmentation (--segmentation-root DIR): the benchmarks' standard releases under DIR (VOCdevkit/VOC2012,
                          VOCdevkit/VOC2010, coco_stuff164k, cityscapes, ade), as cosmos_fast/eval/seg_datasets.py
                          reads them"""

# Commands whose options are defined in modules that import torch: (module, adder, one-line help).
# Until one of them is the command being run, the parser holds a stub with the same help line.
_LAZY = {
    "eval": ("cosmos_fast.eval.cli", "add_eval_parser",
             "zero-shot retrieval / classification / segmentation of a checkpoint"),
    "make-shards": ("cosmos_fast.data.shards", "add_make_shards_parser",
                    "write webdataset shards + DALI indexes from DreamLIP / PixelProse captions and images, "
                    "or index existing shards"),
}


def _add_lazy(sub, name: str, full: bool) -> None:
    import importlib

    module, adder, help_ = _LAZY[name]
    if not full:
        sub.add_parser(name, help=help_, add_help=False)   # never parses: main() builds the full one
        return
    p = getattr(importlib.import_module(module), adder)(sub)
    if name == "eval":
        p.epilog = f"{p.epilog or ''}\n\n{EVAL_LAYOUTS}".lstrip()
        p.formatter_class = argparse.RawDescriptionHelpFormatter


def build_parser(full: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """The ``cosmos-fast`` parser. ``full`` names the torch-importing commands (``eval``,
    ``make-shards``) to register with their options; the others get a stub (name and help only)."""
    from .train import TRAIN_DESCRIPTION, TRAIN_EPILOG, add_train_args

    p = argparse.ArgumentParser(prog="cosmos-fast", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    d = sub.add_parser("demo", help="train the tiny model on synthetic scenes on CPU and report retrieval and "
                                    "segmentation",
                       description="Write a synthetic data set, train the tiny model with the tiny-cpu preset, "
                                   "evaluate retrieval and the teacher's zero-shot segmentation of the held-out "
                                   "scenes before and after, write metrics.json, demo.png and segmentation.png.")
    d.add_argument("--output-dir", default="runs/demo", help="run folder (data/, checkpoints, metrics.json, "
                   "demo.png, segmentation.png; default runs/demo)")
    d.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and the run (default 0)")
    d.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides on top of the tiny-cpu preset (e.g. optim.epochs=8)")
    d.set_defaults(func=cmd_demo)
    t = add_train_args(sub.add_parser("train", help="train from a preset or YAML config",
                                      description=TRAIN_DESCRIPTION, epilog=TRAIN_EPILOG,
                                      formatter_class=argparse.RawDescriptionHelpFormatter))
    t.set_defaults(func=cmd_train)
    _add_lazy(sub, "eval", "eval" in full)
    e = sub.add_parser("export", help="write a run's checkpoint as one official-format file")
    e.add_argument("--checkpoint", required=True,
                   help="run folder or its checkpoints/ folder (the newest complete checkpoint), DeepSpeed tag "
                        "folder or checkpoint file")
    e.add_argument("--output", required=True, help="the single official-format .pt file to write")
    e.add_argument("--model-name", default=None, help="model config name when the checkpoint lacks it")
    e.add_argument("--trust-checkpoint", action="store_true", help=TRUST_CHECKPOINT_HELP)
    e.set_defaults(func=cmd_export)
    _add_lazy(sub, "make-shards", "make-shards" in full)
    m = sub.add_parser("make-demo-data", help="write the synthetic webdataset shards",
                       description="Write the demo's synthetic scenes as webdataset shards (train-*.tar, val-*.tar) "
                                   "and the held-out images' label maps in a VOC layout (val_seg/).")
    m.add_argument("--output-dir", default="runs/demo/data", help="where the shards go (default runs/demo/data)")
    m.add_argument("--n-train", type=int, default=2048, help="training samples (default 2048)")
    m.add_argument("--n-val", type=int, default=128, help="held-out retrieval samples (default 128)")
    m.add_argument("--samples-per-shard", type=int, default=256, help="samples per tar (default 256)")
    m.add_argument("--image-size", type=int, default=128, help="image side in px (default 128)")
    m.add_argument("--seed", type=int, default=0, help="seed of the drawn scenes and captions (default 0)")
    m.set_defaults(func=cmd_make_demo_data)
    return p


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("cosmos_fast").setLevel(logging.INFO)   # third-party INFO chatter stays quiet
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(full=tuple(argv[:1]) if argv and argv[0] in _LAZY else ())
    if not argv:                              # no command: say what there is (the demo is 'cosmos-fast demo')
        parser.print_help()
        return 0
    if argv[0] in ("demo", "train"):
        from .train import parse_with_overrides

        args = parse_with_overrides(parser, argv)
    else:
        args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
