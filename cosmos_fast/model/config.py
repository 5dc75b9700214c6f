"""Model configurations: open_clip-style dicts, validated into a dataclass.

``resolve_model_config(cfg)`` accepts a name (``"tiny"`` or any open_clip model config name such as
``"ViT-B-16"`` / ``"ViT-B-32"``, read from open_clip_torch) or a dict
``{embed_dim, vision_cfg: {image_size, patch_size, width, layers[, head_width, mlp_ratio]},
text_cfg: {context_length, vocab_size, width, heads, layers[, mlp_ratio]}}``. Any other key is
rejected by name, because silently ignoring it would build a different model than asked for.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

_TOP_KEYS = {"embed_dim", "vision_cfg", "text_cfg"}
_VISION_REQUIRED = {"image_size", "patch_size", "width", "layers"}
_VISION_OPTIONAL = {"head_width", "mlp_ratio"}
_TEXT_REQUIRED = {"context_length", "vocab_size", "width", "heads", "layers"}
_TEXT_OPTIONAL = {"mlp_ratio"}

#: CPU-sized COSMOS model with the real tokenizer's vocabulary and context length.
TINY = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 128, "layers": 2, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}


@dataclass(frozen=True)
class VisionConfig:
    image_size: int
    patch_size: int
    width: int
    layers: int
    head_width: int = 64
    mlp_ratio: float = 4.0

    @property
    def heads(self) -> int:
        return self.width // self.head_width


@dataclass(frozen=True)
class TextConfig:
    context_length: int
    vocab_size: int
    width: int
    heads: int
    layers: int
    mlp_ratio: float = 4.0


@dataclass(frozen=True)
class ModelConfig:
    embed_dim: int
    vision_cfg: VisionConfig
    text_cfg: TextConfig
    name: str = "custom"

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("name")
        return d


def _named_config(name: str) -> dict:
    if name == "tiny":
        return copy.deepcopy(TINY)
    import open_clip

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        known = ["tiny"] + [m for m in open_clip.list_models() if m.startswith("ViT-")]
        raise ValueError(f"unknown model name {name!r}; known: {', '.join(known[:12])}, ...")
    return copy.deepcopy(cfg)


def _check_keys(section: str, d: dict, required: set, optional: set) -> None:
    if not isinstance(d, dict):
        raise TypeError(f"model config {section} must be a dict, got {type(d).__name__}")
    unknown = sorted(set(d) - required - optional)
    if unknown:
        raise ValueError(f"unsupported key(s) in model config {section}: {unknown}; "
                         f"allowed: {sorted(required | optional)}")
    missing = sorted(required - set(d))
    if missing:
        raise ValueError(f"missing key(s) in model config {section}: {missing}")
    for k, v in d.items():
        if k == "mlp_ratio":
            ok = isinstance(v, (int, float)) and v > 0
        else:
            ok = isinstance(v, int) and not isinstance(v, bool) and v > 0
        if not ok:
            raise ValueError(f"model config {section}.{k} must be a positive number, got {v!r}")


def resolve_model_config(cfg) -> ModelConfig:
    if isinstance(cfg, ModelConfig):
        return cfg
    name = "custom"
    if isinstance(cfg, str):
        name, cfg = cfg, _named_config(cfg)
    if not isinstance(cfg, dict):
        raise TypeError(f"model config must be a name or a dict, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - _TOP_KEYS)
    if unknown:
        raise ValueError(f"unsupported key(s) in model config{' ' + repr(name) if name != 'custom' else ''}: "
                         f"{unknown}; allowed: {sorted(_TOP_KEYS)}")
    missing = sorted(_TOP_KEYS - set(cfg))
    if missing:
        raise ValueError(f"missing key(s) in model config: {missing}")
    _check_keys("embed_dim", {"embed_dim": cfg["embed_dim"]}, {"embed_dim"}, set())
    _check_keys("vision_cfg", cfg["vision_cfg"], _VISION_REQUIRED, _VISION_OPTIONAL)
    _check_keys("text_cfg", cfg["text_cfg"], _TEXT_REQUIRED, _TEXT_OPTIONAL)
    v, t = VisionConfig(**cfg["vision_cfg"]), TextConfig(**cfg["text_cfg"])
    if v.image_size % v.patch_size:
        raise ValueError(f"vision_cfg.image_size {v.image_size} is not a multiple of "
                         f"vision_cfg.patch_size {v.patch_size}")
    if v.width % v.head_width:
        raise ValueError(f"vision_cfg.width {v.width} is not divisible by head_width {v.head_width}")
    if t.width % t.heads:
        raise ValueError(f"text_cfg.width {t.width} is not divisible by text_cfg.heads {t.heads}")
    if t.width != cfg["embed_dim"]:
        # the text pooler is sized by the text width and queried with image embeddings of size D
        raise ValueError(f"COSMOS needs text_cfg.width == embed_dim (the text pooler takes "
                         f"D-wide image queries); got width {t.width}, embed_dim {cfg['embed_dim']}")
    if cfg["embed_dim"] % 8:
        raise ValueError(f"embed_dim {cfg['embed_dim']} must be divisible by the 8 pooler heads")
    return ModelConfig(embed_dim=cfg["embed_dim"], vision_cfg=v, text_cfg=t, name=name)
