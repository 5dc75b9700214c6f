"""``cosmos-fast`` command line.

    cosmos-fast demo [--steps N] [--batch-size B] [--output-dir DIR]

``demo`` is the embedded default: a CPU smoke run of the full COSMOS step on the ``tiny`` model
(2 global + 6 local crops of random images, 8 captions tokenised with open_clip's tokenizer per
sample, student + EMA teacher + COSMOS loss + AdamW), with a progress bar showing samples/s, then
an official-format checkpoint written and read back.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("cosmos_fast")


def _demo_batch(batch_size: int, global_size: int, local_size: int, gen: torch.Generator):
    import open_clip

    tok = open_clip.get_tokenizer("ViT-B-16")
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    shapes = ["circle", "square", "triangle", "star"]
    crops = [torch.randn(batch_size, 3, global_size, global_size, generator=gen) for _ in range(2)]
    crops += [torch.randn(batch_size, 3, local_size, local_size, generator=gen) for _ in range(6)]
    caps = []
    for k in range(8):                      # caption-major: rows k·B .. (k+1)·B-1 = caption k
        for b in range(batch_size):
            c = colours[(b + k) % len(colours)]
            s = shapes[(b * 3 + k) % len(shapes)]
            caps.append(f"a {c} {s} on a textured background" if k < 2 else f"a {c} {s}")
    return crops, tok(caps)


def cmd_demo(args) -> int:
    from tqdm import tqdm

    from . import CosmosLoss, build_teacher, create_model, load_checkpoint, save_checkpoint
    from .ema import MomentumSchedule
    from .optim import build_adamw
    from .step import cosmos_train_step

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    student = create_model("tiny")
    teacher = build_teacher(student)
    loss_fn = CosmosLoss()
    opt = build_adamw(student, lr=args.lr)
    momentum = MomentumSchedule(args.momentum)
    size = student.cfg.vision_cfg.image_size
    crops, captions = _demo_batch(args.batch_size, size, size // 2, gen)
    n_params = sum(p.numel() for p in student.parameters())
    print(f"cosmos-fast demo: tiny COSMOS model, {n_params / 1e6:.2f}M parameters, batch {args.batch_size}, "
          f"crops 2×{size}px + 6×{size // 2}px, 8 captions/sample, {args.steps} steps on CPU")
    t0 = time.perf_counter()
    first = None
    bar = tqdm(range(args.steps), desc="demo", unit="step", file=sys.stdout, dynamic_ncols=True)
    for step in bar:
        losses = cosmos_train_step(student, teacher, loss_fn, opt, crops, captions, momentum(step))
        first = first if first is not None else {k: float(v) for k, v in losses.items()}
        sps = args.batch_size * (step + 1) / (time.perf_counter() - t0)
        bar.set_postfix(loss=f"{float(losses['loss']):.4f}", clip=f"{float(losses['clip_loss']):.4f}",
                        distill=f"{float(losses['distill_loss']):.4f}", samples_s=f"{sps:.1f}")
    last = {k: float(v) for k, v in losses.items()}
    if not all(math.isfinite(v) for v in last.values()):
        print(f"demo failed: non-finite loss {last}", file=sys.stderr)
        return 1
    out = Path(args.output_dir)
    path = save_checkpoint(out / "epoch_1.pt", student, teacher, epoch=1, name="demo")
    reloaded = create_model("tiny")
    load_checkpoint(path, reloaded, which="teacher")
    same = all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), teacher.state_dict().values()))
    print(f"loss {first['loss']:.4f} -> {last['loss']:.4f} (clip {last['clip_loss']:.4f}, "
          f"distill {last['distill_loss']:.4f}); checkpoint {path} written and reloaded "
          f"({'teacher weights identical' if same else 'MISMATCH'})")
    return 0 if same else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cosmos-fast", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command")
    d = sub.add_parser("demo", help="CPU smoke run of the COSMOS step on the tiny model (default)")
    d.add_argument("--steps", type=int, default=20)
    d.add_argument("--batch-size", type=int, default=8)
    d.add_argument("--lr", type=float, default=5e-4)
    d.add_argument("--momentum", type=float, default=0.999)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--output-dir", default="runs/demo")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["demo", *(argv or [])])
    for name in ("steps", "batch_size"):
        if getattr(args, name, 1) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
