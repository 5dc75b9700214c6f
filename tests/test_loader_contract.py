"""The loader contract (cosmos_fast.data.stream.Loader), asserted once over both backends: batch layout
(caption-major captions), one epoch = steps_per_epoch batches, determinism, epoch dependence, the rank
split, cumulative skip counts, and exact mid-epoch resume from state_dict. The DALI backend runs on
DALI's CPU backend and is skipped where DALI is not installed."""
import pytest
import torch

from cosmos_fast.data.backends import build_loader
from cosmos_fast.data.captions import Tokenizer
from cosmos_fast.data.dali_loader import dali_available
from cosmos_fast.data.stream import Loader
from tests.test_loader import spec, write_shards

BACKENDS = ["torchvision", pytest.param("dali", marks=pytest.mark.skipif(
    not dali_available(), reason="NVIDIA DALI is not installed"))]
CONTRACT = sorted({n for n in dir(Loader) if not n.startswith("_")} | set(Loader.__annotations__)) + ["__iter__"]


def make(backend: str, sp):
    return build_loader(sp, backend, **({"device": "cpu", "num_threads": 2} if backend == "dali" else {}))


def equal_batches(got, want):
    assert [b["keys"] for b in got] == [b["keys"] for b in want]
    for x, y in zip(got, want):
        assert torch.equal(x["captions"], y["captions"])
        assert all(torch.equal(a, b) for a, b in zip(x["crops"], y["crops"]))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("contract_shards"), 4, 10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_layout_caption_major(shards, backend):
    loader = make(backend, spec(shards, steps_per_epoch=2))
    assert all(hasattr(loader, name) for name in CONTRACT), [n for n in CONTRACT if not hasattr(loader, n)]
    assert loader.steps_per_epoch == 2
    batches = list(loader)
    assert len(batches) == 2 == loader.consumed
    batch = batches[0]
    assert set(batch) == {"crops", "captions", "keys", "skipped"} and batch["skipped"] == {}
    assert [tuple(c.shape) for c in batch["crops"]] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 6
    assert all(c.dtype == torch.float32 and c.device.type == "cpu" and c.is_contiguous() for c in batch["crops"])
    assert batch["captions"].shape == (32, 77) and batch["captions"].dtype == torch.int64
    tok = Tokenizer()._tok
    items = [int(k[1:]) for k in batch["keys"]]
    assert len(items) == 4
    for k in range(8):
        for b in range(4):
            text = tok.decode(batch["captions"][k * 4 + b].tolist()).replace(" ", "")
            assert f"item{items[b]}sentence" in text, (k, b, text)   # row k·B + b is caption k of sample b
            if k >= 2:
                assert text.count("item") == 1                 # local captions are single sentences


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_epoch_dependent_and_split_by_rank(shards, backend):
    sp = spec(shards, steps_per_epoch=3, n_local=2)
    a = list(make(backend, sp))
    again = make(backend, sp)
    equal_batches(list(again), a)
    again.set_epoch(1)
    assert again.epoch == 1 and again.consumed == 0
    assert [x["keys"] for x in again] != [x["keys"] for x in a]
    keys = {}
    for rank in range(2):
        loader = make(backend, spec(shards, rank=rank, world=2, steps_per_epoch=2, n_local=2))
        keys[rank] = {k for x in loader for k in x["keys"]}
    assert keys[0] and keys[1] and not keys[0] & keys[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_skips_are_counted_per_epoch_and_over_the_run(tmp_path, backend):
    urls = write_shards(tmp_path, 1, 9, bad={3: "corrupt_image"})
    loader = make(backend, spec(urls, steps_per_epoch=2, shuffle_buffer=1, shuffle_initial=1, n_local=1))
    batches = list(loader)
    assert loader.epoch_skips() == loader.skipped == batches[-1]["skipped"] == {"corrupt_image": 1}
    assert "s00003" not in {k for b in batches for k in b["keys"]}
    loader.set_epoch(1)
    list(loader)
    assert loader.epoch_skips() == {"corrupt_image": 1} and loader.skipped == {"corrupt_image": 2}


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_mid_epoch_is_exact(shards, backend, stop=3):
    sp = spec(shards, steps_per_epoch=5, shuffle_buffer=8)
    full = list(make(backend, sp))
    first = make(backend, sp)
    it = iter(first)
    head = [next(it) for _ in range(stop)]
    state = first.state_dict()
    assert state["epoch"] == 0 and state["consumed"] == stop
    if backend == "dali":                          # resumes from a DALI checkpoint, not a replay
        assert state["position"]["checkpoint"] is not None
    resumed = make(backend, sp)
    resumed.load_state_dict(state)
    equal_batches(head + list(resumed), full)
    assert resumed.consumed == 5
