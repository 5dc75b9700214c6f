import random
from collections import Counter

import pytest

from cosmos_fast.data.captions import (CaptionRecordError, DREAMLIP_FIELDS, Tokenizer, caption_pool, draw,
                                       sample_captions, split_sentences)


def dreamlip(**over):
    rec = {f: [f"{f} sentence {i}" for i in range(2)] for f in DREAMLIP_FIELDS}
    rec["raw_caption"] = ["the raw alt text"]
    rec.update(over)
    return rec


def test_split_rule():
    assert split_sentences("A cat. A dog\nsits</s> on   a mat.. ") == ["A cat", "A dog", "sits", "on   a mat"]
    assert split_sentences(" . \n ") == []


def test_pool_order():
    pool = caption_pool(dreamlip())
    assert pool[0] == "the raw alt text"
    assert pool[1:3] == ["shortIB_captions sentence 0", "shortIB_captions sentence 1"]
    assert pool[-1] == "longLLA_captions sentence 1"
    assert len(pool) == 13


def test_draw_rule():
    rng = random.Random(0)
    big = draw(list("abcdefg"), 5, rng)
    assert len(set(big)) == 5
    small = draw(["a", "b", "c"], 7, rng)                     # 2 whole copies in pool order + 1 sampled
    assert small[:6] == ["a", "b", "c", "a", "b", "c"] and small[6] in "abc"


def test_sample_captions_statistics():
    rng = random.Random(0)
    rec = dreamlip()
    pool = set(caption_pool(rec))
    counts = Counter()
    n = 5000
    for _ in range(n):
        caps = sample_captions(rec, rng)
        assert len(caps) == 8
        for g in caps[:2]:
            parts = g.split(". ")
            assert all(p in pool for p in parts) and len(set(parts)) == len(parts)
            assert not g.endswith(".")
            counts[len(parts)] += 1
        assert all(c in pool for c in caps[2:])
        assert len(set(caps[2:])) == 6                        # 13 sentences ≥ 6: drawn without replacement
    assert set(counts) == {1, 2, 3, 4, 5}
    for k in range(1, 6):
        assert abs(counts[k] / (2 * n) - 0.2) < 0.02


def test_small_pool_duplicates_follow_draw():
    rec = {f: [] for f in DREAMLIP_FIELDS}
    rec["raw_caption"] = ["only one", "and two"]
    caps = sample_captions(rec, random.Random(1))
    assert sorted(caps[2:]) == ["and two"] * 3 + ["only one"] * 3


def test_string_fields_split_or_rejected_never_characters():
    rec = dreamlip(shortIB_captions="A red cube. A blue ball")
    pool = caption_pool(rec, string_fields="split")
    assert "A red cube" in pool and "A blue ball" in pool
    assert not any(len(s) == 1 for s in pool)
    with pytest.raises(CaptionRecordError, match="'shortIB_captions' is a string") as e:
        caption_pool(rec, string_fields="reject")
    assert e.value.reason == "string_caption_field"


@pytest.mark.parametrize("rec,reason", [
    ({f: [] for f in DREAMLIP_FIELDS}, "empty_caption_pool"),
    ({"raw_caption": ["x"]}, "missing_caption_field"),
    (dreamlip(longSV_captions=[1, 2]), "bad_caption_field"),
    (["not", "a", "dict"], "bad_caption_record"),
])
def test_malformed_records(rec, reason):
    with pytest.raises(CaptionRecordError) as e:
        caption_pool(rec)
    assert e.value.reason == reason


def test_pixelprose_mode():
    rec = {"original_caption": "alt text", "caption": "First part. Second part\nThird"}
    assert caption_pool(rec, "textcrop_pixelprose") == ["alt text", "First part", "Second part", "Third"]
    caps = sample_captions(rec, random.Random(0), mode="textcrop_pixelprose")
    assert len(caps) == 8
    with pytest.raises(ValueError, match="unknown caption sampling mode"):
        caption_pool(rec, "raw")


def test_tokeniser_truncates_with_eot():
    tok = Tokenizer("ViT-B-16")
    t = tok(["word " * 200, "a short one"])
    assert t.shape == (2, 77)
    assert t[0, -1] == 49407 and t[0, 0] == 49406
    assert (t[1] == 49407).nonzero()[0, 0] < 10 and t[1, -1] == 0
