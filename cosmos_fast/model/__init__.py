from .attention import attention, attention_backend, set_attention_backend
from .checkpoint import CheckpointMismatchError, UntrustedCheckpointError, load_checkpoint, save_checkpoint
from .config import ModelConfig, resolve_model_config
from .cosmos import LOGIT_SCALE_MAX, CosmosCLIP, create_model
from .pooler import CrossAttentionPooler

__all__ = [
    "attention", "attention_backend", "set_attention_backend", "CheckpointMismatchError", "UntrustedCheckpointError",
    "load_checkpoint", "save_checkpoint", "ModelConfig", "resolve_model_config", "LOGIT_SCALE_MAX",
    "CosmosCLIP", "create_model", "CrossAttentionPooler",
]
