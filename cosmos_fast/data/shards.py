"""Webdataset shard writer and validated DALI index files (``cosmos-fast make-shards``).

Sources:

* ``--source dreamlip``: a DreamLIP caption CSV (column ``Image Path`` plus the seven caption columns
  ``raw_caption``, ``shortIB_captions``, ``longIB_captions``, ``shortSV_captions``,
  ``longSV_captions``, ``shortLLA_captions``, ``longLLA_captions``, each a string of sentences) with
  the images in a folder (``--captions CSV --images DIR``), or img2dataset's webdataset output made
  with ``--save_additional_columns`` of those columns (``--img2dataset 'dl/{00000..00099}.tar'``:
  ``{key}.jpg`` + ``{key}.json`` holding the seven strings). Every caption string becomes a list of
  sentences by FLAIR's rule (split on newline, ``</s>`` or ``.``; blank pieces dropped), so the
  sampler never draws characters.
* ``--source pixelprose``: PixelProse records (CSV, or parquet when pyarrow is installed) with the
  image URL (``url``), ``original_caption`` and the long VLM caption (``vlm_caption`` on Hugging
  Face, or ``caption``), stored as ``original_caption`` and ``caption`` strings (the loader splits the
  long caption at run time, as the official ``textcrop_pixelprose`` does). Images as above; with
  img2dataset, ``caption`` is img2dataset's caption column and ``original_caption`` an additional one.

Images are resolved in a folder by the record's path (absolute, or relative to the folder), then by
the ``url`` in img2dataset-style ``{key}.json`` sidecars, then by file name. Every image is fully
decoded with PIL before it is written; JPEG, PNG and WebP bytes are kept as they are, any other format
PIL reads is re-encoded losslessly as PNG (DALI's decoders do not read e.g. GIF) after the 8-bit
conversion both loaders apply (:func:`~cosmos_fast.data.stream.decode_image`).

Output: ``{prefix}-NNNNNN.tar`` of at most ``--shard-size`` bytes (and ``--max-per-shard`` samples),
each sample ``{key}.{jpg|png|webp}`` + ``{key}.json``, keys from the source (the CSV row number,
or img2dataset's key), tar headers with a fixed mtime, so the same input gives byte-identical shards.
Beside every tar: ``{prefix}-NNNNNN.idx``, the DALI webdataset index (format v1.2, listing only the
image and json of each sample), and ``{prefix}-NNNNNN.idx.json``, its report (tar size, sample
count, skipped samples by reason, validated or not). ``{prefix}-manifest.json`` sums up the run.
Records that cannot be used are skipped, counted by reason and printed, never fatal: any exception
while decoding one record's json (``bad_json``, also over the loader's size limit) or image is that
record's skip reason. A re-run rewrites every shard deterministically (each written to a temporary
name, then renamed) and removes shards of an earlier run beyond the new count, so records are neither
duplicated nor lost; a key seen twice in the input is written once (``duplicate_key``). A run that
stops on an exception removes the temporary tar it was writing.

Indexes of existing shards (``--index-only 'shards/{000..099}.tar'``): :func:`write_index` reads each
tar once, decodes every image and parses every json, and leaves samples DALI could not use (corrupt or
undecodable image, missing image or json, unusable caption record) out of the index, reporting them
under the torchvision loader's reasons (the same checks, :mod:`.loader`).
This is how the DALI backend keeps the skip-and-count policy: a corrupt image cannot be skipped inside
a DALI pipeline, so it is kept out of the index instead.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import os
import re
import shutil
import sys
import tarfile
from collections import Counter
from pathlib import Path

from PIL import Image

from .captions import DREAMLIP_FIELDS, SampleError, caption_pool, split_sentences
from .stream import (IMAGE_FORMATS, IMAGE_KEYS, MAX_JSON_BYTES, decode_image, expand_shards, local_tar_problem,
                     parse_json)

log = logging.getLogger(__name__)

INDEX_VERSION = "v1.2"
REPORT_FORMAT = "cosmos-fast-index/1"
KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}     # written as they are
DREAMLIP_IMAGE_COLUMN = "Image Path"
PIXELPROSE_URL_COLUMNS = ("url", "image_url", "Image Path")
PIXELPROSE_CAPTION_COLUMNS = ("vlm_caption", "caption")
_MTIME = 946684800                    # fixed tar mtime (2000-01-01) so re-runs are byte-identical
_KEEP_BAD = 50                        # bad samples listed by key in an index report


class ShardError(RuntimeError):
    """A tar that cannot be indexed (truncated, unreadable, or without a usable sample)."""


# ----------------------------------------------------------------------------- validation
def check_image(data: bytes, formats=IMAGE_FORMATS) -> tuple[str | None, str | None]:
    """(PIL format, None) when both loaders accept the image, else (None, reason): the loaders' own
    check (:func:`~cosmos_fast.data.stream.decode_image`), with ``formats`` the formats accepted
    (default: those DALI decodes; None: any PIL reads)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
        decode_image(data, formats)
    except SampleError as e:
        return None, e.reason
    except Exception:     # PIL raises many types for corrupt data
        return None, "corrupt_image"
    return fmt, None


def check_record(record, caption_mode: str = "auto") -> str | None:
    """Why a caption record cannot be sampled (the loader's reason names), or None.

    ``auto`` accepts a DreamLIP record (all seven fields) or a PixelProse one (``caption``)."""
    if not isinstance(record, dict):
        return "bad_caption_record"
    if caption_mode == "auto":
        caption_mode = "textcrop_pixelprose" if ("caption" in record and "raw_caption" not in record) else "textcrop"
    try:
        caption_pool(record, caption_mode, "split")
    except SampleError as e:
        return e.reason
    return None


# ----------------------------------------------------------------------------- index files
def index_path(tar_path) -> Path:
    """``dir/name.tar`` → ``dir/name.idx`` (the name wds2idx uses by default)."""
    p = Path(tar_path)
    return p.with_name(p.name[:-4] + ".idx" if p.name.endswith(".tar") else p.name + ".idx")


def report_path(idx_path) -> Path:
    return Path(str(idx_path) + ".json")


def read_report(tar_path, idx_path) -> dict | None:
    """The index report when the index exists and was made for this tar (same size), else None."""
    idx, rep = Path(idx_path), report_path(idx_path)
    if not idx.is_file() or not rep.is_file():
        return None
    try:
        report = json.loads(rep.read_text())
        size = os.path.getsize(tar_path)
    except (OSError, ValueError):
        return None
    if report.get("format") != REPORT_FORMAT or report.get("tar_size") != size:
        return None
    return report


def _split_name(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the file name."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


def _tar_groups(tar_path):
    """(key, {ext: TarInfo}) for consecutive members with the same key, plus the open tar."""
    tf = tarfile.open(tar_path, "r:")
    key, comps = None, {}
    for m in tf:
        if not m.isfile():
            continue
        k, ext = _split_name(m.name)
        if not ext or Path(k).name.startswith("."):
            continue
        if k != key:
            if comps:
                yield tf, key, comps
            key, comps = k, {}
        comps[ext.lower()] = m
    if comps:
        yield tf, key, comps
    tf.close()


def write_index(tar_path, idx_path=None, validate: bool = True, caption_mode: str = "auto",
                prevalidated: bool = False) -> dict:
    """Write the DALI index of one tar (only samples with an image and a json, and with
    ``validate`` only those whose image decodes and whose record can be sampled) and its report.
    ``prevalidated`` marks the report validated without decoding (the writer checked every sample).

    Returns the report. Raises :class:`ShardError` for a truncated or unreadable tar."""
    tar_path = Path(tar_path)
    idx_path = Path(idx_path) if idx_path is not None else index_path(tar_path)
    problem = local_tar_problem(str(tar_path))
    if problem:
        raise ShardError(f"{tar_path}: {problem}")
    lines, skipped, bad = [], Counter(), []

    def skip(key, reason):
        skipped[reason] += 1
        if len(bad) < _KEEP_BAD:
            bad.append([key, reason])

    try:
        for tf, key, comps in _tar_groups(tar_path):
            img_ext = next((e for e in IMAGE_KEYS if e in comps), None)
            if img_ext is None:
                skip(key, "missing_image")
                continue
            if "json" not in comps:
                skip(key, "missing_json")
                continue
            img, js = comps[img_ext], comps["json"]
            if validate:          # the torchvision loader's checks, in its order
                try:
                    if js.size > MAX_JSON_BYTES:
                        raise SampleError("bad_json", f"json of {js.size} bytes")
                    reason = check_record(parse_json(tf.extractfile(js).read()), caption_mode)
                except SampleError as e:
                    reason = e.reason
                if reason is None:
                    reason = check_image(tf.extractfile(img).read())[1]
                if reason:
                    skip(key, reason)
                    continue
            lines.append(f"{img_ext} {img.offset_data} {img.size} {img.name} "
                         f"json {js.offset_data} {js.size} {js.name}")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardError(f"{tar_path}: unreadable tar ({e!r})") from e
    tmp = idx_path.with_name(idx_path.name + ".tmp")
    tmp.write_text(f"{INDEX_VERSION} {len(lines)}\n" + "".join(line + "\n" for line in lines))
    report = {"format": REPORT_FORMAT, "tar": tar_path.name, "tar_size": os.path.getsize(tar_path),
              "samples": len(lines), "skipped": dict(skipped), "validated": bool(validate or prevalidated),
              "caption_mode": caption_mode, "bad": bad}
    tmp.replace(idx_path)
    rep_tmp = idx_path.with_name(idx_path.name + ".json.tmp")
    rep_tmp.write_text(json.dumps(report, indent=1))
    rep_tmp.replace(report_path(idx_path))
    return report


# ----------------------------------------------------------------------------- writer
def _tar_size(content: int) -> int:
    """Bytes on disk: tarfile pads an archive to whole records of 20 blocks."""
    return -(-content // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


class ShardWriter:
    """Rolling webdataset tars ``{prefix}-NNNNNN.tar`` with their DALI index and report."""

    def __init__(self, out_dir, prefix: str = "shard", max_bytes: int = 1 << 30, max_count: int = 10_000):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.prefix, self.max_bytes, self.max_count = prefix, max_bytes, max_count
        self.shards: list[Path] = []
        self.written = 0
        self._tf = None
        self._bytes = self._count = 0

    @staticmethod
    def _member_bytes(n: int) -> int:
        return 512 + -(-n // 512) * 512

    def _open(self):
        path = self.out / f"{self.prefix}-{len(self.shards):06d}.tar"
        self._tmp = path.with_name(path.name + ".tmp")
        self._tf = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self._path, self._bytes, self._count = path, 1024, 0

    def _add(self, name: str, data: bytes):
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), _MTIME, 0o644
        self._tf.addfile(info, io.BytesIO(data))

    def write(self, key: str, image: bytes, ext: str, record: dict) -> None:
        js = json.dumps(record, ensure_ascii=False, sort_keys=True).encode()
        need = self._member_bytes(len(image)) + self._member_bytes(len(js))
        if self._tf is not None and self._count and (_tar_size(self._bytes + need) > self.max_bytes
                                                     or self._count >= self.max_count):
            self._finish()
        if self._tf is None:
            self._open()
        self._add(f"{key}.{ext}", image)
        self._add(f"{key}.json", js)
        self._bytes += need
        self._count += 1
        self.written += 1

    def _finish(self):
        self._tf.close()
        self._tf = None
        self._tmp.replace(self._path)
        # every sample was validated before it was written: the index lists all of them
        write_index(self._path, validate=False, prevalidated=True)
        self.shards.append(self._path)

    def abort(self) -> None:
        """Remove the tar being written (after an exception: no ``.tar.tmp`` is left behind)."""
        if self._tf is not None:
            try:
                self._tf.close()
            finally:
                self._tf = None
                self._tmp.unlink(missing_ok=True)

    def close(self) -> list[Path]:
        if self._tf is not None:
            self._finish()
        # shards of an earlier run beyond this run's count would duplicate records: remove them
        pat = re.compile(re.escape(self.prefix) + r"-(\d{6})\.(tar|idx|idx\.json|tar\.tmp|idx\.tmp|idx\.json\.tmp)$")
        for f in self.out.iterdir():
            m = pat.match(f.name)
            if m and (int(m.group(1)) >= len(self.shards) or m.group(2).endswith("tmp")):
                f.unlink()
        return self.shards


# ----------------------------------------------------------------------------- sources
def _is_url(ref: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*://", ref))


class FolderImages:
    """Images in a folder, found by the record's path, by img2dataset sidecar url, or by name."""

    def __init__(self, root):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"--images {root} is not a folder")
        self._by_url = self._by_name = None

    def _scan(self):
        self._by_url, self._by_name = {}, {}
        for p in sorted(self.root.rglob("*")):
            stem, ext = _split_name(p.name)
            if ext.lower() in IMAGE_KEYS:
                self._by_name.setdefault(p.name, p)
                side = p.with_name(stem + ".json")
                if side.is_file():
                    try:
                        url = parse_json(side.read_bytes()).get("url")
                    except (SampleError, OSError, AttributeError):
                        url = None
                    if url:
                        self._by_url.setdefault(url, p)

    def find(self, ref: str) -> Path | None:
        if not ref:
            return None
        if not _is_url(ref):
            for cand in (Path(ref), self.root / ref):
                if cand.is_file():
                    return cand
        if self._by_url is None:
            self._scan()
        if ref in self._by_url:
            return self._by_url[ref]
        name = ref.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
        return self._by_name.get(name)


class InputError(ValueError):
    """A caption table that cannot be used (absent, unreadable, or missing a column): nothing is written."""


def _read_table(path) -> tuple[list[str], object]:
    """(columns, iterator of row dicts) from a CSV or a parquet file; the header is read here, so an
    absent, unreadable or malformed file fails (:class:`InputError`) before any output exists."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--captions {path} is not a file")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise InputError(f"reading {path} needs pyarrow (pip install pyarrow), or pass a CSV") from None
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:                # pyarrow raises its own types for a broken file
            raise InputError(f"--captions {path} is not a readable parquet file: {e}") from None
        cols = pf.schema_arrow.names

        def rows():
            for batch in pf.iter_batches():
                yield from batch.to_pylist()
        return cols, rows()
    try:
        fh = open(path, newline="", encoding="utf-8")
        reader = csv.DictReader(fh)
        cols = list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"--captions {path} is not a readable UTF-8 CSV: {e}") from None

    def rows():
        with fh:
            try:
                yield from reader
            except (UnicodeDecodeError, csv.Error) as e:     # a bad line further down: the run fails
                raise InputError(f"--captions {path} line {reader.line_num}: {e}") from None
    return cols, rows()


def dreamlip_record(row: dict) -> dict:
    """The seven DreamLIP caption strings → lists of sentences (FLAIR's presplit)."""
    rec = {}
    for f in DREAMLIP_FIELDS:
        v = row.get(f)
        if isinstance(v, list):
            rec[f] = [s.strip() for s in v if isinstance(s, str) and s.strip()]
        elif isinstance(v, str):
            rec[f] = split_sentences(v)
        elif v is None:
            raise KeyError(f)
        else:
            rec[f] = []                            # NaN / empty cell
    return rec


def pixelprose_record(row: dict) -> dict:
    orig = row.get("original_caption")
    long = next((row[c] for c in PIXELPROSE_CAPTION_COLUMNS if isinstance(row.get(c), str)), None)
    if long is None:
        raise KeyError("vlm_caption")
    return {"original_caption": orig if isinstance(orig, str) else "", "caption": long}


def _rows_from_table(source: str, path, images: FolderImages, image_column: str | None):
    """Check the table's columns now; return the generator of (key, image bytes, record, skip reason)."""
    cols, rows = _read_table(path)
    if source == "dreamlip":
        col = image_column or DREAMLIP_IMAGE_COLUMN
        missing = [c for c in (col, *DREAMLIP_FIELDS) if c not in cols]
    else:
        col = image_column or next((c for c in PIXELPROSE_URL_COLUMNS if c in cols), PIXELPROSE_URL_COLUMNS[0])
        missing = [c for c in (col, "original_caption") if c not in cols]
        if not any(c in cols for c in PIXELPROSE_CAPTION_COLUMNS):
            missing.append(" or ".join(PIXELPROSE_CAPTION_COLUMNS))
    if missing:
        rows.close()
        raise InputError(f"--captions {path}: missing column(s) {missing}; found {cols}")
    return _table_samples(source, rows, col, images)


def _table_samples(source: str, rows, col: str, images: FolderImages):
    for i, row in enumerate(rows):
        key = f"{i:09d}"
        ref = row.get(col) or ""
        try:
            rec = dreamlip_record(row) if source == "dreamlip" else pixelprose_record(row)
        except KeyError:
            yield key, None, None, "bad_record"
            continue
        if _is_url(ref):
            rec["url"] = ref
        path_ = images.find(ref)
        if path_ is None:
            yield key, None, rec, "missing_image"
            continue
        yield key, path_.read_bytes(), rec, None


def _rows_from_img2dataset(source: str, pattern):
    """Samples of img2dataset webdataset output: the caption columns are in each json."""
    for url in expand_shards(pattern):
        problem = local_tar_problem(url)
        if problem:
            yield f"{Path(url).name}", None, None, "bad_shard"
            log.warning("skipping shard %s: %s", url, problem)
            continue
        try:
            for tf, key, comps in _tar_groups(url):
                key = Path(key).name
                img_ext = next((e for e in IMAGE_KEYS if e in comps), None)
                if "json" not in comps:
                    yield key, None, None, "missing_json"
                    continue
                try:
                    if comps["json"].size > MAX_JSON_BYTES:
                        raise SampleError("bad_json", "over the size limit")
                    meta = parse_json(tf.extractfile(comps["json"]).read())
                    rec = dreamlip_record(meta) if source == "dreamlip" else pixelprose_record(meta)
                except (SampleError, AttributeError):          # unparsable, or not an object
                    yield key, None, None, "bad_json"
                    continue
                except Exception:                             # a missing or unusable caption column
                    yield key, None, None, "bad_record"
                    continue
                if isinstance(meta.get("url"), str):
                    rec["url"] = meta["url"]
                if img_ext is None:
                    yield key, None, rec, "missing_image"
                    continue
                yield key, tf.extractfile(comps[img_ext]).read(), rec, None
        except (tarfile.TarError, OSError, EOFError) as e:
            log.warning("shard %s is unreadable past some point (%r); the rest is skipped", url, e)
            yield f"{Path(url).name}", None, None, "bad_shard"


def _shard_image(data: bytes) -> tuple[bytes | None, str | None, str | None]:
    """(bytes, PIL format, None) to write, or (None, None, reason). JPEG, PNG and WebP are kept as they
    are; any other format PIL reads is re-encoded losslessly as PNG from the loaders' 8-bit image."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
        img = decode_image(data, formats=None)
        if fmt in KEEP_FORMATS:
            return data, fmt, None
        buf = io.BytesIO()
        img.save(buf, format="PNG")                         # e.g. GIF, TIFF
        return buf.getvalue(), "PNG", None
    except SampleError as e:
        return None, None, e.reason
    except Exception:          # PIL raises many types for corrupt data
        return None, None, "corrupt_image"


def make_shards(source: str, out_dir, captions=None, images=None, img2dataset=None, prefix: str = "shard",
                shard_size: int = 1 << 30, max_per_shard: int = 10_000, image_column: str | None = None) -> dict:
    """Write shards + DALI indexes from a DreamLIP / PixelProse source; returns the summary."""
    if source not in ("dreamlip", "pixelprose"):
        raise ValueError(f"source must be dreamlip or pixelprose, got {source!r}")
    if img2dataset:
        rows = _rows_from_img2dataset(source, img2dataset)
    elif captions and images:
        rows = _rows_from_table(source, captions, FolderImages(images), image_column)
    else:
        raise ValueError("give --captions FILE with --images DIR, or --img2dataset SHARDS")
    created = _new_dirs(out_dir)
    writer = ShardWriter(out_dir, prefix, shard_size, max_per_shard)
    skipped, seen, bad = Counter(), set(), []
    mode = "textcrop" if source == "dreamlip" else "textcrop_pixelprose"
    try:
        for key, image, record, reason in rows:
            if reason is None and key in seen:
                reason = "duplicate_key"
            if reason is None:
                reason = check_record(record, mode)
            if reason is None:
                image, fmt, reason = _shard_image(image)
            if reason:
                skipped[reason] += 1
                if len(bad) < _KEEP_BAD:
                    bad.append([key, reason])
                continue
            seen.add(key)
            writer.write(key, image, KEEP_FORMATS[fmt], record)
        shards = writer.close()
    except BaseException:
        writer.abort()
        for d in created:                     # folders this run made, deepest first; never an existing one
            shutil.rmtree(d, ignore_errors=True)
        raise
    n = len(shards)
    pattern = (str(Path(out_dir) / f"{prefix}-{{000000..{n - 1:06d}}}.tar") if n > 1
               else str(Path(out_dir) / f"{prefix}-000000.tar") if n else "")
    summary = {"source": source, "written": writer.written, "shards": n, "pattern": pattern,
               "skipped": dict(skipped), "bad": bad,
               "input": {"captions": str(captions) if captions else None, "images": str(images) if images else None,
                         "img2dataset": str(img2dataset) if img2dataset else None},
               "digest": hashlib.sha1("".join(sorted(seen)).encode()).hexdigest()}
    (Path(out_dir) / f"{prefix}-manifest.json").write_text(json.dumps(summary, indent=1))
    return summary


def _new_dirs(out_dir) -> list[Path]:
    """The folders of ``out_dir``'s path that do not exist yet, deepest first."""
    out = Path(out_dir).absolute()
    return [d for d in (out, *out.parents) if not d.exists()]


def index_shards(pattern, validate: bool = True, caption_mode: str = "auto") -> dict:
    """Write validated DALI indexes beside existing shards; returns counts."""
    totals, indexed, bad_shards = Counter(), 0, []
    for url in expand_shards(pattern):
        try:
            rep = write_index(url, validate=validate, caption_mode=caption_mode)
        except ShardError as e:
            bad_shards.append(str(e))
            log.warning("%s", e)
            continue
        indexed += rep["samples"]
        totals.update(rep["skipped"])
    return {"indexed": indexed, "skipped": dict(totals), "bad_shards": bad_shards}


# ----------------------------------------------------------------------------- CLI
def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?i?b?)?\s*", str(text).lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512MB, 1GB, 1000000)")
    unit = (m.group(2) or "").rstrip("b").rstrip("i")
    return int(float(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[unit])


DESCRIPTION = "Write webdataset shards and validated DALI index files, or index existing shards."

EPILOG = f"""\
inputs:
  --source dreamlip --captions CSV --images DIR
      a CSV with the columns '{DREAMLIP_IMAGE_COLUMN}' (image path, absolute or relative to DIR, or URL) and
      {', '.join(DREAMLIP_FIELDS)}
      (each a string of sentences; split on newline, '</s>' or '.')
  --source pixelprose --captions CSV_OR_PARQUET --images DIR
      columns 'url' (or 'image_url', '{DREAMLIP_IMAGE_COLUMN}'), 'original_caption' and 'vlm_caption' (or 'caption')
  --img2dataset 'dl/{{00000..00099}}.tar'
      img2dataset webdataset output made with --save_additional_columns of those columns
  --image-column NAME overrides the image column. Images are found by path, then by the url in
  img2dataset {{key}}.json sidecars, then by file name.

output (in --output-dir):
  PREFIX-NNNNNN.tar (samples {{key}}.jpg|png|webp + {{key}}.json), PREFIX-NNNNNN.idx (DALI index),
  PREFIX-NNNNNN.idx.json (report), PREFIX-manifest.json. Unusable records are skipped and counted by
  reason. A missing column or unreadable table is an error (exit 2) and writes nothing."""


def add_make_shards_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``make-shards`` on an argparse sub-parser collection."""
    p = subparsers.add_parser("make-shards", help="write webdataset shards + DALI indexes from DreamLIP / "
                              "PixelProse captions and images, or index existing shards",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_make_shards_args(p)
    p.set_defaults(func=run_make_shards)
    return p


def add_make_shards_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--source", choices=("dreamlip", "pixelprose"), default="dreamlip",
                   help="caption schema of the input (default dreamlip)")
    p.add_argument("--captions", help="caption table: DreamLIP CSV, or PixelProse CSV/parquet")
    p.add_argument("--images", help="folder holding the images named by the table")
    p.add_argument("--img2dataset", help="img2dataset webdataset output (brace pattern); captions from its json")
    p.add_argument("--image-column", help="column with the image path/URL (default 'Image Path' or 'url')")
    p.add_argument("--output-dir", help="where the shards go")
    p.add_argument("--prefix", default="shard", help="shard name prefix (default shard)")
    p.add_argument("--shard-size", type=parse_size, default=parse_size("1GB"), help="max tar size (default 1GB)")
    p.add_argument("--max-per-shard", type=int, default=10_000, help="max samples per tar (default 10000)")
    p.add_argument("--index-only", metavar="SHARDS",
                   help="only write validated DALI indexes beside these existing shards")
    p.add_argument("--no-validate", action="store_true", help="with --index-only: index without decoding")
    return p


def run_make_shards(args) -> int:
    if args.index_only:
        res = index_shards(args.index_only, validate=not args.no_validate)
        print(f"indexed {res['indexed']} samples; left out: {_fmt(res['skipped'])}; "
              f"bad shards: {len(res['bad_shards'])}")
        for b in res["bad_shards"]:
            print(f"  {b}")
        return 0
    if not args.output_dir:
        print("cosmos-fast make-shards: --output-dir is required", file=sys.stderr)
        return 2
    try:
        res = make_shards(args.source, args.output_dir, captions=args.captions, images=args.images,
                          img2dataset=args.img2dataset, prefix=args.prefix, shard_size=args.shard_size,
                          max_per_shard=args.max_per_shard, image_column=args.image_column)
    except (ValueError, OSError) as e:      # InputError is a ValueError; FileNotFoundError an OSError
        print(f"cosmos-fast make-shards: {e}", file=sys.stderr)
        return 2
    print(f"written {res['written']} records in {res['shards']} shard(s): {res['pattern']}")
    print(f"skipped {sum(res['skipped'].values())}: {_fmt(res['skipped'])}")
    return 0


def _fmt(counts: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none"


def main(argv=None) -> int:
    """``python -m cosmos_fast.data.shards ...`` (the same arguments as ``cosmos-fast make-shards``)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="cosmos-fast make-shards", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_make_shards_args(p)
    return run_make_shards(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
