"""The DALI backend on DALI's CPU backend: batch layout and normalisation equal to the torchvision
backend, every §4.4 op against PIL, crop parameters and pixels against torchvision in distribution
(two-sample tests, fixed seeds), skip-and-count of bad data, exact resume."""
import io
import json
import logging
import tarfile
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

pytest.importorskip("nvidia.dali")

from nvidia.dali import fn, pipeline_def, types  # noqa: E402

from cosmos_fast.data import dali_loader as dl  # noqa: E402
from cosmos_fast.data import dali_multicrop as dm  # noqa: E402
from cosmos_fast.data import recipe  # noqa: E402
from cosmos_fast.data.backends import build_loader  # noqa: E402
from cosmos_fast.data.normalize import OPENAI_MEAN, OPENAI_STD  # noqa: E402
from cosmos_fast.data.recipe import PARAM_FIELDS  # noqa: E402
from cosmos_fast.data.shards import index_path, write_index  # noqa: E402
from cosmos_fast.data.stream import decode_image  # noqa: E402
from cosmos_fast.data.synthetic import make_scene  # noqa: E402
from cosmos_fast.data.torchvision_loader import WebDatasetLoader  # noqa: E402
from cosmos_fast.ops import multicrop as multicrop_op  # noqa: E402
from cosmos_fast.ops.multicrop import augment_crop  # noqa: E402
from tests.test_loader import spec, write_shards  # noqa: E402
from multicrop_spy import spy_multicrop  # noqa: E402

DaliLoader = dl.DaliWebDatasetLoader


def dali(sp, **kw):
    kw.setdefault("device", "cpu")
    kw.setdefault("num_threads", 2)
    return DaliLoader(sp, **kw)


def ks(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    grid = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)).max())


def ks_limit(n, m, c=1.95):           # c(α = 0.001)
    return c * ((n + m) / (n * m)) ** 0.5


def z_two(k1, n1, k2, n2) -> float:
    p = (k1 + k2) / (n1 + n2)
    if p in (0.0, 1.0):
        return 0.0 if k1 / n1 == k2 / n2 else float("inf")
    return abs(k1 / n1 - k2 / n2) / (p * (1 - p) * (1 / n1 + 1 / n2)) ** 0.5


def write_tar(path, files):
    """A plain tar of (member name, bytes) pairs, in their order."""
    with tarfile.open(path, "w") as tf:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("dali_shards"), 4, 10)


# ------------------------------------------------------------------------ layout, dtype, normalisation
# (the layout, determinism and resume contract shared with torchvision: tests/test_loader_contract.py)
def test_normalised_like_torchvision(shards):
    """Normalised like ToTensor + Normalize: values of a [0, 255] image, OpenAI mean / std."""
    batch = next(iter(dali(spec(shards, steps_per_epoch=1))))
    lo = (0 - np.array(OPENAI_MEAN)) / np.array(OPENAI_STD)
    hi = (1 - np.array(OPENAI_MEAN)) / np.array(OPENAI_STD)
    for c in batch["crops"]:
        per_channel = c.transpose(0, 1).reshape(3, -1)
        assert (per_channel.min(1).values >= torch.tensor(lo) - 1e-5).all()
        assert (per_channel.max(1).values <= torch.tensor(hi) + 1e-5).all()


def test_black_images_normalise_exactly(tmp_path):
    """Every §4.4 op maps black to black, so each crop is exactly −mean/std per channel."""
    path = tmp_path / "black.tar"
    buf = io.BytesIO()
    Image.new("RGB", (40, 30)).save(buf, format="PNG")
    rec = json.dumps({"raw_caption": ["a black picture"], **{f: [] for f in
                      ("shortIB_captions", "shortSV_captions", "shortLLA_captions", "longIB_captions",
                       "longSV_captions", "longLLA_captions")}}).encode()
    write_tar(path, ((f"k{i}.{ext}", data) for i in range(8) for ext, data in (("png", buf.getvalue()), ("json", rec))))
    batch = next(iter(dali(spec([str(path)], steps_per_epoch=1, n_local=2))))
    ref = next(iter(WebDatasetLoader(spec([str(path)], steps_per_epoch=1, n_local=2))))
    want = torch.tensor([-m / s for m, s in zip(OPENAI_MEAN, OPENAI_STD)]).view(1, 3, 1, 1)
    for c, r in zip(batch["crops"], ref["crops"]):
        torch.testing.assert_close(c, want.expand_as(c), rtol=0, atol=1e-5)
        torch.testing.assert_close(c, r, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------ each op against PIL
def _run_ops(images, factor, turns):
    @pipeline_def(batch_size=len(images), num_threads=1, device_id=None, seed=0)
    def ops():
        x = fn.external_source(source=lambda: images, layout="HWC", batch=True)
        f = fn.external_source(source=lambda: [np.float32(factor)] * len(images), batch=True)
        t = fn.external_source(source=lambda: [np.float32(turns)] * len(images), batch=True)
        outs = (dm._brightness(x, f), dm._contrast(x, f, False), dm._saturation(x, f), dm._grayscale(x),
                dm._hue(x, t, False), dm._solarize(x), fn.gaussian_blur(x, sigma=f))
        return outs
    pipe = ops()
    pipe.build()
    return [[np.asarray(out[i]).astype(int) for i in range(len(images))] for out in pipe.run()]


@pytest.mark.parametrize("factor,hue", [(1.3, 0.1), (0.7, -0.07)], ids=["up", "down"])
def test_ops_match_pil(factor, hue):
    rng = np.random.default_rng(0)
    smooth = np.asarray(Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((40, 30),
                                                                                                 Image.BICUBIC))
    scene = np.asarray(make_scene(rng, 48)[0])
    images = [smooth, scene]
    steps = int(np.int8(hue * 255))                       # torchvision: int8(hue · 255) of a 256-step turn
    outs = _run_ops(images, factor, steps / 256)
    for i, img in enumerate(images):
        pil = Image.fromarray(img)
        refs = {"brightness": ImageEnhance.Brightness(pil).enhance(factor),
                "contrast": ImageEnhance.Contrast(pil).enhance(factor),
                "saturation": ImageEnhance.Color(pil).enhance(factor),
                "grayscale": TF.rgb_to_grayscale(pil, 3), "hue": TF.adjust_hue(pil, hue),
                "solarize": ImageOps.solarize(pil, 128),
                "blur": pil.filter(ImageFilter.GaussianBlur(factor))}
        for (name, ref), out in zip(refs.items(), outs):
            diff = np.abs(out[i] - np.asarray(ref).astype(int))
            print(name, i, "max", diff.max(), "mean", diff.mean())
            # exact up to rounding (saturation rounds where PIL truncates); hue up to PIL's 8-bit HSV;
            # blur: PIL's 3-box approximation of a Gaussian
            max_diff, mean_diff = {"saturation": (1, 0.75), "hue": (16, 1.5), "blur": (12, 1.5)}.get(name, (1, 0.1))
            assert diff.max() <= max_diff and diff.mean() <= mean_diff, name


def test_hue_mode_resolution_and_fallback(monkeypatch, caplog):
    assert dm.resolve_hue_mode("exact", gpu=True) == "float"          # the GPU graph: DALI arithmetic
    assert dm.resolve_hue_mode("linear", gpu=False) == "linear"
    assert dm.resolve_hue_mode("float", gpu=False) == "float"
    with pytest.raises(ValueError, match="hue_mode"):
        dm.resolve_hue_mode("pil", gpu=False)
    if multicrop_op.numba_available():
        assert dm.resolve_hue_mode("exact", gpu=False) == "numba"
    monkeypatch.setattr(multicrop_op, "numba_available", lambda: False)
    monkeypatch.setattr(dm, "_WARNED_NO_NUMBA", [])
    with caplog.at_level(logging.WARNING, logger="cosmos_fast.data.dali_multicrop"):
        assert dm.resolve_hue_mode("exact", gpu=False) == "float"
        assert dm.resolve_hue_mode("exact", gpu=False) == "float"
    assert caplog.text.count("numba is not installed") == 1


def test_color_jitter_order_matches_pil(hue_mode="float"):
    """The operator graph's jitter (the GPU path): with given factors, each of several orders is close
    to torchvision's ops applied in that order."""
    rng = np.random.default_rng(2)
    images = [np.asarray(make_scene(rng, 40)[0]) for _ in range(2)]
    orders = [0, 7, 16, 23]
    b, c, sat, hue = 1.4, 0.6, 1.2, 0.08
    n = len(images) * len(orders)
    batch = [images[i % len(images)] for i in range(n)]
    order_of = [orders[i // len(images)] for i in range(n)]

    @pipeline_def(batch_size=n, num_threads=1, device_id=None, seed=0, enable_conditionals=True)
    def jitter():
        x = fn.external_source(source=lambda: batch, layout="HWC", batch=True)

        def const(v, dtype=np.float32):
            return fn.external_source(source=lambda: [np.array(v, dtype=dtype)] * n, batch=True)
        params = {"brightness": const(b), "contrast": const(c), "saturation": const(sat), "hue": const(hue),
                  "order": fn.external_source(source=lambda: [np.array(o, np.int32) for o in order_of], batch=True)}
        return dm._color_jitter(x, params, False, hue_mode)
    pipe = jitter()
    pipe.build()
    out = pipe.run()[0]
    ops = (lambda im: TF.adjust_brightness(im, b), lambda im: TF.adjust_contrast(im, c),
           lambda im: TF.adjust_saturation(im, sat), lambda im: TF.adjust_hue(im, hue))
    refs = []
    for i in range(n):
        im = Image.fromarray(batch[i])
        for op in recipe.JITTER_ORDERS[order_of[i]]:
            im = ops[op](im)
        refs.append(np.asarray(im).astype(int))
        diff = np.abs(np.asarray(out[i]).astype(int) - refs[-1])
        print(order_of[i], "max", diff.max(), "mean", diff.mean())
        assert diff.max() <= 12 and diff.mean() <= 1.5, order_of[i]
    # the orders give visibly different images, so a wrong order would fail above
    assert np.abs(refs[0] - refs[-1]).mean() > 3


# ------------------------------------------------------------------------ distributions vs torchvision
N_IMAGES = 160


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """160 synthetic photos 72×48 (non-square, so the crop aspect limits matter), in one shard."""
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("scenes") / "scenes.tar"
    images = []

    def files():
        for i in range(N_IMAGES):
            img, rec = make_scene(rng, 72)
            img = img.resize((72, 48), Image.BICUBIC)
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            images.append(img)
            yield f"p{i:04d}.png", buf.getvalue()
            yield f"p{i:04d}.json", json.dumps(rec).encode()
    write_tar(path, files())
    write_index(path)
    return str(path), images


KINDS = ("global1", "global2", "local")


@pytest.fixture(scope="module", params=["exact", "float"])
def dali_params(scenes, request):
    """DALI crops and their random parameters (build_pipeline(debug=True)), per crop kind: the exact
    CPU path (the fused kernel) and the operator graph (what the GPU runs)."""
    path, _ = scenes
    pipe = dm.build_pipeline([path], [str(index_path(path))], 40, global_size=32, local_size=16, crop_scale=0.4,
                             n_local=6, shuffle_buffer=1, seed=3, reader_seed=4, num_threads=2, debug=True,
                             hue_mode=request.param)
    params, pixels = defaultdict(list), defaultdict(list)
    for _ in range(N_IMAGES // 40):
        out = pipe.run()
        crops, debug = out[:8], out[9:]
        for j in range(8):
            kind = KINDS[min(j, 2)]
            params[kind].append(np.asarray(debug[j].as_tensor()))
            pixels[kind].append(np.asarray(crops[j].as_tensor()))
    return ({k: dict(zip(dm.DEBUG_FIELDS, np.concatenate(v).T)) for k, v in params.items()},
            {k: np.concatenate(v) for k, v in pixels.items()})


@pytest.fixture(scope="module")
def torchvision_params(scenes):
    """The same quantities from MultiCropTransform, by spying on the functions it calls."""
    return spy_multicrop(scenes[1])


@pytest.mark.parametrize("kind,blur_p,solarize_p", [("global1", 1.0, 0.0), ("global2", 0.1, 0.2),
                                                    ("local", 0.5, 0.0)])
def test_random_op_rates_match_torchvision(dali_params, torchvision_params, kind, blur_p, solarize_p):
    p = dali_params[0][kind]
    counts = torchvision_params[0][kind]
    n = len(p["flip"])
    assert n == counts["crops"] == N_IMAGES * (6 if kind == "local" else 1)
    for field, tv_name, nominal in (("flip", "hflip", 0.5), ("jitter", "adjust_brightness", 0.8),
                                    ("gray", "rgb_to_grayscale", 0.2), ("blur", "blur", blur_p),
                                    ("solarize", "solarize", solarize_p)):
        k = int(p[field].sum())
        print(kind, field, "dali", k / n, "torchvision", counts[tv_name] / n, "nominal", nominal)
        assert z_two(k, n, counts[tv_name], n) < 4, field
        assert abs(k / n - nominal) <= 4 * (nominal * (1 - nominal) / n) ** 0.5 + 1e-9, field
    sig = p["radius"]
    assert sig.min() >= 0.1 and sig.max() <= 2.0
    assert ks(sig, torchvision_params[3][kind] or [0.1, 2.0]) < ks_limit(n, max(1, len(torchvision_params[3][kind])))


@pytest.mark.parametrize("kind", KINDS)
def test_color_jitter_params_match_torchvision(dali_params, torchvision_params, kind):
    """Factor laws of ColorJitter(.4, .4, .2, .1) and its random order (uniform over the 24 orders)."""
    p = dali_params[0][kind]
    tv = torchvision_params[5][kind]
    on = p["jitter"] == 1
    for op in ("brightness", "contrast", "saturation", "hue"):
        dist, limit = ks(p[op][on], tv[op]), ks_limit(int(on.sum()), len(tv[op]))
        print(kind, op, "KS", dist, "limit", limit)
        assert dist < limit, op
    assert p["brightness"].min() >= 0.6 and p["brightness"].max() <= 1.4
    assert p["saturation"].min() >= 0.8 and p["saturation"].max() <= 1.2 and np.abs(p["hue"]).max() <= 0.1
    order = p["order"].astype(int)
    freq = np.bincount(order, minlength=24)
    assert order.min() >= 0 and order.max() <= 23
    chi2 = ((freq - len(order) / 24) ** 2 / (len(order) / 24)).sum()
    assert chi2 < 60, chi2                                          # 23 dof: P(chi2 > 60) < 1e-4
    names = ("brightness", "contrast", "saturation", "hue")
    first = Counter(names[recipe.JITTER_ORDERS[o][0]] for o in order[on])
    tv_first = Counter(tv["first"])
    for op in names:                                                # the op applied first: 1/4 each
        assert z_two(first[op], int(on.sum()), tv_first[op], len(tv["first"])) < 4, op


@pytest.mark.parametrize("kind,lo,hi", [("global1", 0.4, 1.0), ("global2", 0.4, 1.0), ("local", 0.05, 0.4)])
def test_crop_windows_match_torchvision(dali_params, torchvision_params, kind, lo, hi):
    p = dali_params[0][kind]
    area = p["h"] * p["w"] / (p["img_h"] * p["img_w"])
    ratio = p["w"] / p["h"]
    assert (p["y0"] >= 0).all() and (p["x0"] >= 0).all()
    assert (p["y0"] + p["h"] <= p["img_h"]).all() and (p["x0"] + p["w"] <= p["img_w"]).all()
    assert area.min() >= lo * 0.9 and area.max() <= hi * 1.05
    tv_area, tv_ratio = torchvision_params[1][kind], torchvision_params[2][kind]
    d_area, d_ratio = ks(area, tv_area), ks(np.log(ratio), np.log(tv_ratio))
    limit = ks_limit(len(area), len(tv_area))
    print(kind, "KS area", d_area, "KS log-ratio", d_ratio, "limit", limit)
    assert d_area < limit and d_ratio < limit


@pytest.mark.parametrize("kind", KINDS)
def test_crop_pixels_match_torchvision(dali_params, torchvision_params, kind):
    """Per-crop mean and contrast of the normalised crops agree in distribution."""
    d, t = dali_params[1][kind], torchvision_params[4][kind]
    assert d.shape[1:] == t.shape[1:]
    for stat in ("mean", "std"):
        a, b = getattr(d, stat)(axis=(1, 2, 3)), getattr(t, stat)(axis=(1, 2, 3))
        dist, limit = ks(a, b), ks_limit(len(a), len(b))
        print(kind, stat, "dali", a.mean(), "torchvision", b.mean(), "KS", dist, "limit", limit)
        assert dist < limit, stat
    for c in range(3):                                          # channel means: colour ops agree too
        dist = ks(d[:, c].mean(axis=(1, 2)), t[:, c].mean(axis=(1, 2)))
        assert dist < ks_limit(len(d), len(t)), c


@pytest.fixture(scope="module")
def jpeg_scenes(tmp_path_factory):
    """24 JPEG photos of different sizes (so each sample is identified by its size), in one shard."""
    rng = np.random.default_rng(5)
    path = tmp_path_factory.mktemp("jpeg") / "jpeg.tar"
    images = []

    def files():
        for i in range(24):
            size = (int(rng.integers(40, 160)), int(rng.integers(40, 160)))
            buf = io.BytesIO()
            img, rec = make_scene(rng, max(size))
            img.resize(size, Image.BICUBIC).save(buf, format="JPEG", quality=int(rng.choice([70, 90])),
                                                 subsampling=int(rng.choice([0, 2])))
            images.append(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
            yield f"j{i:03d}.jpg", buf.getvalue()
            yield f"j{i:03d}.json", json.dumps(rec).encode()
    write_tar(path, files())
    write_index(path)
    return str(path), images


def test_exact_cpu_pipeline_equals_torchvision_crops(jpeg_scenes):
    """The whole DALI CPU pipeline (decode + fused kernel) gives, for the random parameters it drew,
    exactly the crops torchvision makes from the PIL-decoded JPEG with those parameters (the kernel
    equals torchvision's functions: tests/test_multicrop.py)."""
    pytest.importorskip("numba")
    path, images = jpeg_scenes
    pipe = dm.build_pipeline([path], [str(index_path(path))], 12, global_size=48, local_size=20, crop_scale=0.4,
                             n_local=6, shuffle_buffer=1, seed=11, reader_seed=2, num_threads=2, debug=True)
    checked = Counter()
    for run in range(2):
        out = pipe.run()
        crops, debug = out[:8], out[9:]
        for i in range(12):
            img = images[run * 12 + i]                   # no shuffling: the shard's order
            for j in range(8):
                p = dict(zip(dm.DEBUG_FIELDS, np.asarray(debug[j][i]).tolist()))
                assert (p["img_h"], p["img_w"]) == (img.height, img.width)
                want = augment_crop(np.asarray(img), [p[f] for f in PARAM_FIELDS], 48 if j < 2 else 20)
                assert np.array_equal(np.asarray(crops[j][i]), want), (run, i, j, p)
                checked.update(f for f in ("flip", "jitter", "gray", "blur", "solarize") if p[f])
    assert set(checked) == {"flip", "jitter", "gray", "blur", "solarize"}, checked


# ------------------------------------------------------------------------ bad data
def test_index_time_skips_counted_not_fatal(tmp_path, caplog):
    kinds = {3: "corrupt_image", 5: "missing_json", 7: "missing_image", 13: "bad_json", 20: "empty_caption_pool"}
    urls = write_shards(tmp_path, 2, 12, bad=kinds)
    loader = dali(spec(urls, steps_per_epoch=5, shuffle_buffer=4, n_local=2))
    with caplog.at_level(logging.WARNING, logger="cosmos_fast.data.dali_loader"):
        batches = list(loader)
    assert len(batches) == 5
    seen = {k for b in batches for k in b["keys"]}
    assert not seen & {f"s{i:05d}" for i in kinds}
    assert loader.skipped == {v: 1 for v in kinds.values()} == batches[-1]["skipped"]
    assert "left out of its index" in caplog.text
    loader.set_epoch(1)                                          # counted again for the next pass
    list(loader)
    assert loader.skipped == {v: 2 for v in kinds.values()}


@pytest.mark.parametrize("bad,buffer", [(2, 1), (9, 1), (9, 8)], ids=["first-run", "after-checkpoint", "shuffled"])
def test_decode_error_at_run_time_drops_the_batch(tmp_path, caplog, bad, buffer):
    """A failed decode drops its whole pipeline batch; the log line names that batch's shard and keys
    (read again from the last checkpoint: the decoder reports no sample)."""
    urls = write_shards(tmp_path, 1, 20, bad={bad: "corrupt_image"})
    write_index(urls[0], validate=False)                         # an unvalidated index (as wds2idx makes)
    loader = dali(spec(urls, steps_per_epoch=4, shuffle_buffer=buffer, n_local=2), validate=False)
    with caplog.at_level(logging.WARNING, logger="cosmos_fast.data.dali_loader"):
        batches = list(loader)
    assert len(batches) == 4
    assert loader.skipped == {"decode_error_batch": 4}          # one batch (B = 4) is dropped
    kept = [k for b in batches for k in b["keys"]]
    dropped = sorted({f"s{i:05d}" for i in range(20)} - set(kept))     # 16 kept + 4 dropped = one pass
    assert len(set(kept)) == 16 and f"s{bad:05d}" in dropped
    if buffer == 1:
        first = bad // 4 * 4
        assert kept == [f"s{i:05d}" for i in range(20) if not first <= i < first + 4]
    (line,) = [r.getMessage() for r in caplog.records if "decode_error_batch" in r.getMessage()
               and "skipping" in r.getMessage()]
    named = line.split("(", 1)[1].split(f" in {urls[0]}")[0].split(", ")
    assert sorted(named) == dropped, line


def test_run_time_caption_skip_refills_the_batch(tmp_path):
    urls = write_shards(tmp_path, 1, 12, bad={1: "string_caption_field", 6: "string_caption_field"})
    loader = dali(spec(urls, steps_per_epoch=2, shuffle_buffer=1, n_local=2, string_fields="reject"))
    batches = list(loader)
    keys = [k for b in batches for k in b["keys"]]
    assert len(keys) == 8 and len(set(keys)) == 8 and not {"s00001", "s00006"} & set(keys)
    assert loader.skipped == {"string_caption_field": 2}
    assert all(b["crops"][0].shape[0] == 4 and b["captions"].shape == (32, 77) for b in batches)


@pytest.mark.parametrize("validate", [True, False], ids=["index-time", "run-time"])
def test_any_json_failure_is_bad_json(tmp_path, validate):
    """A json nested too deep for Python's parser and one over MAX_JSON_BYTES are bad_json: left out
    by the indexer, or (index without validation) dropped by the caption job; never a crash."""
    urls = write_shards(tmp_path, 2, 8, bad={3: "nested_json", 12: "huge_json"})
    if not validate:
        for u in urls:
            write_index(u, validate=False)
    loader = dali(spec(urls, steps_per_epoch=3, shuffle_buffer=1, n_local=1), hue_mode="linear", validate=validate)
    batches = list(loader)
    assert len(batches) == 3 and loader.skipped == {"bad_json": 2}
    assert not {k for b in batches for k in b["keys"]} & {"s00003", "s00012"}


def test_gif_named_jpg_same_reason_in_both_backends(tmp_path):
    urls = write_shards(tmp_path, 1, 12, bad={2: "gif_as_jpg"})
    kw = dict(steps_per_epoch=2, shuffle_buffer=1, shuffle_initial=1, n_local=1)
    tv = WebDatasetLoader(spec(urls, **kw))
    tv_keys = [k for b in tv for k in b["keys"]]
    loader = dali(spec(urls, **kw), hue_mode="linear")
    dali_keys = [k for b in loader for k in b["keys"]]
    assert tv.skipped == loader.skipped == {"unsupported_image_format": 1}
    assert tv_keys == dali_keys and "s00002" not in dali_keys


def test_gray16_png_same_pixels_in_both_backends(tmp_path):
    """DALI's CPU decoder reads a 16-bit grayscale PNG as round(v / 257), the torchvision backend's
    scaling (decode_image): the index keeps it, and the exact pipeline's crops equal torchvision's crops
    of decode_image's pixels."""
    pytest.importorskip("numba")
    from tests.test_loader import png16, record

    full = np.arange(65536, dtype=np.uint16).reshape(256, 256)       # every 16-bit value
    buf = io.BytesIO()
    Image.fromarray(full).save(buf, format="PNG")
    data = [buf.getvalue()] + [png16(257 * 40 + 997 * i, size=(40 + i, 30)) for i in range(7)]
    path = tmp_path / "gray16.tar"
    write_tar(path, ((f"g{i}.{ext}", d) for i, png in enumerate(data)
                     for ext, d in (("png", png), ("json", json.dumps(record(i)).encode()))))
    assert write_index(path)["skipped"] == {}
    images = [np.asarray(decode_image(d).convert("RGB")) for d in data]
    pipe = dm.build_pipeline([str(path)], [str(index_path(path))], 8, global_size=48, local_size=20, crop_scale=0.4,
                             n_local=2, shuffle_buffer=1, seed=3, reader_seed=2, num_threads=2, debug=True)
    out = pipe.run()
    crops, debug = out[:4], out[5:]
    for i, img in enumerate(images):
        for j in range(4):
            p = dict(zip(dm.DEBUG_FIELDS, np.asarray(debug[j][i]).tolist()))
            assert (p["img_h"], p["img_w"]) == img.shape[:2]
            want = augment_crop(img, [p[f] for f in PARAM_FIELDS], 48 if j < 2 else 20)
            assert np.array_equal(np.asarray(crops[j][i]), want), (i, j, p)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def decode():
        x = fn.external_source(source=lambda: [np.frombuffer(data[0], np.uint8)], batch=True)
        return fn.decoders.image(x, device="cpu", output_type=types.RGB)
    dec = decode()
    dec.build()
    assert np.array_equal(np.asarray(dec.run()[0][0]), images[0])        # all 65536 values


def test_allow_pipe_false_refuses_shell_urls(tmp_path):
    """pipe: URLs and s3:// (which this backend reads through ``pipe:aws s3 cp``) are refused at start."""
    urls = write_shards(tmp_path, 1, 8)
    for url in (f"pipe:cat {urls[0]}", "s3://bucket/shard.tar"):
        with pytest.raises(ValueError, match="data.allow_pipe is false"):
            dali(spec([url], allow_pipe=False), cache_dir=tmp_path / "cache")
    loader = dali(spec(urls, allow_pipe=False))
    with pytest.raises(ValueError, match="data.allow_pipe is false"):
        loader._local(f"pipe:cat {urls[0]}")                           # the fetch path checks too
    assert not (tmp_path / "cache").exists()


def test_truncated_and_unfetchable_shards_are_skipped(tmp_path):
    urls = write_shards(tmp_path, 3, 8)
    data = open(urls[0], "rb").read()
    open(urls[0], "wb").write(data[: len(data) // 3])
    remote = [f"pipe:cat {urls[1]}", f"pipe:cat {tmp_path / 'missing.tar'}", urls[0], urls[2]]
    loader = dali(spec(remote, steps_per_epoch=4, shuffle_buffer=1, n_local=2), cache_dir=tmp_path / "cache",
                  retries=2)
    batches = list(loader)
    keys = {k for b in batches for k in b["keys"]}
    assert len(batches) == 4 and loader.skipped == {"bad_shard": 2}
    assert keys == {f"s{i:05d}" for i in range(8, 24)}              # shards 1 (piped) and 2
    assert len(list((tmp_path / "cache").glob("*.tar"))) == 1 and list((tmp_path / "cache").glob("*.idx"))


# ------------------------------------------------------------------------ order, determinism, resume
def test_epoch_shards_split_by_rank(shards):
    first_shards = [set(dali(spec(shards, rank=r, world=2)).epoch_shards(0)) for r in range(2)]
    assert not first_shards[0] & first_shards[1] and len(first_shards[0] | first_shards[1]) == 4


def _equal_batches(got, want):
    assert [b["keys"] for b in got] == [b["keys"] for b in want]
    for x, y in zip(got, want):
        assert torch.equal(x["captions"], y["captions"])
        assert all(torch.equal(a, b) for a, b in zip(x["crops"], y["crops"]))


@pytest.mark.parametrize("stop", [1, 2, 3])
def test_resume_with_skipped_samples_and_dropped_batches(tmp_path, stop):
    """Caption skips leave part of a pipeline batch waiting and a decode error drops one: a resume
    at any point neither repeats nor loses a sample, nor counts a skip twice."""
    urls = write_shards(tmp_path, 2, 10, bad={1: "string_caption_field", 7: "string_caption_field",
                                              12: "corrupt_image"})
    for u in urls:
        write_index(u, validate=False)
    make = lambda: dali(spec(urls, steps_per_epoch=4, shuffle_buffer=1, n_local=1,   # noqa: E731
                             string_fields="reject"), hue_mode="linear", validate=False)
    full_loader = make()
    full = list(full_loader)
    first = make()
    it = iter(first)
    head = [next(it) for _ in range(stop)]
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    tail = list(resumed)
    _equal_batches(head + tail, full)
    # the reader wraps around: s00001 is met (and counted) twice in the epoch
    assert resumed.skipped == full_loader.skipped == {"string_caption_field": 3, "decode_error_batch": 4}


def test_resume_without_checkpoint_replays(shards):
    make = lambda: dali(spec(shards, steps_per_epoch=4, n_local=1), hue_mode="linear")   # noqa: E731
    full = list(make())
    resumed = make()
    resumed.load_state_dict({"epoch": 0, "consumed": 2, "worker_skips": {}, "skips_before": {}})  # torchvision
    tail = list(resumed)
    assert [b["keys"] for b in tail] == [b["keys"] for b in full[2:]]
    _equal_batches(tail, full[2:])                                 # same graph: augmentations exact too


def test_build_loader_switch(shards):
    sp = spec(shards)
    assert isinstance(build_loader(sp, "torchvision"), WebDatasetLoader)
    assert isinstance(build_loader(sp, "dali", device="cpu"), DaliLoader)
    assert isinstance(build_loader(sp, "auto"), WebDatasetLoader if not torch.cuda.is_available() else DaliLoader)
    with pytest.raises(ValueError, match="data.backend"):
        build_loader(sp, "ffcv")
    with pytest.raises(TypeError, match="only apply"):
        build_loader(sp, "torchvision", device="cpu")
    with pytest.raises(ValueError, match="hue_mode"):
        DaliLoader(sp, hue_mode="approx")
