"""Webdataset shards → COSMOS batches, deterministic and resumable.

Interface shared by every data backend (torchvision here, DALI in its own module): a loader is an
iterable of batches ``{"crops": [n_crops × (B,3,H,W)], "captions": (K·B, L) caption-major,
"skipped": {reason: count}}`` with ``set_epoch``, ``steps_per_epoch``, ``state_dict`` and
``load_state_dict`` (its position). Caption sampling and tokenisation are shared Python.

Order (cosmos_method.md §4.5). For epoch e the shard list is shuffled with seed + e, identically on
every rank, then split by rank and by data-loader worker (the official assertion
#shards ≥ workers × ranks is checked at start). Each worker reads its shards in that order through
webdataset's tar iterators, shuffles samples through a buffer (5000, filled to 1000 before the
first yield) and batches B valid samples. A worker that runs out of shards starts another pass over
them, reshuffled, so that every worker yields exactly ``steps_per_epoch / workers`` batches
(webdataset's ``with_epoch``). In resampled mode shards are drawn with replacement instead.

Determinism and resume. Every random choice is derived from (seed, epoch, rank, worker, position):
shard order, sample shuffle and, per sample, the crops and the caption draw. The position is the
number of batches consumed in the epoch. To resume, each worker re-reads its stream from the epoch
start and fast-forwards the batches already consumed — decoding images (so that skipped samples
are skipped again at the same places) but without augmentation or tokenisation — and the workers
are rotated so the round-robin order of the data loader continues where it stopped.

Bad data. A sample without an image or a json record, an image PIL cannot decode or DALI's decoder
does not read (:func:`decode_image`), a json record that does not parse for any reason (invalid,
nested too deep for Python's parser, over :data:`MAX_JSON_BYTES`) or cannot be sampled (see
:mod:`.captions`) is counted by reason, logged with its shard and key, and skipped: no exception
raised while decoding one sample stops training. A truncated or unreadable tar is logged and the
shard is skipped. Both backends and ``make-shards`` apply the same checks under the same reasons.

Shard URLs are opened by webdataset: ``pipe:CMD`` runs CMD in a shell (webdataset's design), so a
shard list or config written by someone else can run commands; ``allow_pipe=False`` refuses such
URLs (:func:`check_pipe_urls`).

Worker processes start with ``forkserver`` by default (``data.worker_start``): they fork from a
clean single-threaded server instead of from the training process, whose thread pools (OpenMP,
gloo, DALI, CUDA) a plain ``fork`` copies in an undefined state. ``fork`` remains available. As with
any forkserver/spawn program, a script of your own that iterates a loader needs the
``if __name__ == "__main__":`` guard (workers re-import the main module).
"""
from __future__ import annotations

import dataclasses
import functools
import io
import itertools
import json
import logging
import math
import multiprocessing
import os
import random
import sys
from collections import Counter
from pathlib import Path
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from . import lifeline
from .captions import SampleError, Tokenizer, caption_pool, sample_captions
from .transforms import FusedMultiCropTransform, MultiCropTransform, resolve_augment, seeded

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "png", "jpeg", "webp")
# PIL format names DALI's image decoder reads (MPO: a camera JPEG with extra frames, decoded by both as
# its first): any other format (e.g. a GIF named .jpg) is skipped as unsupported_image_format by both
# backends, since DALI would drop its whole batch at run time
IMAGE_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "TIFF", "BMP", "PPM", "JPEG2000")
MAX_JSON_BYTES = 1 << 20          # a sample's json beyond this is bad_json (captions are a few kB)
SHELL_SCHEMES = ("pipe", "s3")    # URL schemes whose shards are read by running a shell command
_LOG_PER_REASON = 10
WORKER_START_METHODS = ("forkserver", "spawn", "fork")
_WORKER_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [worker pid %(process)d]: %(message)s"


def worker_context(method: str = "forkserver"):
    """The multiprocessing context data-loader workers start with.

    ``forkserver`` preloads torch and this module into the server once, so every later worker
    starts by a cheap fork of a process that never ran a thread pool. :mod:`.lifeline` comes first
    in the preload: it makes the server die with the process that started it.
    """
    if method not in WORKER_START_METHODS:
        raise ValueError(f"data.worker_start = {method!r} must be one of {', '.join(WORKER_START_METHODS)}")
    if method not in multiprocessing.get_all_start_methods():
        raise ValueError(f"data.worker_start = {method!r} is not available on {sys.platform}")
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload([lifeline.__name__, "torch", __name__])
    return ctx


def _worker_init(owner: int, level: int, worker_id: int) -> None:
    """worker_init_fn: die with the parent (the fork server, or ``owner`` itself), then log."""
    lifeline.die_with_parent(owner)
    _worker_logging(level, worker_id)


def _worker_logging(level: int, _worker_id: int) -> None:
    """A worker started without fork has no log handler; give this package's logger one
    at the parent's level (skip lines, bad shards), leaving other libraries' loggers at their defaults."""
    pkg = logging.getLogger("cosmos_fast")
    if not pkg.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_WORKER_LOG_FORMAT))
        pkg.addHandler(handler)
        pkg.setLevel(level)
        pkg.propagate = False


def worker_loader_kwargs(num_workers: int, method: str = "forkserver") -> dict:
    """``DataLoader`` keyword arguments for the worker start method (empty without workers).

    The workers die with this process, even when it is SIGKILLed (Linux; see :mod:`.lifeline`).
    """
    if num_workers <= 0:
        return {}
    return {"multiprocessing_context": worker_context(method),
            "worker_init_fn": functools.partial(_worker_init, os.getpid(),
                                                logging.getLogger("cosmos_fast").getEffectiveLevel())}


def expand_shards(spec: str | list) -> list[str]:
    """Brace patterns and ``::``-joined sources to a flat list of shard URLs."""
    from braceexpand import braceexpand

    parts = spec if isinstance(spec, (list, tuple)) else str(spec).split("::")
    urls = [u for part in parts for u in braceexpand(part.strip()) if u]
    if not urls:
        raise ValueError(f"data.train_shards {spec!r} expands to no shard")
    return urls


def check_pipe_urls(urls, allow_pipe: bool, field: str = "data.train_shards") -> None:
    """With ``allow_pipe=False``, refuse shard URLs that run a shell command: webdataset's ``pipe:CMD``
    and ``s3://`` (which the DALI backend reads through ``pipe:aws s3 cp URL -``). The scheme is
    parsed as webdataset parses it (case and leading blanks ignored)."""
    from urllib.parse import urlparse

    if allow_pipe:
        return
    for url in urls:
        if urlparse(str(url)).scheme.lower() in SHELL_SCHEMES:
            raise ValueError(f"{field} URL {url!r} runs a shell command ({urlparse(str(url)).scheme}:) but "
                             f"data.allow_pipe is false; use local paths or http(s) URLs, or set "
                             f"data.allow_pipe=true if you trust this shard list")


def parse_json(data: bytes):
    """A sample's json record. Any failure is :class:`SampleError` ``bad_json``: invalid json, a record
    over :data:`MAX_JSON_BYTES`, or one nested too deep for Python's parser (RecursionError)."""
    if len(data) > MAX_JSON_BYTES:
        raise SampleError("bad_json", f"json of {len(data)} bytes is over the {MAX_JSON_BYTES}-byte limit per sample")
    try:
        return json.loads(data)
    except Exception as e:        # ValueError, UnicodeDecodeError, RecursionError, ...
        raise SampleError("bad_json", f"{type(e).__name__}: {str(e)[:200]}") from None


def _is_gray16(img: Image.Image) -> bool:
    """16-bit grayscale: mode I;16 (I;16B, ...), or I from a PNG (older Pillow reads 16-bit PNGs as I)."""
    return img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PNG")


def decode_image(data: bytes, formats=IMAGE_FORMATS) -> Image.Image:
    """A sample's image, fully decoded to 8 bits per channel as both backends see it, else
    :class:`SampleError`: ``corrupt_image`` (PIL fails, whatever it raises) or
    ``unsupported_image_format`` (a format outside ``formats``; a 32-bit or float image).

    16-bit grayscale is scaled to 8 bits as round(v / 257) — the exact map of 0..65535 onto 0..255,
    and what DALI's decoder does (tests/test_dali.py) — where ``convert("RGB")`` would clip it to
    white. Other 16-bit PNGs (RGB, RGBA, LA) are read by PIL as v >> 8 and by DALI rounded: at most
    one level apart."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:        # PIL raises many types for corrupt data
        raise SampleError("corrupt_image", f"{type(e).__name__}: {e}") from None
    if formats is not None and img.format not in formats:
        raise SampleError("unsupported_image_format", f"{img.format} image (DALI decodes {', '.join(formats)})")
    if _is_gray16(img):
        v = np.asarray(img).astype(np.int64).clip(0, 65535)
        return Image.fromarray(((v + 128) // 257).astype(np.uint8))           # mode L, round(v / 257)
    if img.mode in ("I", "F") or img.mode.startswith("I;"):
        raise SampleError("unsupported_image_format", f"{img.format} image of mode {img.mode} (32-bit or float)")
    return img


def _seed(*parts) -> int:
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(1)[0])


def steps_per_epoch(num_samples: int, global_batch: int, num_workers: int) -> int:
    """Official sizing: ceil(N / B_g) rounded up to a multiple of the worker count."""
    w = max(1, num_workers)
    steps = math.ceil(num_samples / global_batch)
    return math.ceil(steps / w) * w


@dataclass
class StreamSpec:
    shards: list
    batch_size: int
    seed: int
    rank: int
    world: int
    num_workers: int
    steps_per_epoch: int
    resampled: bool
    shuffle_buffer: int
    shuffle_initial: int
    caption_mode: str
    num_captions: int
    string_fields: str
    global_size: int
    local_size: int
    n_local: int
    crop_scale: float
    tokenizer_name: str
    context_length: int
    worker_start: str = "forkserver"
    augment: str = "pil"          # pil: torchvision's PIL ops; fused: the same crops from pil_crop's kernel
    allow_pipe: bool = True       # False: refuse shard URLs that run a shell command (check_pipe_urls)


class _Skips:
    def __init__(self, worker: int):
        self.counts = Counter()
        self.worker = worker

    def add(self, reason: str, url: str, key: str, detail: str = "") -> None:
        self.counts[reason] += 1
        n = self.counts[reason]
        if n <= _LOG_PER_REASON:
            log.warning("skipping sample %r in %s: %s%s", key, url, reason, f" ({detail})" if detail else "")
            if n == _LOG_PER_REASON:
                log.warning("worker %d: further %r skips are counted but not logged", self.worker, reason)


def local_path(url: str) -> str | None:
    """The file path of a local shard URL (plain or ``file:``); None for a URL with a scheme
    (``pipe:``, ``http://``, ``s3://``, ...), which is left to the reader."""
    path = url[len("file:"):] if url.startswith("file:") else url
    if ":" in path.split("/")[0] or path.startswith("pipe:"):
        return None
    return path


def missing_local_shards(urls) -> list[str]:
    """The local shard URLs among ``urls`` whose file does not exist."""
    return [url for url in urls if (path := local_path(url)) is not None and not Path(path).is_file()]


def local_tar_problem(url: str) -> str | None:
    """For a local shard, why it is not a complete tar archive (None when it looks complete).

    A tar ends with two zero blocks and is a whole number of 512-byte blocks; a file cut short
    (an interrupted copy or download) fails this test, while tarfile would silently stop early."""
    path = local_path(url)
    if path is None:
        return None                                     # remote or piped: left to the tar reader
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            if size < 1024 or size % 512:
                return f"size {size} is not a whole number of tar blocks"
            fh.seek(size - 1024)
            if fh.read(1024).strip(b"\0"):
                return "no end-of-archive marker (truncated?)"
    except OSError as e:
        return f"cannot read: {e}"
    return None


def _tar_samples(url: str, skips: _Skips):
    """Samples ({'__key__', ext: bytes, '__url__'}) of one shard via webdataset's tar iterators."""
    from webdataset import tariterators

    problem = local_tar_problem(url)
    if problem:
        skips.add("bad_shard", url, "-", problem)
        return

    def handler(exn):
        skips.add("bad_shard", url, "-", repr(exn))
        return False        # stop reading this shard, go on with the next one

    files = tariterators.tar_file_expander(tariterators.url_opener([{"url": url}], handler=handler),
                                           handler=handler)
    yield from tariterators.group_by_keys(files, handler=handler)


class SampleStream:
    """The deterministic sample → batch stream of one (rank, logical worker) for one epoch."""

    def __init__(self, spec: StreamSpec, epoch: int, worker: int):
        self.spec, self.epoch, self.worker = spec, epoch, worker
        self.skips = _Skips(worker)
        self._transform = None
        self._tokenizer = None

    # -------------------------------------------------------------- order
    def _raw_samples(self):
        """Raw tar samples: endless passes over this worker's shards (or resampled shards)."""
        s = self.spec
        if s.resampled:
            rng = random.Random(_seed(s.seed, self.epoch, s.rank, self.worker, 1))
            empty = 0
            while True:
                n = 0
                for sample in _tar_samples(rng.choice(s.shards), self.skips):
                    n += 1
                    yield sample
                empty = 0 if n else empty + 1
                if empty > 100:
                    raise RuntimeError(f"rank {s.rank} worker {self.worker}: 100 resampled shards in a row "
                                       f"held no readable sample (shards: {s.shards[:3]} ...)")
        order = list(s.shards)
        random.Random(s.seed + self.epoch).shuffle(order)          # same on every rank
        mine = order[s.rank::s.world][self.worker::max(1, s.num_workers)]
        for p in itertools.count():
            pass_order = list(mine)
            if p:
                random.Random(_seed(s.seed, self.epoch, s.rank, self.worker, 2, p)).shuffle(pass_order)
            n = 0
            for url in pass_order:
                for sample in _tar_samples(url, self.skips):
                    n += 1
                    yield sample
            if n == 0:
                raise RuntimeError(f"rank {s.rank} worker {self.worker}: shards {mine[:5]} hold no readable sample")

    def _shuffled(self):
        from webdataset.filters import shuffle

        s = self.spec
        buffered = shuffle(s.shuffle_buffer, s.shuffle_initial,
                           seed=_seed(s.seed, self.epoch, s.rank, self.worker, 3))
        return buffered(iter(self._raw_samples()))

    # ------------------------------------------------------------ samples
    def _decode(self, sample):
        """(PIL image, caption record) or None after counting the reason."""
        url, key = sample.get("__url__", "?"), sample.get("__key__", "?")
        img_key = next((k for k in IMAGE_KEYS if k in sample), None)
        if img_key is None:
            self.skips.add("missing_image", url, key)
            return None
        if "json" not in sample:
            self.skips.add("missing_json", url, key)
            return None
        try:
            record = parse_json(sample["json"])
            caption_pool(record, self.spec.caption_mode, self.spec.string_fields)
            img = decode_image(sample[img_key])
        except SampleError as e:              # bad_json, caption reasons, corrupt or unsupported image
            self.skips.add(e.reason, url, key, str(e))
            return None
        return img, record

    def _make(self, img, record, position: int):
        s = self.spec
        if self._transform is None:
            cls = FusedMultiCropTransform if s.augment == "fused" else MultiCropTransform
            self._transform = cls(s.global_size, s.local_size, s.crop_scale, 2, s.n_local)
            self._tokenizer = Tokenizer(s.tokenizer_name, s.context_length)
        seed = _seed(s.seed, self.epoch, s.rank, self.worker, 4, position)
        with seeded(seed):
            crops = self._transform(img)
        captions = sample_captions(record, random.Random(seed), s.num_captions, s.caption_mode, s.string_fields)
        return crops, self._tokenizer(captions)

    def batches(self, skip: int = 0):
        """Yield this worker's batches of the epoch, fast-forwarding the first ``skip``."""
        s = self.spec
        n_batches = s.steps_per_epoch // max(1, s.num_workers)
        made, pending, bad_run = 0, [], 0
        for position, sample in enumerate(self._shuffled()):
            if made >= n_batches:
                return
            decoded = self._decode(sample)
            if decoded is None:
                bad_run += 1
                if bad_run > 10_000:
                    raise RuntimeError(f"rank {s.rank} worker {self.worker}: 10000 samples in a row were "
                                       f"skipped ({dict(self.skips.counts)}); is the data set broken?")
                continue
            bad_run = 0
            if made < skip:                      # fast-forward: validated, not augmented
                pending.append(None)
            else:
                pending.append(self._make(*decoded, position) + (sample["__key__"],))
            if len(pending) == s.batch_size:
                if made >= skip:
                    yield self._collate(pending)
                made += 1
                pending = []

    def _collate(self, samples):
        crops = [torch.stack([s[0][i] for s in samples]) for i in range(len(samples[0][0]))]
        tokens = torch.stack([s[1] for s in samples])                      # B × K × L
        return {"crops": crops, "captions": tokens.transpose(0, 1).reshape(-1, tokens.shape[-1]),
                "keys": [s[2] for s in samples], "skipped": dict(self.skips.counts), "worker": self.worker}


class _EpochDataset(torch.utils.data.IterableDataset):
    def __init__(self, spec: StreamSpec, epoch: int, consumed: int):
        self.spec, self.epoch, self.consumed = spec, epoch, consumed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        nw = max(1, self.spec.num_workers)
        physical = info.id if info is not None else 0
        if info is not None:
            torch.set_num_threads(1)
        rot = self.consumed % nw
        logical = (physical + rot) % nw            # continue the round robin where it stopped
        skip = self.consumed // nw + (1 if logical < rot else 0)
        yield from SampleStream(self.spec, self.epoch, logical).batches(skip)


class WebDatasetLoader:
    """Multi-crop COSMOS batches from webdataset shards with the torchvision backend."""

    def __init__(self, spec: StreamSpec):
        nw = max(1, spec.num_workers)
        if not spec.resampled and len(spec.shards) < nw * spec.world:
            raise ValueError(f"{len(spec.shards)} shard(s) for {nw} worker(s) × {spec.world} rank(s): every "
                             f"worker needs a shard (set data.num_workers lower or data.resampled=true)")
        if spec.steps_per_epoch % nw:
            raise ValueError(f"steps_per_epoch {spec.steps_per_epoch} is not a multiple of {nw} workers")
        check_pipe_urls(spec.shards, spec.allow_pipe)
        spec = dataclasses.replace(spec, augment=resolve_augment(spec.augment))
        if spec.augment == "fused":
            # compile (or load from Numba's disk cache) here once, so the workers only load the cache
            from .pil_crop import augment_crop

            augment_crop(np.zeros((2, 2, 3), np.uint8), [0, 0, 2, 2] + [0] * 11, 16)
        self.spec = spec
        self.epoch = 0
        self.consumed = 0
        self._worker_skips: dict[int, dict] = {}
        self._skips_before = Counter()

    @property
    def steps_per_epoch(self) -> int:
        return self.spec.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._skips_before += Counter(self.epoch_skips())
            self.epoch, self.consumed, self._worker_skips = epoch, 0, {}

    def epoch_skips(self) -> dict:
        total = Counter()
        for counts in self._worker_skips.values():
            total.update(counts)
        return dict(total)

    @property
    def skipped(self) -> dict:
        """Cumulative skip counts by reason over the run (this rank)."""
        total = Counter(self._skips_before)
        total.update(self.epoch_skips())
        return dict(total)

    def __iter__(self):
        spec = self.spec
        ds = _EpochDataset(spec, self.epoch, self.consumed)
        dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=spec.num_workers,
                                         persistent_workers=False,
                                         prefetch_factor=2 if spec.num_workers else None,
                                         **worker_loader_kwargs(spec.num_workers, spec.worker_start))
        for batch in dl:
            self.consumed += 1
            self._worker_skips[batch.pop("worker")] = batch["skipped"]
            batch["skipped"] = self.skipped
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed,
                "worker_skips": {int(k): dict(v) for k, v in self._worker_skips.items()},
                "skips_before": dict(self._skips_before)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self._worker_skips = {int(k): dict(v) for k, v in state.get("worker_skips", {}).items()}
        self._skips_before = Counter(state.get("skips_before", {}))
