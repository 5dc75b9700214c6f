"""Plain-PyTorch references with the official COSMOS semantics, one file per op."""
from .contrastive import cosmos_loss_reference, pair_loss_reference
from .cross_pool import OfficialPooler, cross_pool_reference, official_features, pool_repeat

__all__ = ["cosmos_loss_reference", "pair_loss_reference", "OfficialPooler", "cross_pool_reference",
           "official_features", "pool_repeat"]
