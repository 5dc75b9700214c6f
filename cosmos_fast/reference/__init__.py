"""Plain-PyTorch references with the official COSMOS semantics, one file per op."""
from .contrastive import cosmos_loss_reference, pair_loss_reference
from .cross_pool import cross_pool_reference, pool_repeat

__all__ = ["cosmos_loss_reference", "pair_loss_reference", "cross_pool_reference", "pool_repeat"]
