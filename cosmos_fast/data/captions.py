"""Caption sampling (cosmos_method.md §4.2) and tokenisation (§4.3), shared by every data backend.

``textcrop`` pools the DreamLIP fields in the order raw, shortIB, shortSV, shortLLA, longIB, longSV,
longLLA; ``textcrop_pixelprose`` pools ``original_caption`` plus the split ``caption``. From the pool,
two global captions of n ~ U{1..5} sentences joined with ". " (no final period) and K − 2 local
single sentences are drawn with :func:`draw`. Every field must be a list of sentences; a string
found where a list is expected is split by FLAIR's rule (newline, ``</s>`` or ``.``; blank pieces
dropped) when ``string_fields="split"``, or rejected with ``"reject"`` — never sampled character by
character (§7 item 13).
"""
from __future__ import annotations

import random
import re
from collections.abc import Sequence

DREAMLIP_FIELDS = ("raw_caption", "shortIB_captions", "shortSV_captions", "shortLLA_captions",
                   "longIB_captions", "longSV_captions", "longLLA_captions")
PIXELPROSE_FIELDS = ("original_caption", "caption")
MODES = ("textcrop", "textcrop_pixelprose")
STRING_FIELD_POLICIES = ("split", "reject")

_SPLIT = re.compile(r"\n|</s>|\.")


class SampleError(ValueError):
    """A sample that cannot be used; ``reason`` is the name it is counted and logged under."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


class CaptionRecordError(SampleError):
    """A caption record that cannot be sampled (missing field, wrong type, empty pool)."""


def split_sentences(text: str) -> list[str]:
    """FLAIR's presplit rule: split on newline, ``</s>`` or ``.``; drop blank pieces; strip."""
    return [s.strip() for s in _SPLIT.split(text) if s.strip()]


def draw(pool: Sequence[str], n: int, rng: random.Random) -> list[str]:
    """``random_sample_from_list``: n distinct entries when the pool is large enough, otherwise
    ⌊n/|pool|⌋ whole copies of the pool in pool order followed by a sample of n mod |pool|."""
    if len(pool) >= n:
        return rng.sample(list(pool), n)
    return list(pool) * (n // len(pool)) + rng.sample(list(pool), n % len(pool))


def _sentences(record: dict, field: str, policy: str, split_string: bool = False) -> list[str]:
    if field not in record:
        raise CaptionRecordError("missing_caption_field", f"caption record has no field {field!r}")
    value = record[field]
    if isinstance(value, str):
        if split_string:
            return split_sentences(value)
        if policy == "reject":
            raise CaptionRecordError("string_caption_field",
                                     f"caption field {field!r} is a string, expected a list of sentences")
        return split_sentences(value)
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise CaptionRecordError("bad_caption_field",
                                 f"caption field {field!r} must be a list of strings, got {type(value).__name__}")
    return [s for s in value if s.strip()]


def caption_pool(record: dict, mode: str = "textcrop", string_fields: str = "split") -> list[str]:
    if not isinstance(record, dict):
        raise CaptionRecordError("bad_caption_record", f"caption record is a {type(record).__name__}, not a dict")
    if mode == "textcrop":
        pool = [s for f in DREAMLIP_FIELDS for s in _sentences(record, f, string_fields)]
    elif mode == "textcrop_pixelprose":
        orig = record.get("original_caption")
        if not isinstance(orig, str):
            raise CaptionRecordError("bad_caption_field", "pixelprose field 'original_caption' must be a string")
        pool = ([orig] if orig.strip() else []) + _sentences(record, "caption", string_fields, split_string=True)
    else:
        raise ValueError(f"unknown caption sampling mode {mode!r}; choose one of {MODES}")
    if not pool:
        raise CaptionRecordError("empty_caption_pool", "caption record has no sentences")
    return pool


def sample_captions(record: dict, rng: random.Random, num_captions: int = 8, mode: str = "textcrop",
                    string_fields: str = "split", max_global_sentences: int = 5) -> list[str]:
    """[global_0, global_1, local_0 .. local_{K-3}] for one record."""
    pool = caption_pool(record, mode, string_fields)
    captions = []
    for _ in range(2):
        n = rng.randint(1, max_global_sentences)
        captions.append(". ".join(draw(pool, n, rng)))
    captions += draw(pool, num_captions - 2, rng)
    return captions


class Tokenizer:
    """open_clip_torch's tokenizer for a model config (OpenAI BPE, SOT/EOT, 77 tokens, EOT forced
    at the last position when truncated)."""

    def __init__(self, model_name: str = "ViT-B-16", context_length: int = 77):
        import open_clip

        self._tok = open_clip.get_tokenizer(model_name, context_length=context_length)
        self.context_length = context_length

    def __call__(self, texts: Sequence[str]):
        return self._tok(list(texts))
