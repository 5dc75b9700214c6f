"""The multicrop op: the fused Numba crop kernel vs torchvision's PIL ops, per image, one core.

    python benchmarks/bench_multicrop.py                      # 500×375 images, 2×224 + 6×96 crops
    python benchmarks/bench_multicrop.py --images 4 --size 160x120 --reps 1   # smoke test

Providers
  torchvision  :func:`cosmos_fast.reference.multicrop.reference_crop`: torchvision's functions on a PIL
               image, one by one, as ``MultiCropTransform`` calls them (the reference)
  numba        :func:`cosmos_fast.ops.multicrop.augment_crop`: the fused kernel (``kernels/multicrop.py``)

Inputs: synthetic scenes (:mod:`cosmos_fast.data.synthetic`) resized to ``--size``; each image's crop
parameters are drawn as the torchvision backend draws them (``FusedMultiCropTransform``, seeded per
image), so every op of §4.4 runs at its recipe rate. Before timing, every crop of the numba provider
is checked equal to torchvision's, bit for bit (the run stops on a difference; this also compiles the
kernel or loads it from Numba's cache). Then each provider makes all crops of all images, ``--reps``
times. Rows (time per image: median, p20, p80 in ms; images/s; ratio vs torchvision) go to
bench_results/multicrop/<device>_<date>_<sha>.csv.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import add_record_arg, env_info, save_results, time_fn  # noqa: E402
from cosmos_fast.data.recipe import PARAM_FIELDS  # noqa: E402
from cosmos_fast.data.synthetic import make_scene  # noqa: E402
from cosmos_fast.data.transforms import FusedMultiCropTransform, seeded  # noqa: E402
from cosmos_fast.ops import multicrop as multicrop_op  # noqa: E402
from cosmos_fast.reference import multicrop as multicrop_ref  # noqa: E402

PROVIDERS = ("torchvision", "numba")


def make_cases(n: int, size: tuple[int, int], global_size: int, local_size: int, n_local: int, seed: int = 0):
    """``n`` (PIL image, HWC array, [(params vector, crop size)] per crop) with the recipe's random draws."""
    rng = np.random.default_rng(seed)
    tf = FusedMultiCropTransform(global_size, local_size, n_local=n_local)
    cases = []
    for i in range(n):
        img = make_scene(rng, max(size))[0].resize(size, Image.BICUBIC).convert("RGB")
        crops = []
        with seeded(i):
            for comp in [tf.global1, tf.global2] + [tf.local] * n_local:
                p, crop_size = tf._params(comp, img)
                crops.append((np.array([p[f] for f in PARAM_FIELDS], dtype=np.float32), crop_size))
        cases.append((img, np.asarray(img), crops))
    return cases


def run_provider(provider: str, cases) -> list:
    if provider == "torchvision":
        return [multicrop_ref.reference_crop(img, p, s) for img, _, crops in cases for p, s in crops]
    return [multicrop_op.augment_crop(arr, p, s) for _, arr, crops in cases for p, s in crops]


def check_equal(cases) -> int:
    """Every numba crop equals torchvision's bit for bit; returns the number of crops compared."""
    want, got = run_provider("torchvision", cases), run_provider("numba", cases)
    for k, (a, b) in enumerate(zip(want, got)):
        if not np.array_equal(a, b):
            raise SystemExit(f"numba: crop {k} differs from torchvision's (max |diff| "
                             f"{np.abs(a - b).max():.3g}); not timing a wrong kernel")
    return len(want)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--size", default="500x375", help="image size WxH")
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--n-local", type=int, default=6)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the kernel runs on one core)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    add_record_arg(p)
    args = p.parse_args(argv)
    if not multicrop_op.numba_available():
        raise SystemExit("bench_multicrop needs numba (pip install numba)")

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    size = tuple(int(v) for v in args.size.lower().split("x"))
    cases = make_cases(args.images, size, args.global_size, args.local_size, args.n_local)
    n_crops = check_equal(cases)
    print(f"numba: {n_crops} crops equal torchvision's, bit for bit; {env_info(device)}")

    rows, base = [], None
    for prov in PROVIDERS:
        t = time_fn(lambda prov=prov: run_provider(prov, cases), device, warmup=args.warmup, reps=args.reps)
        per_image = {k: t[k] / args.images for k in ("median_s", "p20_s", "p80_s")}
        base = per_image["median_s"] if prov == "torchvision" else base
        rows.append({"bench": "multicrop", "provider": prov, "threads": args.threads, "image_size": args.size,
                     "crop_sizes": f"2x{args.global_size}+{args.n_local}x{args.local_size}", "images": args.images,
                     "warmup": args.warmup, "reps": args.reps,
                     "median_ms_per_image": round(1e3 * per_image["median_s"], 3),
                     "p20_ms_per_image": round(1e3 * per_image["p20_s"], 3),
                     "p80_ms_per_image": round(1e3 * per_image["p80_s"], 3),
                     "images_per_s": round(1.0 / per_image["median_s"], 2),
                     "ratio_vs_torchvision": round(base / per_image["median_s"], 3)})
    print(f"\n{'provider':12s} {'ms/image':>9s} {'p20':>8s} {'p80':>8s} {'images/s':>9s} {'× torchvision':>13s}")
    for r in rows:
        print(f"{r['provider']:12s} {r['median_ms_per_image']:9.3f} {r['p20_ms_per_image']:8.3f} "
              f"{r['p80_ms_per_image']:8.3f} {r['images_per_s']:9.1f} {r['ratio_vs_torchvision']:13.3f}")
    save_results("multicrop", rows, device, record_run=args.record,
                 case=("bench", "provider", "threads", "image_size", "crop_sizes", "images", "warmup", "reps"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
