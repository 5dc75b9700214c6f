"""cosmos_fast: a fast, faithful trainer for COSMOS (CVPR 2025) cross-modality self-distillation."""
from .ema import MomentumSchedule, build_teacher, clamp_logit_scales, ema_update
from .loss import CosmosLoss
from .model import (CheckpointMismatchError, CosmosCLIP, CrossAttentionPooler, UntrustedCheckpointError,
                    create_model, load_checkpoint, save_checkpoint)

__version__ = "0.1.0"

__all__ = [
    "CosmosLoss", "CosmosCLIP", "CrossAttentionPooler", "create_model", "load_checkpoint",
    "save_checkpoint", "CheckpointMismatchError", "UntrustedCheckpointError", "build_teacher", "ema_update",
    "clamp_logit_scales", "MomentumSchedule", "__version__",
]
