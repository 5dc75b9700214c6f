"""Evaluation: zero-shot retrieval (COCO, Flickr30k, held-out shards) and classification (ImageNet,
SUN397), standalone (``cosmos-fast eval``, :mod:`cosmos_fast.eval.cli`) and inside training
(:func:`evaluate_models`, on every rank: the held-out ``data.val_shards`` and the zero-shot sets);
zero-shot segmentation (:mod:`.segmentation`, dense features with CSA in :mod:`.dense`)."""
from .datasets import (AnnotationError, ClassificationSet, RetrievalSet, load_imagenet, load_retrieval_set,
                       load_retrieval_shards, load_shard_retrieval_set, load_sun397)
from .dense import dense_features
from .evaluate import (evaluate_model, evaluate_models, format_results, load_eval_sets, log_to_tensorboard,
                       scalar_metrics)
from .retrieval import retrieval_metrics
from .seg_types import IGNORE_INDEX, SegmentationSet, SegSettings
from .segmentation import (OPENAI_TEMPLATES, ConfusionMatrix, Segmentor, evaluate_segmentation, query_embeddings,
                           read_class_queries)
from .zeroshot import build_zero_shot_classifier, classification_metrics

__all__ = [
    "retrieval_metrics", "load_retrieval_shards", "load_shard_retrieval_set",
    "AnnotationError", "RetrievalSet", "ClassificationSet", "load_retrieval_set", "load_imagenet", "load_sun397",
    "evaluate_model", "evaluate_models", "load_eval_sets", "scalar_metrics", "log_to_tensorboard",
    "format_results", "build_zero_shot_classifier", "classification_metrics", "dense_features",
    "IGNORE_INDEX", "SegSettings", "SegmentationSet", "OPENAI_TEMPLATES", "read_class_queries", "query_embeddings",
    "Segmentor", "ConfusionMatrix", "evaluate_segmentation",
]
