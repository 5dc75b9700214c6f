"""What both data backends share: the :class:`StreamSpec` they are built from, the :class:`Loader`
interface they implement, and the rules of the stream written once — seeds, the epoch's shard order,
the skip counter, caption-major collation, sizing, and the checks of a sample and of a shard.

A loader is an iterable of batches ``{"crops": [2 global + n_local × (B,3,H,W) float32, normalised],
"captions": (K·B, L) int64 caption-major, "keys": [B keys], "skipped": {reason: count}}`` (the
torchvision backend adds ``"worker"`` internally and removes it). Order, determinism, resume and the
handling of bad data are described in ``cosmos_fast/data/README.md``.

Shard URLs are opened by webdataset: ``pipe:CMD`` runs CMD in a shell (webdataset's design), so a
shard list or config written by someone else can run commands; ``allow_pipe=False`` refuses such
URLs (:func:`check_pipe_urls`).
"""
from __future__ import annotations

import io
import json
import logging
import math
import random
import typing
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from braceexpand import braceexpand
from PIL import Image

from .captions import SampleError

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "png", "jpeg", "webp")
# PIL format names DALI's image decoder reads (MPO: a camera JPEG with extra frames, decoded by both as
# its first): any other format (e.g. a GIF named .jpg) is skipped as unsupported_image_format by both
# backends, since DALI would drop its whole batch at run time
IMAGE_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "TIFF", "BMP", "PPM", "JPEG2000")
MAX_JSON_BYTES = 1 << 20          # a sample's json beyond this is bad_json (captions are a few kB)
SHELL_SCHEMES = ("pipe", "s3")    # URL schemes whose shards are read by running a shell command
LOG_PER_REASON = 10               # skips logged per reason (the rest are counted)
WORKER_START_METHODS = ("forkserver", "spawn", "fork")


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
    augment: str = "torchvision"  # torchvision: torchvision's PIL ops; fused: the same crops from the Numba kernel
    allow_pipe: bool = True       # False: refuse shard URLs that run a shell command (check_pipe_urls)


class Loader(typing.Protocol):
    """The interface of both backends (:mod:`.torchvision_loader`, :mod:`.dali_loader`)."""

    spec: StreamSpec
    epoch: int
    consumed: int                  # batches of this epoch already yielded

    @property
    def steps_per_epoch(self) -> int: ...

    @property
    def skipped(self) -> dict:
        """Cumulative skip counts by reason over the run (this rank)."""

    def set_epoch(self, epoch: int) -> None: ...

    def epoch_skips(self) -> dict:
        """This epoch's skip counts by reason."""

    def __iter__(self) -> typing.Iterator[dict]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def derive_seed(*parts) -> int:
    """A 32-bit seed derived from (seed, epoch, rank, worker, purpose, ...): every random choice of the
    stream is seeded from such a tuple."""
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(1)[0])


def epoch_shard_order(shards, seed: int, epoch: int) -> list:
    """The shard list of an epoch, shuffled with seed + epoch: the same on every rank (each rank then
    reads ``order[rank::world]``)."""
    order = list(shards)
    random.Random(seed + epoch).shuffle(order)
    return order


def caption_major(tokens: torch.Tensor) -> torch.Tensor:
    """(B, K, L) tokens → (K·B, L): row k·B + b is caption k of sample b."""
    return tokens.transpose(0, 1).reshape(-1, tokens.shape[-1])


class SkipCounter:
    """Skipped samples counted by reason, the first :data:`LOG_PER_REASON` of each reason logged."""

    def __init__(self, prefix: str = ""):
        self.counts = Counter()
        self.logged = Counter()
        self.prefix = prefix       # names the counter in the "further skips" line (e.g. "worker 1: ")

    def logs(self, reason: str) -> bool:
        """Whether the next skip of this reason gets a log line."""
        return self.logged[reason] < LOG_PER_REASON

    def add(self, reason: str, n: int = 1, where: str = "", detail: str = "") -> None:
        self.counts[reason] += n
        self.logged[reason] += 1
        if self.logged[reason] <= LOG_PER_REASON:
            log.warning("skipping %s: %s%s", where or "-", reason, f" ({detail})" if detail else "")
            if self.logged[reason] == LOG_PER_REASON:
                log.warning("%sfurther %r skips are counted but not logged", self.prefix, reason)


class RunSkips:
    """Base of both loaders: the run's skip counts are the past epochs' (folded in when the epoch
    changes) plus this epoch's (the loader's ``epoch_skips()``)."""

    _skips_before: Counter

    def epoch_skips(self) -> dict:
        raise NotImplementedError

    def _fold_epoch_skips(self) -> None:
        self._skips_before += Counter(self.epoch_skips())

    @property
    def skipped(self) -> dict:
        """Cumulative skip counts by reason over the run (this rank)."""
        total = Counter(self._skips_before)
        total.update(self.epoch_skips())
        return dict(total)


def steps_per_epoch(num_samples: int, global_batch: int, num_workers: int) -> int:
    """Official sizing: ceil(N / B_g) rounded up to a multiple of the worker count."""
    w = max(1, num_workers)
    steps = math.ceil(num_samples / global_batch)
    return math.ceil(steps / w) * w


def expand_shards(spec: str | list) -> list[str]:
    """Brace patterns and ``::``-joined sources to a flat list of shard URLs."""
    parts = spec if isinstance(spec, (list, tuple)) else str(spec).split("::")
    urls = [u for part in parts for u in braceexpand(part.strip()) if u]
    if not urls:
        raise ValueError(f"data.train_shards {spec!r} expands to no shard")
    return urls


def check_pipe_urls(urls, allow_pipe: bool, field: str = "data.train_shards") -> None:
    """With ``allow_pipe=False``, refuse shard URLs that run a shell command: webdataset's ``pipe:CMD``
    and ``s3://`` (which the DALI backend reads through ``pipe:aws s3 cp URL -``). The scheme is
    parsed as webdataset parses it (case and leading blanks ignored)."""
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
