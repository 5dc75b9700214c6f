"""cosmos_fast: a fast, faithful trainer for COSMOS (CVPR 2025) cross-modality self-distillation.

The public names are imported on first use (PEP 562), so ``import cosmos_fast.cli`` (``--help``, the
config tools) does not pay for importing torch.
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "MomentumSchedule": ".schedules", "build_teacher": ".ema", "clamp_logit_scales": ".ema", "ema_update": ".ema",
    "CosmosLoss": ".ops",
    "CheckpointMismatchError": ".model", "CosmosCLIP": ".model", "CrossAttentionPooler": ".model",
    "UntrustedCheckpointError": ".model", "create_model": ".model", "load_checkpoint": ".model",
    "save_checkpoint": ".model",
}

__all__ = [
    "CosmosLoss", "CosmosCLIP", "CrossAttentionPooler", "create_model", "load_checkpoint",
    "save_checkpoint", "CheckpointMismatchError", "UntrustedCheckpointError", "build_teacher", "ema_update",
    "clamp_logit_scales", "MomentumSchedule", "__version__",
]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value               # later look-ups skip this hook
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
