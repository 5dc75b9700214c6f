"""Data pipeline throughput: DALI vs torchvision multi-crop loaders on the same shards, same run.

    python benchmarks/bench_data.py                              # CPU: 2 threads / 2 workers
    python benchmarks/bench_data.py --device cuda --batch-size 256 --images 2048   # GPU (DALI mixed decode)

Shards of synthetic photos (JPEG, 500×375 by default, with DreamLIP json) are written with the shard
writer (validated DALI indexes). Providers:

* ``torchvision``: :class:`WebDatasetLoader` with ``--threads`` worker processes (1 torch thread each),
  torchvision's PIL ops (``augment="torchvision"``);
* ``torchvision-fused``: the same loader with ``augment="fused"`` (the same crops from the Numba kernel;
  its first batch is checked equal to ``torchvision``'s, bit for bit, before timing);
* ``dali``: :class:`DaliWebDatasetLoader` with ``--threads`` DALI threads, ``hue_mode="exact"`` (the
  default: on the CPU, with numba, one fused kernel per crop that equals torchvision's crops bit for
  bit, :mod:`cosmos_fast.ops.multicrop`; on the GPU the operator graph);
* ``dali-float-hue``: ``hue_mode="float"`` (the HSV shift in DALI arithmetic, as on the GPU);
* ``dali-linear-hue``: ``hue_mode="linear"`` (``fn.hsv``; approximate hue).

Every loader yields the full COSMOS batch (2×224 + 6×96 crops, 8 tokenised captions per sample). First,
on the CPU, the ``dali`` pipeline's crops of 8 images are checked equal, bit for bit, to torchvision's
crops made with the random parameters DALI drew (the same JPEGs decoded by PIL); each provider's batch
layout is checked against the torchvision one; then each is timed over
``--steps`` batches after the first batch (start-up — pipeline build, worker spawn, first shuffle
buffer fill — is reported separately) and ``--warmup`` more (what was prefetched meanwhile),
``--reps`` times, providers interleaved so that load from other jobs on the machine hits all of them
alike. Rows (images/s and crops/s: median, p20, p80; ratio to
torchvision) go to bench_results/data/<device>_<date>_<sha>.csv.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import add_record_arg, env_info, save_results  # noqa: E402
from cosmos_fast.data import dali_multicrop  # noqa: E402
from cosmos_fast.data.dali_loader import DaliWebDatasetLoader  # noqa: E402
from cosmos_fast.data.recipe import PARAM_FIELDS  # noqa: E402
from cosmos_fast.data.shards import ShardWriter, index_path  # noqa: E402
from cosmos_fast.data.stream import StreamSpec  # noqa: E402
from cosmos_fast.data.synthetic import make_scene  # noqa: E402
from cosmos_fast.data.torchvision_loader import WebDatasetLoader  # noqa: E402
from cosmos_fast.reference import multicrop as multicrop_ref  # noqa: E402

N_CROPS = 8


def write_bench_shards(out_dir: Path, n: int, per_shard: int, size: tuple[int, int], seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    writer = ShardWriter(out_dir, "bench", max_count=per_shard)
    for i in range(n):
        img, rec = make_scene(rng, max(size))
        img = img.resize(size, Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        writer.write(f"{i:08d}", buf.getvalue(), "jpg", rec)
    return [str(p) for p in writer.close()]


def make_spec(shards, batch, steps, threads) -> StreamSpec:
    return StreamSpec(shards=shards, batch_size=batch, seed=0, rank=0, world=1, num_workers=threads,
                      steps_per_epoch=steps, resampled=False, shuffle_buffer=4 * batch, shuffle_initial=batch,
                      caption_mode="textcrop", num_captions=8, string_fields="split", global_size=224,
                      local_size=96, n_local=6, crop_scale=0.4, tokenizer_name="ViT-B-16", context_length=77)


def make_loader(provider: str, spec: StreamSpec, device: str):
    if provider == "torchvision":
        return WebDatasetLoader(dataclasses.replace(spec, augment="torchvision"))
    if provider == "torchvision-fused":
        return WebDatasetLoader(dataclasses.replace(spec, augment="fused"))
    hue = {"dali-linear-hue": "linear", "dali-float-hue": "float"}.get(provider, "exact")
    return DaliWebDatasetLoader(spec, device=device, num_threads=spec.num_workers, hue_mode=hue)


def measure(provider, spec, device, steps, warmup) -> dict:
    """Start-up time (to the first batch) and steady-state seconds for ``steps`` batches, timed after
    ``warmup`` more batches have drained what the loader prefetched while starting."""
    t0 = time.perf_counter()
    loader = make_loader(provider, spec, device)
    it = iter(loader)
    first = next(it)
    startup = time.perf_counter() - t0
    for _ in range(warmup):
        next(it)
    t1 = time.perf_counter()
    for _ in range(steps):
        batch = next(it)
    if batch["crops"][0].is_cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t1
    if hasattr(loader, "close"):
        loader.close()
    return {"startup_s": startup, "elapsed_s": elapsed, "first": first}


def check_layout(ref: dict, batch: dict, provider: str):
    got = [(tuple(c.shape), c.dtype) for c in batch["crops"]]
    want = [(tuple(c.shape), c.dtype) for c in ref["crops"]]
    if got != want or batch["captions"].shape != ref["captions"].shape or batch["captions"].dtype != torch.int64:
        raise SystemExit(f"{provider}: batch layout {got} / {tuple(batch['captions'].shape)} differs from "
                         f"torchvision {want} / {tuple(ref['captions'].shape)}")


def check_same_batch(ref: dict, batch: dict, provider: str):
    """The fused torchvision transform must give the PIL transform's batch exactly (same seeds)."""
    same = ref["keys"] == batch["keys"] and torch.equal(ref["captions"], batch["captions"]) and all(
        torch.equal(a, b) for a, b in zip(ref["crops"], batch["crops"]))
    if not same:
        raise SystemExit(f"{provider}: the first batch differs from torchvision's; not timing a wrong pipeline")
    print(f"{provider}: first batch equal to torchvision's, bit for bit")


def check_exact(shard: str, n: int, threads: int) -> int:
    """Before timing, on the CPU: the DALI pipeline's crops of the first ``n`` images of ``shard`` equal,
    bit for bit, torchvision's crops of the PIL-decoded JPEGs made with the random parameters DALI drew
    (``reference_crop``: torchvision's functions, as MultiCropTransform calls them). Returns the number
    of crops compared; exits with a message on the first difference."""
    with tarfile.open(shard) as tf:
        names = [m for m in tf.getmembers() if m.name.endswith(".jpg")][:n]
        images = [Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB") for m in names]
    pipe = dali_multicrop.build_pipeline([shard], [str(index_path(shard))], n, global_size=224, local_size=96,
                                         crop_scale=0.4, n_local=N_CROPS - 2, shuffle_buffer=1, seed=0,
                                         reader_seed=0, num_threads=threads, debug=True)
    out = pipe.run()
    crops, debug = out[:N_CROPS], out[N_CROPS + 1:]
    for i, img in enumerate(images):
        for j in range(N_CROPS):
            p = dict(zip(dali_multicrop.DEBUG_FIELDS, np.asarray(debug[j][i]).tolist()))
            want = multicrop_ref.reference_crop(img, {f: p[f] for f in PARAM_FIELDS}, 224 if j < 2 else 96)
            got = np.asarray(crops[j][i])
            if not np.array_equal(got, want):
                raise SystemExit(f"dali: crop {j} of {names[i].name} differs from torchvision's "
                                 f"(max |diff| {np.abs(got - want).max():.3g}); not timing a wrong pipeline")
    return len(images) * N_CROPS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--providers", nargs="+",
                   default=["torchvision", "torchvision-fused", "dali", "dali-float-hue", "dali-linear-hue"])
    p.add_argument("--device", default="cpu", help="DALI output device: cpu or cuda")
    p.add_argument("--threads", type=int, default=2, help="torchvision workers = DALI threads")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--images", type=int, default=256, help="images in the benchmark shards")
    p.add_argument("--per-shard", type=int, default=64)
    p.add_argument("--size", default="500x375", help="image size WxH")
    p.add_argument("--steps", type=int, default=8, help="timed batches per repetition")
    p.add_argument("--warmup", type=int, default=4, help="untimed batches after the first (prefetch drain)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--data-dir", help="reuse/keep shards here (default: a temporary folder)")
    add_record_arg(p)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    size = tuple(int(v) for v in args.size.lower().split("x"))
    tmp = tempfile.TemporaryDirectory() if not args.data_dir else None
    data_dir = Path(args.data_dir or tmp.name)
    shards = sorted(str(s) for s in data_dir.glob("bench-*.tar"))
    if len(shards) * args.per_shard < args.images:
        shards = write_bench_shards(data_dir, args.images, args.per_shard, size)
    # torchvision needs a shard per worker; both loaders run past the data (they wrap around)
    steps = -(-(1 + args.warmup + args.steps) // args.threads) * args.threads   # a multiple of the workers
    spec = make_spec(shards, args.batch_size, steps, args.threads)
    device = torch.device(args.device)
    print(f"{len(shards)} shards, {args.images} JPEGs {size[0]}x{size[1]}; B={args.batch_size}, "
          f"{args.steps} timed batches × {args.reps} reps; {args.threads} threads; {env_info(device)}")

    if "dali" in args.providers and args.device == "cpu":
        if dali_multicrop.resolve_hue_mode("exact", gpu=False) == "numba":
            t0 = time.perf_counter()
            k = check_exact(shards[0], 8, args.threads)
            print(f"dali (cpu, exact): {k} crops equal torchvision's, bit for bit ({time.perf_counter() - t0:.1f} s, "
                  f"includes the kernel's compilation)")
    ref, firsts = None, {}
    runs = {prov: [] for prov in args.providers}
    for rep in range(args.reps):
        for prov in args.providers:
            r = measure(prov, spec, args.device, args.steps, args.warmup)
            if ref is None:
                ref = r["first"]
            check_layout(ref, r["first"], prov)
            firsts.setdefault(prov, r["first"])
            if prov == "torchvision-fused" and "torchvision" in firsts:
                check_same_batch(firsts["torchvision"], r["first"], prov)
            runs[prov].append(r)
            print(f"rep {rep} {prov:16s} start-up {r['startup_s']:6.2f} s   "
                  f"{args.steps * args.batch_size / r['elapsed_s']:7.1f} images/s")

    def pct(xs, f):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, round(f * (len(xs) - 1)))]

    rows, base = [], None
    for prov in args.providers:
        ips = [args.steps * args.batch_size / r["elapsed_s"] for r in runs[prov]]
        med = statistics.median(ips)
        base = med if prov == "torchvision" else base
        rows.append({"bench": "multicrop_loader", "provider": prov, "output_device": args.device,
                     "threads": args.threads, "batch_size": args.batch_size, "image_size": args.size,
                     "crops_per_image": N_CROPS, "steps": args.steps, "warmup": args.warmup, "reps": args.reps,
                     "images_per_s": round(med, 2), "images_per_s_p20": round(pct(ips, 0.2), 2),
                     "images_per_s_p80": round(pct(ips, 0.8), 2), "crops_per_s": round(med * N_CROPS, 1),
                     "startup_s": round(statistics.median(r["startup_s"] for r in runs[prov]), 2),
                     "ratio_vs_torchvision": round(med / base, 3) if base else ""})
    print(f"\n{'provider':16s} {'images/s':>9s} {'p20':>7s} {'p80':>7s} {'crops/s':>8s} {'start-up s':>10s} "
          f"{'× torchvision':>13s}")
    for r in rows:
        print(f"{r['provider']:16s} {r['images_per_s']:9.1f} {r['images_per_s_p20']:7.1f} "
              f"{r['images_per_s_p80']:7.1f} {r['crops_per_s']:8.1f} {r['startup_s']:10.2f} "
              f"{r['ratio_vs_torchvision']!s:>13s}")
    save_results("data", rows, device, record_run=args.record,
                 case=("bench", "provider", "output_device", "threads", "batch_size", "image_size", "crops_per_image",
                       "steps", "warmup", "reps"))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
