"""The torchvision backend: bad data, worker start-up, shard split by worker, resume with workers, the
fused augment (the contract shared with DALI: tests/test_loader_contract.py)."""
import io
import json
import logging

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from cosmos_fast.data.captions import DREAMLIP_FIELDS
from cosmos_fast.data.normalize import OPENAI_MEAN, OPENAI_STD
from cosmos_fast.data.stream import MAX_JSON_BYTES, StreamSpec, decode_image, steps_per_epoch
from cosmos_fast.data.torchvision_loader import WebDatasetLoader, worker_context, worker_loader_kwargs
from cosmos_fast.ops import multicrop as multicrop_op


def jpeg(seed, size=48):
    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def png16(value, size=(40, 30)):
    """A 16-bit grayscale PNG (PIL mode I;16) of a horizontal ramp from 0 up to ``value``."""
    ramp = np.linspace(0, value, size[0]).round().astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(np.tile(ramp, (size[1], 1))).save(buf, format="PNG")
    return buf.getvalue()


def gif(seed, size=48):
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpeg(seed, size))).save(buf, format="GIF")
    return buf.getvalue()


NESTED_JSON = b"[" * 200_000 + b"]" * 200_000          # RecursionError in json.loads


def record(idx):
    rec = {f: [] for f in DREAMLIP_FIELDS}
    rec["raw_caption"] = [f"item{idx} sentence {j}" for j in range(4)]
    return rec


def write_shards(root, n_shards, per_shard, bad=None):
    """Shards of valid samples; ``bad`` maps a global index to a kind of corruption."""
    bad = bad or {}
    urls = []
    for s in range(n_shards):
        path = root / f"shard-{s:04d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(s * per_shard, (s + 1) * per_shard):
                sample = {"__key__": f"s{i:05d}", "jpg": jpeg(i), "json": json.dumps(record(i)).encode()}
                kind = bad.get(i)
                if kind == "corrupt_image":
                    sample["jpg"] = b"\xff\xd8 this is not a jpeg"
                elif kind == "missing_json":
                    del sample["json"]
                elif kind == "missing_image":
                    del sample["jpg"]
                elif kind == "bad_json":
                    sample["json"] = b"{not json"
                elif kind == "nested_json":
                    sample["json"] = NESTED_JSON
                elif kind == "huge_json":                     # valid json over MAX_JSON_BYTES
                    rec = record(i)
                    rec["raw_caption"].append("x" * (1 << 20))
                    sample["json"] = json.dumps(rec).encode()
                elif kind == "gif_as_jpg":
                    sample["jpg"] = gif(i)
                elif kind == "png16":
                    del sample["jpg"]
                    sample["png"] = png16(257 * (40 + i))
                elif kind == "empty_caption_pool":
                    sample["json"] = json.dumps({f: [] for f in DREAMLIP_FIELDS}).encode()
                elif kind == "string_caption_field":
                    rec = record(i)
                    rec["raw_caption"] = f"item{i} first. item{i} second"
                    sample["json"] = json.dumps(rec).encode()
                sink.write(sample)
        urls.append(str(path))
    return urls


def spec(urls, **kw):
    base = dict(shards=urls, batch_size=4, seed=0, rank=0, world=1, num_workers=0, steps_per_epoch=4,
                resampled=False, shuffle_buffer=16, shuffle_initial=4, caption_mode="textcrop", num_captions=8,
                string_fields="split", global_size=32, local_size=16, n_local=6, crop_scale=0.4,
                tokenizer_name="ViT-B-16", context_length=77)
    base.update(kw)
    return StreamSpec(**base)


def all_batches(loader):
    return [b for b in loader]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), 4, 10)


def test_steps_per_epoch_official_sizing():
    assert steps_per_epoch(2_823_019, 1024, 16) == 2768      # CC3M row of the spec
    assert steps_per_epoch(10_010_225, 4096, 16) == 2448
    assert steps_per_epoch(100, 32, 0) == 4


def test_bad_data_is_counted_logged_and_skipped(tmp_path, caplog):
    kinds = ["corrupt_image", "missing_json", "missing_image", "bad_json", "empty_caption_pool"]
    urls = write_shards(tmp_path, 2, 12, bad={3: kinds[0], 5: kinds[1], 7: kinds[2], 13: kinds[3], 20: kinds[4]})
    # 19 valid samples, 20 needed: the whole data set is read at least once
    loader = WebDatasetLoader(spec(urls, steps_per_epoch=5, shuffle_buffer=1, shuffle_initial=1))
    with caplog.at_level(logging.WARNING, logger="cosmos_fast.data.stream"):
        batches = all_batches(loader)
    assert len(batches) == 5
    seen = {k for b in batches for k in b["keys"]}
    assert not seen & {"s00003", "s00005", "s00007", "s00013", "s00020"}
    assert set(loader.skipped) == set(kinds) and all(v in (1, 2) for v in loader.skipped.values())
    assert batches[-1]["skipped"] == loader.skipped
    assert "s00003" in caplog.text and "corrupt_image" in caplog.text and "shard-0000.tar" in caplog.text


def test_worker_start_forkserver_workers_log_and_count(tmp_path):
    """Workers start from a clean forkserver by default; their skip lines still reach stderr.

    Run in a fresh interpreter: a forkserver started by an earlier test keeps that test's stderr."""
    import subprocess
    import sys
    urls = write_shards(tmp_path, 2, 12, bad={3: "corrupt_image", 15: "bad_json"})
    code = (
        "import json, sys\n"
        "from cosmos_fast.data.stream import StreamSpec\n"
        "from cosmos_fast.data.torchvision_loader import WebDatasetLoader\n"
        "spec = StreamSpec(**json.loads(sys.argv[1]))\n"
        "assert spec.worker_start == 'forkserver'\n"
        "loader = WebDatasetLoader(spec)\n"
        "n = sum(1 for _ in loader)\n"
        "print(json.dumps({'batches': n, 'skipped': loader.skipped}))\n")
    kw = vars(spec(urls, num_workers=2, steps_per_epoch=4, shuffle_buffer=1, shuffle_initial=1))
    kw.pop("worker_start")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(kw)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {
        "batches": 4, "skipped": {"corrupt_image": 1, "bad_json": 1}}
    err = out.stderr
    assert "s00003" in err and "corrupt_image" in err and "shard-0000.tar" in err and "worker pid" in err
    assert "s00015" in err and "bad_json" in err and "shard-0001.tar" in err


def test_worker_start_context():
    assert worker_context("forkserver").get_start_method() == "forkserver"
    assert worker_context("spawn").get_start_method() == "spawn"
    assert worker_loader_kwargs(0) == {}
    assert worker_loader_kwargs(2, "spawn")["multiprocessing_context"].get_start_method() == "spawn"
    with pytest.raises(ValueError, match="data.worker_start = 'thread'"):
        worker_context("thread")


def test_any_json_failure_is_bad_json(tmp_path, caplog):
    """A json nested too deep for Python's parser (RecursionError) and one over MAX_JSON_BYTES are
    bad_json skips, not a crash that every resume would hit again."""
    urls = write_shards(tmp_path, 2, 12, bad={3: "nested_json", 14: "huge_json"})
    loader = WebDatasetLoader(spec(urls, steps_per_epoch=6, shuffle_buffer=1, shuffle_initial=1))  # > one pass
    with caplog.at_level(logging.WARNING, logger="cosmos_fast.data.stream"):
        batches = all_batches(loader)
    assert len(batches) == 6
    assert set(loader.skipped) == {"bad_json"} and loader.skipped["bad_json"] >= 2
    assert not {k for b in batches for k in b["keys"]} & {"s00003", "s00014"}
    lines = [r.getMessage() for r in caplog.records]
    assert any("s00003" in m and "shard-0000.tar" in m and "RecursionError" in m for m in lines)
    assert any("s00014" in m and "shard-0001.tar" in m and f"{MAX_JSON_BYTES}-byte limit" in m for m in lines)


def test_gray16_png_is_scaled_not_white(tmp_path):
    """A 16-bit grayscale PNG (mode I;16) is scaled to 8 bits as round(v / 257), as DALI decodes it;
    ``convert("RGB")`` alone clips it to white."""
    # every sample a dark 16-bit ramp (≤ 47 of 255 in 8 bits): the first global crop (no solarize)
    # stays dark; a white image would give ≥ 0.6 · 255 after brightness jitter
    urls = write_shards(tmp_path, 1, 8, bad={i: "png16" for i in range(8)})
    batches = all_batches(WebDatasetLoader(spec(urls, steps_per_epoch=2, shuffle_buffer=1, shuffle_initial=1)))
    assert len(batches) == 2 and batches[-1]["skipped"] == {}
    mean, std = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    for b in batches:
        pixels = b["crops"][0] * std + mean
        assert pixels.max() <= 47 * 1.4 / 255 + 1e-4, pixels.max()
    data = png16(65535, size=(256, 2))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    v = np.asarray(Image.open(io.BytesIO(data))).astype(int)
    img = decode_image(data)
    assert img.mode == "L" and np.array_equal(np.asarray(img), np.floor(v / 257 + 0.5).astype(np.uint8))


def test_formats_dali_cannot_decode_are_skipped(tmp_path, caplog):
    """A GIF named .jpg is unsupported_image_format here too, as in the DALI backend's index; so is a
    32-bit integer image (DALI fails on it) and a float one."""
    urls = write_shards(tmp_path, 1, 12, bad={2: "gif_as_jpg"})
    loader = WebDatasetLoader(spec(urls, steps_per_epoch=2, shuffle_buffer=1, shuffle_initial=1))
    with caplog.at_level(logging.WARNING, logger="cosmos_fast.data.stream"):
        batches = all_batches(loader)
    assert loader.skipped == {"unsupported_image_format": 1}
    assert "s00002" not in {k for b in batches for k in b["keys"]}
    assert "s00002" in caplog.text and "GIF" in caplog.text
    from cosmos_fast.data.captions import SampleError
    for arr in (np.full((4, 4), 70000, np.int32), np.full((4, 4), 0.5, np.float32)):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="TIFF")
        with pytest.raises(SampleError) as e:
            decode_image(buf.getvalue())
        assert e.value.reason == "unsupported_image_format"


def test_allow_pipe_false_refuses_shell_urls(tmp_path):
    """pipe:CMD runs CMD (webdataset's default, kept); allow_pipe=False refuses it, however spelled."""
    urls = write_shards(tmp_path, 1, 8)
    piped = [f"pipe:cat {urls[0]}"]
    assert len(all_batches(WebDatasetLoader(spec(piped, steps_per_epoch=1)))) == 1
    for url in (piped[0], f" PIPE:cat {urls[0]}", "s3://bucket/shard-0000.tar"):
        with pytest.raises(ValueError, match="data.allow_pipe is false") as e:
            WebDatasetLoader(spec([urls[0], url], steps_per_epoch=1, allow_pipe=False))
        assert repr(url) in str(e.value)
    WebDatasetLoader(spec(urls, steps_per_epoch=1, allow_pipe=False))      # local paths are fine


def test_string_fields_policy(tmp_path):
    urls = write_shards(tmp_path, 1, 8, bad={2: "string_caption_field"})
    split = WebDatasetLoader(spec(urls, steps_per_epoch=1, shuffle_buffer=1, shuffle_initial=1))
    assert all_batches(split) and split.skipped == {}
    reject = WebDatasetLoader(spec(urls, steps_per_epoch=1, shuffle_buffer=1, shuffle_initial=1,
                                   string_fields="reject"))
    all_batches(reject)
    assert reject.skipped == {"string_caption_field": 1}


def test_truncated_tar_is_reported_and_skipped(tmp_path):
    urls = write_shards(tmp_path, 2, 8)
    data = open(urls[0], "rb").read()
    open(urls[0], "wb").write(data[: len(data) // 3])
    loader = WebDatasetLoader(spec(urls, steps_per_epoch=4))     # more than the intact shard holds
    batches = all_batches(loader)
    assert len(batches) == 4
    assert loader.skipped.get("bad_shard", 0) >= 1


def test_split_by_rank_and_worker(shards):
    keys = {}
    for rank in range(2):
        loader = WebDatasetLoader(spec(shards, rank=rank, world=2, num_workers=2, steps_per_epoch=2))
        keys[rank] = {k for b in all_batches(loader) for k in b["keys"]}
    assert keys[0] and keys[1] and not keys[0] & keys[1]


def test_too_few_shards_rejected(shards):
    with pytest.raises(ValueError, match="4 shard.* for 4 worker.* × 2 rank"):
        WebDatasetLoader(spec(shards, num_workers=4, world=2, steps_per_epoch=4))
    WebDatasetLoader(spec(shards, num_workers=4, world=2, steps_per_epoch=4, resampled=True))


def test_resampled_mode(shards):
    batches = all_batches(WebDatasetLoader(spec(shards, resampled=True, steps_per_epoch=6)))
    assert len(batches) == 6


@pytest.mark.parametrize("workers,stop", [(2, 3), (2, 4)])
def test_resume_mid_epoch_with_workers_is_exact(shards, workers, stop):
    """Resume rotates the workers so the data loader's round robin continues where it stopped (the
    contract itself, without workers: tests/test_loader_contract.py)."""
    full = all_batches(WebDatasetLoader(spec(shards, num_workers=workers, steps_per_epoch=6)))
    first = WebDatasetLoader(spec(shards, num_workers=workers, steps_per_epoch=6))
    it = iter(first)
    head = [next(it) for _ in range(stop)]
    state = first.state_dict()
    resumed = WebDatasetLoader(spec(shards, num_workers=workers, steps_per_epoch=6))
    resumed.load_state_dict(state)
    tail = all_batches(resumed)
    got = head + tail
    assert [b["keys"] for b in got] == [b["keys"] for b in full]
    for x, y in zip(got, full):
        assert torch.equal(x["captions"], y["captions"])
        assert all(torch.equal(a, b) for a, b in zip(x["crops"], y["crops"]))


@pytest.mark.parametrize("workers", [0, 2])
def test_fused_augment_gives_the_same_batches(tmp_path, workers):
    """data.augment=fused (the Numba kernel) yields exactly the batches of the PIL ops, also from
    forkserver workers (which load the kernel from Numba's disk cache)."""
    pytest.importorskip("numba")
    urls = write_shards(tmp_path, 2, 10)
    kw = dict(num_workers=workers, steps_per_epoch=4, n_local=2)
    pil = all_batches(WebDatasetLoader(spec(urls, augment="torchvision", **kw)))
    fused_loader = WebDatasetLoader(spec(urls, augment="auto", **kw))
    assert fused_loader.spec.augment == "fused"
    fused = all_batches(fused_loader)
    assert len(pil) == len(fused) == 4
    for a, b in zip(pil, fused):
        assert a["keys"] == b["keys"] and torch.equal(a["captions"], b["captions"])
        assert all(torch.equal(x, y) for x, y in zip(a["crops"], b["crops"]))


def test_augment_choice_is_validated(tmp_path, monkeypatch):
    urls = write_shards(tmp_path, 1, 4)
    with pytest.raises(ValueError, match="data.augment"):
        WebDatasetLoader(spec(urls, augment="simd"))
    with pytest.raises(ValueError, match="data.augment = 'pil' was renamed to 'torchvision'"):
        WebDatasetLoader(spec(urls, augment="pil"))
    monkeypatch.setattr(multicrop_op, "numba_available", lambda: False)
    assert WebDatasetLoader(spec(urls, augment="auto")).spec.augment == "torchvision"
    with pytest.raises(ValueError, match="needs numba"):
        WebDatasetLoader(spec(urls, augment="fused"))
