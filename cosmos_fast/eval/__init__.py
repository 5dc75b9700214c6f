"""Evaluation: zero-shot retrieval metrics (and, later, classification)."""
from .retrieval import encode_retrieval_set, load_retrieval_shards, recall_at_k, retrieval_eval

__all__ = ["encode_retrieval_set", "load_retrieval_shards", "recall_at_k", "retrieval_eval"]
