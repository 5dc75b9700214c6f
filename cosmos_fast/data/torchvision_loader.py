"""The torchvision backend: webdataset shards → COSMOS batches in data-loader worker processes, with
torchvision's PIL ops or the fused Numba kernel (``data.augment``), deterministic and resumable.

Each (rank, worker) reads its shards of the epoch (:func:`~.stream.epoch_shard_order`, then split by
rank and worker) through webdataset's tar iterators and a seeded shuffle buffer; every random choice
derives from (seed, epoch, rank, worker, position), so a resumed run fast-forwards to the same place.
``cosmos_fast/data/README.md`` describes the order, resume and worker start-up in full.

Worker processes start with ``forkserver`` by default (``data.worker_start``); a script of your own
that iterates a loader needs the ``if __name__ == "__main__":`` guard (workers re-import the main module).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import multiprocessing
import os
import random
import sys
from collections import Counter

import numpy as np
import torch
from webdataset import tariterators
from webdataset.filters import shuffle

from ..ops.multicrop import augment_crop
from . import lifeline
from .captions import SampleError, Tokenizer, caption_pool, sample_captions
from .stream import (IMAGE_KEYS, WORKER_START_METHODS, RunSkips, SkipCounter, StreamSpec, caption_major,
                     check_pipe_urls, decode_image, derive_seed, epoch_shard_order, local_tar_problem, parse_json)
from .transforms import FusedMultiCropTransform, MultiCropTransform, resolve_augment, seeded

log = logging.getLogger(__name__)

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


def _tar_samples(url: str, skips: SkipCounter):
    """Samples ({'__key__', ext: bytes, '__url__'}) of one shard via webdataset's tar iterators."""
    problem = local_tar_problem(url)
    if problem:
        skips.add("bad_shard", where=_where(url, "-"), detail=problem)
        return

    def handler(exn):
        skips.add("bad_shard", where=_where(url, "-"), detail=repr(exn))
        return False        # stop reading this shard, go on with the next one

    files = tariterators.tar_file_expander(tariterators.url_opener([{"url": url}], handler=handler),
                                           handler=handler)
    yield from tariterators.group_by_keys(files, handler=handler)


def _where(url: str, key: str) -> str:
    return f"sample {key!r} in {url}"


class SampleStream:
    """The deterministic sample → batch stream of one (rank, logical worker) for one epoch."""

    def __init__(self, spec: StreamSpec, epoch: int, worker: int):
        self.spec, self.epoch, self.worker = spec, epoch, worker
        self.skips = SkipCounter(f"worker {worker}: ")
        self._transform = None
        self._tokenizer = None

    # -------------------------------------------------------------- order
    def _raw_samples(self):
        """Raw tar samples: endless passes over this worker's shards (or resampled shards)."""
        s = self.spec
        if s.resampled:
            rng = random.Random(derive_seed(s.seed, self.epoch, s.rank, self.worker, 1))
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
        order = epoch_shard_order(s.shards, s.seed, self.epoch)
        mine = order[s.rank::s.world][self.worker::max(1, s.num_workers)]
        for p in itertools.count():
            pass_order = list(mine)
            if p:
                random.Random(derive_seed(s.seed, self.epoch, s.rank, self.worker, 2, p)).shuffle(pass_order)
            n = 0
            for url in pass_order:
                for sample in _tar_samples(url, self.skips):
                    n += 1
                    yield sample
            if n == 0:
                raise RuntimeError(f"rank {s.rank} worker {self.worker}: shards {mine[:5]} hold no readable sample")

    def _shuffled(self):
        s = self.spec
        buffered = shuffle(s.shuffle_buffer, s.shuffle_initial,
                           seed=derive_seed(s.seed, self.epoch, s.rank, self.worker, 3))
        return buffered(iter(self._raw_samples()))

    # ------------------------------------------------------------ samples
    def _decode(self, sample):
        """(PIL image, caption record) or None after counting the reason."""
        url, key = sample.get("__url__", "?"), sample.get("__key__", "?")
        img_key = next((k for k in IMAGE_KEYS if k in sample), None)
        if img_key is None:
            self.skips.add("missing_image", where=_where(url, key))
            return None
        if "json" not in sample:
            self.skips.add("missing_json", where=_where(url, key))
            return None
        try:
            record = parse_json(sample["json"])
            caption_pool(record, self.spec.caption_mode, self.spec.string_fields)
            img = decode_image(sample[img_key])
        except SampleError as e:              # bad_json, caption reasons, corrupt or unsupported image
            self.skips.add(e.reason, where=_where(url, key), detail=str(e))
            return None
        return img, record

    def _make(self, img, record, position: int):
        s = self.spec
        if self._transform is None:
            cls = FusedMultiCropTransform if s.augment == "fused" else MultiCropTransform
            self._transform = cls(s.global_size, s.local_size, s.crop_scale, 2, s.n_local)
            self._tokenizer = Tokenizer(s.tokenizer_name, s.context_length)
        seed = derive_seed(s.seed, self.epoch, s.rank, self.worker, 4, position)
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
        return {"crops": crops, "captions": caption_major(tokens),
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


class WebDatasetLoader(RunSkips):
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
            self._fold_epoch_skips()
            self.epoch, self.consumed, self._worker_skips = epoch, 0, {}

    def epoch_skips(self) -> dict:
        total = Counter()
        for counts in self._worker_skips.values():
            total.update(counts)
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
