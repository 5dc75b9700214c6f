"""The shard writer (``cosmos-fast make-shards``) and validated DALI index files: round trips from
a DreamLIP CSV, img2dataset output and PixelProse records; bad records counted, not fatal;
re-runs neither duplicate nor lose records."""
import argparse
import csv
import io
import json
import re
import tarfile

import numpy as np
import pytest
from PIL import Image

from cosmos_fast.data.captions import DREAMLIP_FIELDS, caption_pool, split_sentences
from cosmos_fast.data.shards import (add_make_shards_parser, index_path, index_shards, main, parse_size, read_report,
                                     report_path, write_index)
from tests.test_loader import NESTED_JSON, write_shards


def image_bytes(seed, fmt="JPEG", size=(40, 32)):
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def dreamlip_row(i):
    return {"raw_caption": f"raw {i}. second raw {i}",
            "shortIB_captions": f"short ib {i}</s>another ib {i}",
            "longIB_captions": f"long ib {i}.\nlong ib line {i}.",
            "shortSV_captions": f"short sv {i}", "longSV_captions": f"long sv {i}. more sv {i}.",
            "shortLLA_captions": "", "longLLA_captions": f"lla {i}..  . end {i}"}


def read_tars(out_dir, prefix="shard"):
    """{key: {ext: bytes}} over the written shards; fails on a duplicated key."""
    samples = {}
    for tar in sorted(out_dir.glob(f"{prefix}-*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf:
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})
                assert ext not in samples[key], f"{m.name} written twice"
                samples[key][ext] = tf.extractfile(m).read()
    return samples


@pytest.fixture()
def dreamlip_csv(tmp_path):
    """10 rows: 7 good (jpg, png, a GIF to re-encode, one by absolute path), a missing image,
    a corrupt image and a row whose captions are all empty."""
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    rows, images = [], {}
    for i in range(10):
        row = dreamlip_row(i)
        name = f"img{i}.jpg"
        data = image_bytes(i)
        if i == 1:
            name, data = f"img{i}.png", image_bytes(i, "PNG")
        if i == 2:
            name, data = f"img{i}.gif", image_bytes(i, "GIF")
        if i == 7:
            data = b"\xff\xd8 corrupt jpeg"
        if i == 9:
            row = {f: "" for f in DREAMLIP_FIELDS}
        if i != 8:
            (img_dir / name).write_bytes(data)
            images[f"{i:09d}"] = data
        row["Image Path"] = str(img_dir / name) if i == 3 else (f"https://example.com/a/{name}?x=1" if i == 4 else name)
        rows.append(row)
    path = tmp_path / "captions.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["Image Path", *DREAMLIP_FIELDS])
        w.writeheader()
        w.writerows(rows)
    return path, img_dir, rows, images


def test_dreamlip_csv_round_trip(dreamlip_csv, tmp_path, capsys):
    path, img_dir, rows, images = dreamlip_csv
    out = tmp_path / "out"
    rc = main(["--source", "dreamlip", "--captions", str(path), "--images", str(img_dir), "--output-dir", str(out),
               "--max-per-shard", "3"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "written 7 records in 3 shard(s)" in printed
    assert "corrupt_image=1" in printed and "missing_image=1" in printed and "empty_caption_pool=1" in printed
    samples = read_tars(out)
    assert sorted(samples) == [f"{i:09d}" for i in range(7)]
    for key, files in samples.items():
        i = int(key)
        record = json.loads(files["json"])
        for f in DREAMLIP_FIELDS:
            assert record[f] == split_sentences(rows[i][f]), (key, f)      # strings → sentence lists
            assert isinstance(record[f], list)
        if i == 2:                                   # GIF → lossless PNG
            assert set(files) == {"png", "json"}
            got = np.asarray(Image.open(io.BytesIO(files["png"])).convert("RGB"))
            assert np.array_equal(got, np.asarray(Image.open(io.BytesIO(images[key])).convert("RGB")))
        else:
            ext = "png" if i == 1 else "jpg"
            assert files[ext] == images[key]         # image bytes kept as they are
    assert json.loads(samples["000000004"]["json"])["url"].startswith("https://example.com/")
    # an index and a validated report beside every tar, listing exactly its samples
    for tar in sorted(out.glob("shard-*.tar")):
        idx = index_path(tar)
        lines = idx.read_text().splitlines()
        n = int(lines[0].split()[1])
        assert lines[0].startswith("v1.2") and n == len(lines) - 1 == len(tarfile.open(tar).getnames()) // 2
        report = read_report(tar, idx)
        assert report["validated"] and report["samples"] == n
    manifest = json.loads((out / "shard-manifest.json").read_text())
    assert manifest["written"] == 7 and manifest["shards"] == 3
    assert manifest["pattern"].endswith("shard-{000000..000002}.tar")


def test_rerun_neither_duplicates_nor_loses(dreamlip_csv, tmp_path):
    path, img_dir, _, _ = dreamlip_csv
    out = tmp_path / "out"
    args = ["--captions", str(path), "--images", str(img_dir), "--output-dir", str(out)]
    assert main(args + ["--max-per-shard", "2"]) == 0
    first = read_tars(out)
    tars_first = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    assert main(args + ["--max-per-shard", "2"]) == 0            # same input: byte-identical shards
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == tars_first
    assert main(args + ["--max-per-shard", "5"]) == 0            # fewer, larger shards: stale ones removed
    second = read_tars(out)
    assert sorted(first) == sorted(second) and len(second) == 7
    assert {p.name for p in out.glob("shard-0*")} == {f"shard-00000{i}.{e}" for i in range(2)
                                                    for e in ("tar", "idx", "idx.json")}


def test_shard_size_limit(dreamlip_csv, tmp_path):
    path, img_dir, _, _ = dreamlip_csv
    out = tmp_path / "out"
    assert main(["--captions", str(path), "--images", str(img_dir), "--output-dir", str(out),
                 "--shard-size", "24KB"]) == 0
    tars = sorted(out.glob("*.tar"))
    assert len(tars) > 1
    assert all(t.stat().st_size <= 24 * 1024 or len(tarfile.open(t).getnames()) == 2 for t in tars)
    assert len(read_tars(out)) == 7


def test_img2dataset_dreamlip(tmp_path):
    src = tmp_path / "dl"
    src.mkdir()
    with tarfile.open(src / "00000.tar", "w") as tf:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for i in range(6):
            key = f"0000{i:05d}"
            meta = {"url": f"http://x/{i}.jpg", "status": "success", "key": key, **dreamlip_row(i)}
            if i == 2:
                meta = {"url": "http://x/2.jpg"}                    # img2dataset run without the columns
            if i != 3:
                add(f"{key}.json", json.dumps(meta).encode())
            add(f"{key}.jpg", b"not an image" if i == 4 else image_bytes(i))
            add(f"{key}.txt", b"ignored caption column")
    out = tmp_path / "out"
    assert main(["--img2dataset", str(src / "00000.tar"), "--output-dir", str(out)]) == 0
    samples = read_tars(out)
    assert sorted(samples) == ["000000000", "000000001", "000000005"]
    rec = json.loads(samples["000000005"]["json"])
    assert rec["longSV_captions"] == ["long sv 5", "more sv 5"] and rec["url"] == "http://x/5.jpg"
    manifest = json.loads((out / "shard-manifest.json").read_text())
    assert manifest["skipped"] == {"bad_record": 1, "missing_json": 1, "corrupt_image": 1}


def test_pixelprose_csv_with_img2dataset_folder(tmp_path):
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    rows = []
    for i in range(4):
        url = f"https://pp.example/{i}/photo.jpg"
        if i != 3:                                        # files named by key, found through the url
            (img_dir / f"{i:05d}.jpg").write_bytes(image_bytes(10 + i))
            (img_dir / f"{i:05d}.json").write_text(json.dumps({"url": url, "key": f"{i:05d}"}))
        rows.append({"uid": str(i), "url": url, "original_caption": f"alt text {i}",
                     "vlm_caption": f"This image shows thing {i}. It is red.\nIt sits on a table."})
    path = tmp_path / "pixelprose.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "out"
    assert main(["--source", "pixelprose", "--captions", str(path), "--images", str(img_dir),
                 "--output-dir", str(out)]) == 0
    samples = read_tars(out)
    assert sorted(samples) == [f"{i:09d}" for i in range(3)]
    rec = json.loads(samples["000000001"]["json"])
    assert rec["original_caption"] == "alt text 1" and rec["caption"] == rows[1]["vlm_caption"]
    assert samples["000000001"]["jpg"] == image_bytes(11)
    assert caption_pool(rec, "textcrop_pixelprose") == ["alt text 1", "This image shows thing 1", "It is red",
                                                          "It sits on a table"]


@pytest.mark.parametrize("content,message", [
    (b"Image Path,raw_caption\nx.jpg,hello\n", "missing column"),
    (b"\xff\xfe\x00bad header\n", "not a readable UTF-8 CSV"),
    (None, "is not a file"),
], ids=["missing-column", "not-utf8", "absent"])
def test_bad_table_is_one_line_error_and_writes_nothing(tmp_path, capsys, content, message):
    """A CSV that cannot be used fails with exit 2 and one line naming the file; the output folder
    (and its missing parent) is not created."""
    path = tmp_path / "bad.csv"
    if content is not None:
        path.write_bytes(content)
    (tmp_path / "images").mkdir()
    out = tmp_path / "new" / "o"
    assert main(["--captions", str(path), "--images", str(tmp_path / "images"), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and str(path) in err and len(err.splitlines()) == 1
    assert not (tmp_path / "new").exists()


def test_bad_line_mid_table_removes_the_new_folder_keeps_an_existing_one(dreamlip_csv, tmp_path, capsys):
    """A CSV that breaks after rows were written: a folder this run created is removed; a folder that
    existed keeps what it held."""
    path, img_dir, _, _ = dreamlip_csv
    lines = path.read_bytes().splitlines(keepends=True)
    # past the reader's first decoded chunk, so good rows are written before the bad bytes are read
    path.write_bytes(b"".join(lines + lines[1:2] * 300) + b"\xff\xfe broken line\n")
    out = tmp_path / "o"
    assert main(["--captions", str(path), "--images", str(img_dir), "--output-dir", str(out)]) == 2
    assert re.search(r"captions\.csv line \d+: 'utf-8' codec", capsys.readouterr().err) and not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["--captions", str(path), "--images", str(img_dir), "--output-dir", str(out)]) == 2
    assert (out / "keep.txt").read_text() == "mine" and not list(out.glob("*.tmp"))


def test_index_only_leaves_bad_samples_out(tmp_path, capsys):
    urls = write_shards(tmp_path, 3, 6, bad={1: "corrupt_image", 2: "missing_json", 7: "bad_json",
                                             8: "empty_caption_pool", 9: "missing_image"})
    data = open(urls[2], "rb").read()
    open(urls[2], "wb").write(data[: len(data) // 2])            # truncated: reported, not fatal
    pattern = str(tmp_path / "shard-{0000..0002}.tar")
    assert main(["--index-only", pattern]) == 0
    printed = capsys.readouterr().out
    assert "indexed 7 samples" in printed and "bad shards: 1" in printed
    rep0 = read_report(urls[0], index_path(urls[0]))
    assert rep0["skipped"] == {"corrupt_image": 1, "missing_json": 1} and rep0["samples"] == 4
    names = [ln.split()[3] for ln in index_path(urls[0]).read_text().splitlines()[1:]]
    assert names == ["s00000.jpg", "s00003.jpg", "s00004.jpg", "s00005.jpg"]
    res = index_shards(pattern, validate=False)                    # structure only: decodes nothing
    assert res["indexed"] == 10 and res["skipped"] == {"missing_json": 1, "missing_image": 1}
    assert not read_report(urls[2], index_path(urls[2]))


def test_index_only_same_checks_as_the_loaders(tmp_path, capsys):
    """--index-only survives a json nested too deep for Python's parser and one over the size limit
    (bad_json), leaves a GIF named .jpg out as the torchvision loader skips it, keeps a 16-bit PNG."""
    urls = write_shards(tmp_path, 1, 6, bad={1: "nested_json", 2: "huge_json", 3: "gif_as_jpg", 4: "png16"})
    assert main(["--index-only", urls[0]]) == 0
    assert "indexed 3 samples" in capsys.readouterr().out
    rep = read_report(urls[0], index_path(urls[0]))
    assert rep["skipped"] == {"bad_json": 2, "unsupported_image_format": 1}
    assert sorted(rep["bad"]) == [["s00001", "bad_json"], ["s00002", "bad_json"],
                                  ["s00003", "unsupported_image_format"]]
    names = [ln.split()[3] for ln in index_path(urls[0]).read_text().splitlines()[1:]]
    assert names == ["s00000.jpg", "s00004.png", "s00005.jpg"]


def test_img2dataset_bad_json_is_skipped_and_no_temp_tar(tmp_path):
    src, out = tmp_path / "dl", tmp_path / "out"
    src.mkdir()
    files = []
    for i in range(4):
        meta = {"url": f"http://x/{i}.jpg", **dreamlip_row(i)}
        js = json.dumps(meta).encode()
        if i == 1:
            js = NESTED_JSON                                       # RecursionError in json.loads
        if i == 2:
            js = json.dumps({**meta, "raw_caption": "x" * (1 << 20)}).encode()     # over the size limit
        files += [(f"0000{i:05d}.json", js), (f"0000{i:05d}.jpg", image_bytes(i))]
    with tarfile.open(src / "00000.tar", "w") as tf:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    assert main(["--img2dataset", str(src / "00000.tar"), "--output-dir", str(out)]) == 0
    assert sorted(read_tars(out)) == ["000000000", "000000003"]
    assert json.loads((out / "shard-manifest.json").read_text())["skipped"] == {"bad_json": 2}
    assert not list(out.glob("*.tmp"))


def test_make_shards_exception_leaves_no_temp_tar(dreamlip_csv, tmp_path, monkeypatch):
    """A run stopped by an exception (here raised while the first shard is open) removes its .tar.tmp."""
    from cosmos_fast.data import shards

    path, img_dir, _, _ = dreamlip_csv
    calls = []
    real = shards.check_record

    def failing(record, mode="auto"):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return real(record, mode)
    monkeypatch.setattr(shards, "check_record", failing)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk on fire"):
        shards.make_shards("dreamlip", out, captions=path, images=img_dir)
    assert not out.exists()                  # the folder this run created is gone with its temp tar
    out.mkdir()
    with pytest.raises(RuntimeError, match="disk on fire"):
        calls.clear()
        shards.make_shards("dreamlip", out, captions=path, images=img_dir)
    assert list(out.iterdir()) == []         # an existing folder stays, without the temp tar


def test_shard_images_are_the_loaders_8_bit_images():
    """Formats outside JPEG/PNG/WebP are re-encoded as PNG from the loaders' 8-bit image (a 16-bit
    TIFF scaled, not clipped); a 32-bit TIFF, which neither loader trains on, is skipped."""
    from cosmos_fast.data.shards import _shard_image

    v = np.arange(0, 65536, 257 * 5, dtype=np.uint16).reshape(4, -1)
    buf = io.BytesIO()
    Image.fromarray(v).save(buf, format="TIFF")
    data, fmt, reason = _shard_image(buf.getvalue())
    assert (fmt, reason) == ("PNG", None) and np.array_equal(np.asarray(Image.open(io.BytesIO(data))), v // 257)
    buf = io.BytesIO()
    Image.fromarray(v.astype(np.int32) * 1000).save(buf, format="TIFF")
    assert _shard_image(buf.getvalue()) == (None, None, "unsupported_image_format")
    gif = image_bytes(0, "GIF")
    data, fmt, reason = _shard_image(gif)
    assert fmt == "PNG" and np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")),
                                           np.asarray(Image.open(io.BytesIO(gif)).convert("RGB")))


def test_index_offsets_point_at_the_data(tmp_path):
    urls = write_shards(tmp_path, 1, 4)
    write_index(urls[0])
    raw = open(urls[0], "rb").read()
    with tarfile.open(urls[0]) as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf}
    for line in index_path(urls[0]).read_text().splitlines()[1:]:
        parts = line.split()
        for ext, off, size, name in zip(parts[0::4], parts[1::4], parts[2::4], parts[3::4]):
            assert name.endswith(ext) and raw[int(off):int(off) + int(size)] == members[name]
    # a report goes stale when its tar changes
    assert read_report(urls[0], index_path(urls[0]))
    with open(urls[0], "ab") as fh:
        fh.write(b"\0" * 512)
    assert read_report(urls[0], index_path(urls[0])) is None
    assert report_path(index_path(urls[0])).is_file()


def test_cli_wiring_and_sizes(dreamlip_csv, tmp_path):
    parser = argparse.ArgumentParser(prog="cosmos-fast")
    sub = parser.add_subparsers(dest="command")
    add_make_shards_parser(sub)
    path, img_dir, _, _ = dreamlip_csv
    args = parser.parse_args(["make-shards", "--captions", str(path), "--images", str(img_dir),
                              "--output-dir", str(tmp_path / "o"), "--shard-size", "1MB"])
    assert args.shard_size == 1 << 20 and args.func(args) == 0
    assert parse_size("1GB") == 1 << 30 and parse_size("512MiB") == 512 << 20 and parse_size("1000") == 1000
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("lots")
