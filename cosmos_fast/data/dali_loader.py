"""The DALI backend of the COSMOS loader: same interface (:class:`~.stream.Loader`) and batch layout
as the torchvision backend (:mod:`.torchvision_loader`).

One pipeline per rank and epoch (:mod:`.dali_multicrop`) reads image + json through validated index
files (:mod:`.shards`), decodes each image once and cuts the §4.4 crops; captions are sampled and
tokenised per sample in Python as in the torchvision backend. A corrupt image cannot be skipped inside
a DALI pipeline: it is left out at index time, or its whole pipeline batch is dropped and counted.
Resume restores a DALI checkpoint. ``cosmos_fast/data/README.md`` describes the design in full.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import importlib.util
import logging
import math
import multiprocessing as mp
import os
import random
import shlex
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from webdataset.gopen import gopen

from ..config import check_crop_scale
from ..device import resolve_device
from .captions import SampleError, Tokenizer, sample_captions
from .dali_multicrop import batch_sources, build_pipeline, resolve_hue_mode
from .lifeline import die_with_parent
from .shards import ShardError, index_path, read_report, write_index
from .stream import (RunSkips, SkipCounter, StreamSpec, caption_major, check_pipe_urls, derive_seed,
                     epoch_shard_order, local_tar_problem, parse_json)

log = logging.getLogger(__name__)

_MAX_BAD_RUNS = 20


def dali_available() -> bool:
    """Whether NVIDIA DALI is installed (without importing it)."""
    return importlib.util.find_spec("nvidia.dali") is not None


# ------------------------------------------------------------------------------ captions
_WORKER_TOKENIZER = {}


def _caption_job(payload):
    """(json bytes and seed per sample, spec fields) → (tokens (n_valid, K, L) int64 of the samples whose
    record could be sampled, or None; per sample None or (reason, message))."""
    metas, seeds, mode, num_captions, string_fields, tok_name, ctx = payload
    key = (tok_name, ctx)
    if key not in _WORKER_TOKENIZER:
        _WORKER_TOKENIZER[key] = Tokenizer(tok_name, ctx)
    tok = _WORKER_TOKENIZER[key]
    caps, reasons = [], []
    for meta, seed in zip(metas, seeds):
        try:
            record = parse_json(meta)                # any parse failure, or over the size limit: bad_json
            caps.append(sample_captions(record, random.Random(seed), num_captions, mode, string_fields))
            reasons.append(None)
        except SampleError as e:
            reasons.append((e.reason, str(e)))
    tokens = tok([c for cs in caps for c in cs]).reshape(len(caps), num_captions, -1) if caps else None
    return tokens, reasons


# ------------------------------------------------------------------------------ the loader
class _Chunk:
    """Valid samples of one pipeline run still waiting to be batched, and how to get back to them."""

    def __init__(self, crops, tokens, keys, run: int, used: int, cp_before, cp_before_runs: int):
        self.crops, self.tokens, self.keys = crops, tokens, keys
        self.run, self.used = run, used                  # used: valid samples of the run already taken
        self.cp_before, self.cp_before_runs = cp_before, cp_before_runs

    def rest(self, k: int) -> "_Chunk":
        return _Chunk([c[k:] for c in self.crops], self.tokens[k:], self.keys[k:], self.run, self.used + k,
                      self.cp_before, self.cp_before_runs)


class DaliWebDatasetLoader(RunSkips):
    """Multi-crop COSMOS batches from webdataset shards with NVIDIA DALI (CUDA or CPU).

    Args:
        spec: the same :class:`~cosmos_fast.data.stream.StreamSpec` as the torchvision backend
            (``num_workers`` sets DALI's CPU threads; ``shuffle_initial`` is not used: DALI fills its
            buffer of ``shuffle_buffer`` samples before the first batch).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``; batches come out on it.
        num_threads: DALI CPU threads (default ``max(1, spec.num_workers)``).
        index_dir: where to write indexes that cannot go beside their tar (read-only shard folders);
            indexes beside the tar (``name.idx`` + ``name.idx.json``) are used first.
        cache_dir: local copies of remote shards (default ``~/.cache/cosmos_fast/shards``).
        validate: build missing indexes with full validation (decode every image); False indexes
            only the structure (faster; then run-time decode errors drop batches).
        retries: attempts to fetch a remote shard.
        caption_workers: processes for caption sampling + tokenisation (0 = in this process).
        prefetch: DALI prefetch queue depth.
        hue_mode: ``exact`` (on the CPU with numba: the fused kernel, crops equal to torchvision's; on
            the GPU: the operator graph with the float HSV shift), ``float`` (the operator graph with the
            float HSV shift) or ``linear`` (the graph with ``fn.hsv``, approximate).
    """

    def __init__(self, spec: StreamSpec, device="auto", num_threads: int | None = None, index_dir=None,
                 cache_dir=None, validate: bool = True, retries: int = 3, caption_workers: int = 0,
                 prefetch: int = 2, hue_mode: str = "exact"):
        if not dali_available():
            raise ImportError("data.backend=dali needs NVIDIA DALI (pip install nvidia-dali-cuda120, or the "
                              "[dev] extra); use data.backend=torchvision otherwise")
        if not spec.resampled and len(spec.shards) < spec.world:
            raise ValueError(f"{len(spec.shards)} shard(s) for {spec.world} rank(s): every rank needs a shard "
                             f"(or set data.resampled=true)")
        if spec.n_local < 0 or spec.num_captions < 2:
            raise ValueError("need n_local >= 0 and num_captions >= 2")
        check_crop_scale(spec.crop_scale)
        check_pipe_urls(spec.shards, spec.allow_pipe)
        self.spec = spec
        self.device = resolve_device(device)
        self.num_threads = num_threads or max(1, spec.num_workers)
        self.index_dir = Path(index_dir) if index_dir else None
        self.cache_dir = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "cosmos_fast" / "shards"
        self.validate, self.retries, self.prefetch = validate, retries, prefetch
        self.caption_workers = caption_workers
        self.hue_mode = hue_mode
        self._hue_impl = resolve_hue_mode(hue_mode, self.device.type == "cuda")     # validates it
        self._pool = None
        self.epoch = 0
        self.consumed = 0
        self._skips = SkipCounter()      # this epoch's counts (the log limit spans the run)
        self._skips_before = Counter()
        self._position = None            # where the next batch comes from (see state_dict)
        self._discard = 0                # batches to replay and drop (resume without a checkpoint)
        self._started = False            # index-time skips of this epoch counted
        self._stream = None

    # ----------------------------------------------------------------- interface
    @property
    def steps_per_epoch(self) -> int:
        return self.spec.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._fold_epoch_skips()
            self.epoch, self.consumed = epoch, 0
            self._skips.counts, self._position, self._discard, self._started = Counter(), None, 0, False
            self._close_stream()

    def epoch_skips(self) -> dict:
        return dict(self._skips.counts)

    def __iter__(self):
        while self.consumed < self.spec.steps_per_epoch:
            if self._stream is None:
                self._stream = _EpochStream(self)
            batch, position = self._stream.next_batch()
            self.consumed += 1
            self._position = position
            batch["skipped"] = self.skipped
            yield batch
        self._close_stream()

    def state_dict(self) -> dict:
        return {"backend": "dali", "epoch": self.epoch, "consumed": self.consumed,
                "position": dict(self._position) if self._position else None, "graph": self._graph_signature(),
                "epoch_skips": dict(self._skips.counts), "skips_before": dict(self._skips_before),
                "started": self._started}

    def load_state_dict(self, state: dict) -> None:
        self._close_stream()
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self._skips_before = Counter(state.get("skips_before", {}))
        if "epoch_skips" in state:
            self._skips.counts = Counter(state["epoch_skips"])
        else:                                       # a torchvision-backend state
            self._skips.counts = Counter()
            for counts in state.get("worker_skips", {}).values():
                self._skips.counts.update(counts)
        self._started = bool(state.get("started", self.consumed > 0))
        position = state.get("position")
        self._position, self._discard = None, 0
        # the resolved hue implementation "pil" was renamed "numba" (the same fused kernel)
        graph = (state.get("graph") or "").replace(" hue-pil ", " hue-numba ")
        if position and graph == self._graph_signature():
            self._position = dict(position)
        elif self.consumed:
            log.warning("data state has no DALI checkpoint for this pipeline; replaying %d batch(es) of epoch %d "
                        "(sample order exact, augmentations exact only for the same pipeline)",
                        self.consumed, self.epoch)
            self._discard = self.consumed

    def close(self) -> None:
        self._close_stream()
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ----------------------------------------------------------------- helpers
    def _close_stream(self):
        self._stream = None

    def _graph_signature(self) -> str:
        s = self.spec
        return (f"v1 {self.device.type} hue-{self._hue_impl} B{s.batch_size} g{s.global_size} "
                f"l{s.local_size}x{s.n_local} s{s.crop_scale} buf{s.shuffle_buffer} world{s.world} "
                f"rank{s.rank} seed{s.seed} res{int(s.resampled)} n{len(s.shards)}")

    def _skip(self, reason: str, n: int = 1, where: str = "", detail: str = "", count: bool = True):
        if count:
            self._skips.add(reason, n, where, detail)

    def _captions(self, metas, seeds):
        s = self.spec
        args = (s.caption_mode, s.num_captions, s.string_fields, s.tokenizer_name, s.context_length)
        if self.caption_workers <= 0:
            return _caption_job((metas, seeds, *args))
        if self._pool is None:
            # a pool worker blocks on its call queue forever once we are gone: have it die with us
            self._pool = cf.ProcessPoolExecutor(self.caption_workers, mp_context=mp.get_context("spawn"),
                                                initializer=die_with_parent, initargs=(os.getpid(),))
        n = max(1, math.ceil(len(metas) / self.caption_workers))
        parts = list(self._pool.map(_caption_job, [(metas[i:i + n], seeds[i:i + n], *args)
                                                   for i in range(0, len(metas), n)]))
        toks = [t for t, _ in parts if t is not None]
        return (torch.cat(toks) if toks else None), [r for _, rs in parts for r in rs]

    # ----------------------------------------------------------------- shards
    def epoch_shards(self, epoch: int) -> list[str]:
        """This rank's shard URLs for an epoch (the torchvision backend's rank split)."""
        s = self.spec
        if s.resampled:
            rng = random.Random(derive_seed(s.seed, epoch, s.rank, 1))
            return rng.choices(list(s.shards), k=max(1, math.ceil(len(s.shards) / s.world)))
        return epoch_shard_order(s.shards, s.seed, epoch)[s.rank::s.world]

    def _local(self, url: str, count: bool = True) -> Path | None:
        """A local, complete copy of a shard (remote shards are fetched into cache_dir)."""
        if url.startswith("file:"):
            url = url[len("file:"):]
        if not (url.startswith("pipe:") or "://" in url):
            return Path(url)
        check_pipe_urls([url], self.spec.allow_pipe)
        if url.startswith("s3://"):
            url = f"pipe:aws s3 cp {shlex.quote(url)} -"          # the URL is an argument, never shell syntax
        name = url.rstrip("/ -").rsplit("/", 1)[-1].split("?")[0] or "shard.tar"
        dest = self.cache_dir / f"{hashlib.sha1(url.encode()).hexdigest()[:12]}-{name}"
        if dest.is_file() and local_tar_problem(str(dest)) is None:
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")
        last = None
        for attempt in range(max(1, self.retries)):
            try:
                with gopen(url, "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                problem = local_tar_problem(str(tmp))
                if problem is None:
                    tmp.replace(dest)
                    return dest
                last = problem
            except Exception as e:        # network, subprocess and tar errors alike: retry
                last = repr(e)
            log.warning("fetching %s failed (attempt %d/%d): %s", url, attempt + 1, self.retries, last)
            if attempt + 1 < self.retries:
                time.sleep(min(30.0, 0.5 * 2 ** attempt))
        tmp.unlink(missing_ok=True)
        self._skip("bad_shard", 1, url, f"cannot fetch: {last}", count=count)
        return None

    def _index(self, tar: Path) -> tuple[Path, dict] | None:
        """(index path, report) of a current index for the tar, building one if needed."""
        cands = [index_path(tar)]
        if self.index_dir is not None:
            digest = hashlib.sha1(str(tar.resolve()).encode()).hexdigest()[:12]
            cands.append(self.index_dir / f"{tar.name[:-4] if tar.name.endswith('.tar') else tar.name}-{digest}.idx")
        for idx in cands:
            rep = read_report(tar, idx)
            if rep is not None and (rep["validated"] or not self.validate):
                return idx, rep
        target = cands[0] if os.access(tar.parent, os.W_OK) else cands[-1]
        if not os.access(target.parent, os.W_OK):
            if self.index_dir is None:
                raise PermissionError(f"cannot write an index beside {tar}: pass index_dir")
            self.index_dir.mkdir(parents=True, exist_ok=True)
        log.info("indexing %s (%s)", tar, "validating every sample" if self.validate else "structure only")
        return target, write_index(tar, target, validate=self.validate)

    def resolve_epoch(self, epoch: int, count: bool) -> tuple[list[str], list[str]]:
        """(tar paths, index paths) of this rank's readable shards for the epoch; counts what is
        left out (bad shards, samples excluded from indexes) when ``count``."""
        paths, idxs = [], []
        for url in self.epoch_shards(epoch):
            tar = self._local(url, count)
            if tar is None:
                continue
            problem = local_tar_problem(str(tar))
            if problem:
                self._skip("bad_shard", 1, str(tar), problem, count=count)
                continue
            try:
                idx, rep = self._index(tar)
            except ShardError as e:
                self._skip("bad_shard", 1, str(tar), str(e), count=count)
                continue
            if count:
                for reason, n in rep["skipped"].items():
                    self._skips.counts[reason] += n
                if rep["skipped"]:
                    log.warning("%s: %d sample(s) left out of its index: %s", tar, sum(rep["skipped"].values()),
                                rep["skipped"])
            if rep["samples"]:
                paths.append(str(tar))
                idxs.append(str(idx))
        if not paths:
            raise RuntimeError(f"rank {self.spec.rank}: no readable sample in this epoch's shards "
                               f"{self.epoch_shards(epoch)[:5]} (skips: {dict(self._skips.counts)})")
        return paths, idxs


class _EpochStream:
    """One epoch's pipeline for one rank, with the valid samples waiting to be batched."""

    def __init__(self, loader: DaliWebDatasetLoader):
        self.loader = ld = loader
        s = ld.spec
        self.paths, self.idxs = paths, idxs = ld.resolve_epoch(ld.epoch, count=not ld._started)
        ld._started = True
        pos = ld._position or {"checkpoint": None, "runs": 0, "target": 0, "drop": 0, "counted": False}
        self.reader_seed = derive_seed(s.seed, ld.epoch, s.rank, 6) % (2 ** 31 - 1)
        self.pipe = build_pipeline(
            paths, idxs, s.batch_size, global_size=s.global_size, local_size=s.local_size,
            crop_scale=s.crop_scale, n_local=s.n_local, shuffle_buffer=s.shuffle_buffer,
            seed=derive_seed(s.seed, ld.epoch, s.rank, 5) % (2 ** 31 - 1), reader_seed=self.reader_seed,
            device_id=ld.device.index if ld.device.type == "cuda" else None,
            num_threads=ld.num_threads, prefetch=ld.prefetch, checkpoint=pos["checkpoint"], hue_mode=ld.hue_mode)
        self.cp, self.cp_runs = pos["checkpoint"], pos["runs"]   # checkpoint and the runs it reflects
        self.run = pos["runs"]                                     # pipeline runs attempted so far
        # runs before ``target`` fed consumed batches; ``drop`` valid samples of run ``target`` too
        self.target, self.drop, self.counted = pos["target"], pos["drop"], pos["counted"]
        self.chunks: list[_Chunk] = []
        self.bad_runs = 0

    # ----------------------------------------------------------------- one pipeline run
    def _to_torch(self, tl):
        from nvidia.dali.plugin.pytorch import feed_ndarray   # lazy: DALI is optional

        t = tl.as_tensor()
        out = torch.empty(t.shape(), dtype=torch.float32, device=self.loader.device)
        stream = torch.cuda.current_stream(self.loader.device) if out.is_cuda else None
        feed_ndarray(t, out, cuda_stream=stream)
        return out

    def _pull(self) -> None:
        """Run the pipeline once and queue its valid samples (with their captions) as a chunk."""
        ld, s = self.loader, self.loader.spec
        run, cp_before, cp_before_runs = self.run, self.cp, self.cp_runs
        counted = run < self.target or (run == self.target and self.counted)   # skips already in the state
        self.run += 1
        try:
            outs = self.pipe.run()
        except RuntimeError as e:
            self.bad_runs += 1
            first = next((ln.strip() for ln in str(e).splitlines() if "failure" in ln), str(e).strip()[:200])
            where = f"a batch of rank {s.rank}, epoch {ld.epoch}"
            if not counted and ld._skips.logs("decode_error_batch"):
                where += f" ({self._failed_samples(run)})"
            ld._skip("decode_error_batch", s.batch_size, where, f"DALI: {first}; the batch is dropped",
                     count=not counted)
            self._check_bad()
            return
        self.cp, self.cp_runs = self.pipe.checkpoint(), self.run
        if run < self.target:                         # consumed before the resume point
            return
        crops, meta = outs[:2 + s.n_local], outs[2 + s.n_local]
        n = len(meta)
        metas = [np.asarray(meta[i]).tobytes() for i in range(n)]
        infos = [meta[i].source_info() for i in range(n)]
        seeds = [derive_seed(s.seed, ld.epoch, s.rank, 0, 4, run * s.batch_size + i) for i in range(n)]
        tokens, reasons = ld._captions(metas, seeds)
        valid = [i for i, r in enumerate(reasons) if r is None]
        for i, r in enumerate(reasons):
            if r is not None:
                ld._skip(r[0], 1, _where(infos[i]), r[1], count=not counted)
        if not valid:
            self.bad_runs += 1
            self._check_bad()
            return
        self.bad_runs = 0
        crops_t = [self._to_torch(c) for c in crops]
        if len(valid) < n:
            sel = torch.tensor(valid, device=ld.device)
            crops_t = [c.index_select(0, sel) for c in crops_t]
        chunk = _Chunk(crops_t, tokens, [_key(infos[i]) for i in valid], run, 0, cp_before, cp_before_runs)
        if run == self.target and self.drop:
            chunk = chunk.rest(self.drop)
        if chunk.keys:
            self.chunks.append(chunk)

    def _failed_samples(self, run: int) -> str:
        """'k1, k2 in a.tar; k3 in b.tar': the samples of a failed pipeline run (the last good
        checkpoint reflects ``cp_runs`` runs)."""
        s = self.loader.spec
        try:
            infos = batch_sources(self.paths, self.idxs, s.batch_size, s.shuffle_buffer, self.reader_seed, self.cp,
                                  run + 1 - self.cp_runs)
        except Exception as e:          # naming the batch is best effort; dropping it is not
            return f"samples unknown: {type(e).__name__}"
        by_shard = {}
        for info in infos:
            by_shard.setdefault(info.rsplit(":", 2)[0], []).append(_key(info))
        return "; ".join(f"{', '.join(keys)} in {shard}" for shard, keys in by_shard.items())

    def _check_bad(self):
        if self.bad_runs >= _MAX_BAD_RUNS:
            raise RuntimeError(f"rank {self.loader.spec.rank}: {_MAX_BAD_RUNS} DALI batches in a row failed or held "
                               f"no usable sample (skips {self.loader.skipped}); is the data set or caption_mode "
                               f"wrong?")

    # ----------------------------------------------------------------- batching
    def _take(self, b: int):
        parts, need = [], b
        while need:
            ch = self.chunks[0]
            k = min(need, len(ch.keys))
            parts.append((ch.crops if k == len(ch.keys) else [c[:k] for c in ch.crops], ch.tokens[:k], ch.keys[:k]))
            need -= k
            if k == len(ch.keys):
                self.chunks.pop(0)
            else:
                self.chunks[0] = ch.rest(k)
        if len(parts) == 1:
            return parts[0]
        crops = [torch.cat([p[0][i] for p in parts]) for i in range(len(parts[0][0]))]
        return crops, torch.cat([p[1] for p in parts]), [k for p in parts for k in p[2]]

    def _position(self) -> dict:
        """Where the next batch starts (after ``_take``): a checkpoint, the runs it reflects, the run
        to resume in and how many of that run's valid samples are already used."""
        if not self.chunks:
            return {"checkpoint": self.cp, "runs": self.cp_runs, "target": self.run, "drop": 0, "counted": False}
        ch = self.chunks[0]            # waiting samples all come from the last run: it completed the batch
        return {"checkpoint": ch.cp_before, "runs": ch.cp_before_runs, "target": ch.run, "drop": ch.used,
                "counted": True}

    def next_batch(self):
        ld, b = self.loader, self.loader.spec.batch_size
        while True:
            while sum(len(c.keys) for c in self.chunks) < b:
                self._pull()
            crops, tokens, keys = self._take(b)
            if ld._discard > 0:                    # replaying consumed batches (resume without checkpoint)
                ld._discard -= 1
                continue
            batch = {"crops": crops, "captions": caption_major(tokens),
                     "keys": keys}
            return batch, self._position()


def _where(info: str) -> str:
    """'path.tar:offset:key.json' → 'key in path.tar'."""
    parts = info.rsplit(":", 2)
    return f"{_key(info)} in {parts[0]}" if len(parts) == 3 else info


def _key(info: str) -> str:
    name = info.rsplit(":", 1)[-1]
    return name[:-5] if name.endswith(".json") else name
