"""One dataclass tree for a training run, YAML presets, ``key=value`` overrides, start-up checks.

``load_config(preset_or_path, overrides)`` reads a preset shipped in ``cosmos_fast/configs/`` (by
name, e.g. ``tiny-cpu``) or a YAML file, applies ``section.key=value`` overrides (values parsed as
YAML) and rejects any unknown key by name. :func:`validate` checks what the values alone show; the
trainer's build runs it with the actual world size, then the checks that need the package and the
machine. A leaf: imports nothing from the package (and no torch, so ``--help`` stays fast).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

PRESET_DIR = Path(__file__).parent / "configs"

# The choices of the config's string fields. Those an implementing module also names (the data
# stack, the ops switch, the EMA) are written here too, so the config imports nothing from the
# package; tests/test_config_choices.py checks they equal the implementing modules' tuples.
ContrastiveImpl = typing.Literal["fused", "blockwise", "reference"]
LossOperands = typing.Literal["auto", "bf16", "fp32"]
CrossPoolImpl = typing.Literal["fused", "absorbed", "shared", "reference"]
AugmentImpl = typing.Literal["auto", "torchvision", "fused"]
CaptionMode = typing.Literal["textcrop", "textcrop_pixelprose"]
StringFieldPolicy = typing.Literal["split", "reject"]
WorkerStartMethod = typing.Literal["forkserver", "spawn", "fork"]
AttentionBackend = typing.Literal["auto", "sdpa", "math", "flash", "xformers"]
DataBackend = typing.Literal["torchvision", "dali", "auto"]
EmaSchedule = typing.Literal["fixed", "cosine"]
EmaOrder = typing.Literal["before_step", "after_step"]
Precision = typing.Literal["fp32", "amp_bf16", "amp_fp16"]
DistBackend = typing.Literal["auto", "none", "deepspeed"]
ZeroStage = typing.Literal[0, 1, 2, 3]
Optimizer = typing.Literal["torch_adamw", "deepspeed_fused_adam", "apex_fused_adam"]
CollectiveBackend = typing.Literal["auto", "nccl", "gloo"]
GradSemantics = typing.Literal["official", "exact"]
RetrievalSplit = typing.Literal["official", "karpathy"]
Toggle = typing.Literal["auto", "on", "off"]

CONTRASTIVE_IMPLS = typing.get_args(ContrastiveImpl)
LOSS_OPERANDS = typing.get_args(LossOperands)
CROSS_POOL_IMPLS = typing.get_args(CrossPoolImpl)
AUGMENT_IMPLS = typing.get_args(AugmentImpl)
MODES = typing.get_args(CaptionMode)
STRING_FIELD_POLICIES = typing.get_args(StringFieldPolicy)
WORKER_START_METHODS = typing.get_args(WorkerStartMethod)
ATTENTION_BACKENDS = typing.get_args(AttentionBackend)
DATA_BACKENDS = typing.get_args(DataBackend)
EMA_SCHEDULES = typing.get_args(EmaSchedule)
EMA_ORDERS = typing.get_args(EmaOrder)
PRECISIONS = typing.get_args(Precision)
DIST_BACKENDS = typing.get_args(DistBackend)
ZERO_STAGES = typing.get_args(ZeroStage)
OPTIMIZERS = typing.get_args(Optimizer)
COLLECTIVE_BACKENDS = typing.get_args(CollectiveBackend)
GRAD_SEMANTICS = typing.get_args(GradSemantics)
RETRIEVAL_SPLITS = typing.get_args(RetrievalSplit)
TOGGLES = typing.get_args(Toggle)
# YAML reads a bare on/off as a bool: taken as "on"/"off" for these auto/on/off fields
ON_OFF_FIELDS = ("optim.fused_update", "train.compile", "train.cuda_graph")



def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: default, metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelSection:
    name: str = _f("ViT-B-16", "model config: ViT-B-16, ViT-B-32, tiny, or an open_clip ViT config name")
    pool_impl: str = _f("auto", "cross-attention pooling: auto, fused (Triton), absorbed (no K/V), shared (K/V "
                        "once per sample) or reference (see cosmos_fast.ops)")
    loss_impl: str = _f("auto", "contrastive loss: auto, fused (Triton), blockwise or reference (see cosmos_fast.ops)")
    loss_operands: str = _f("auto", "dtype of the loss's similarity products: auto (bf16 with the fused loss in an AMP "
                            "run on CUDA, else the features' own), bf16, or fp32 (fp32 / TF32 dots as "
                            "torch.set_float32_matmul_precision says); accumulation is fp32 in every case")
    loss_workspace_mb: int = _f(256, "MB of the loss backward's logit-gradient workspace, independent of the batch "
                                "(>= 1; the blockwise CPU path uses at most its own cache-sized chunk)")
    attention: str = _f("sdpa", "attention backend of both towers: auto, sdpa, math, flash, xformers")
    grad_checkpointing: bool = _f(False, "recompute transformer blocks in backward to save memory")
    truncate_captions: bool = _f(True, "run the captions whose token features no pooler reads (student captions "
                                 "1+, the teacher's) only up to the batch's last end-of-text token, in lengths "
                                 "of 16, 32, ... (exact: the text tower is causal)")


@dataclass
class DataSection:
    backend: str = _f("torchvision", "image pipeline: torchvision (CPU workers), dali (NVIDIA DALI: GPU decode + "
                      "augmentation on CUDA, CPU backend otherwise) or auto (dali with CUDA, else torchvision)")
    train_shards: str = _f("", "webdataset shards: brace pattern(s), '::' joins sources; a 'pipe:CMD' URL runs CMD "
                           "in a shell, so a shard list from someone else can run commands (see data.allow_pipe)")
    val_shards: str = _f("", "held-out retrieval shards (json field retrieval_captions); empty = none")
    allow_pipe: bool = _f(True, "accept shard URLs that run a shell command: 'pipe:CMD' (webdataset's design) and "
                          "s3:// (read through 'aws s3 cp'); false refuses them at start")
    train_num_samples: int = _f(0, "samples per epoch (official --train-num-samples)")
    batch_size: int = _f(64, "per-device batch B; the global batch is B × world size")
    expected_global_batch: typing.Optional[int] = _f(None, "if set, B × world size must equal it (checked at start)")
    num_workers: int = _f(4, "data-loader worker processes per rank")
    augment: str = _f("auto", "how the torchvision backend makes crops: torchvision (torchvision's PIL ops), fused (the "
                      "same crops bit for bit from a Numba kernel, faster; needs numba) or auto (fused when "
                      "numba is installed)")
    worker_start: str = _f("forkserver", "how workers start: forkserver (clean process, default), spawn or fork "
                           "(copies the trainer's thread pools; can crash workers)")
    caption_mode: str = _f("textcrop", "textcrop (DreamLIP fields) or textcrop_pixelprose")
    num_captions: int = _f(8, "captions per sample: 2 global + the rest local")
    local_crops: int = _f(6, "local image crops per sample (after the 2 global crops)")
    crop_scale: float = _f(0.4, "global crop area scale [s, 1]; local crops [0.05, s]")
    global_size: typing.Optional[int] = _f(None, "global crop size in px; null = the model's image size")
    local_size: int = _f(96, "local crop size in px")
    resampled: bool = _f(False, "draw shards with replacement instead of epoch passes")
    shuffle_buffer: int = _f(5000, "sample shuffle buffer per worker")
    shuffle_initial: int = _f(1000, "samples buffered before the first one is yielded")
    string_fields: str = _f("split", "a string where a list of sentences is expected: split or reject")
    eval_batch_size: int = _f(256, "batch size for retrieval evaluation")


@dataclass
class OptimSection:
    lr: float = _f(5e-4, "peak learning rate")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.98, "AdamW beta2")
    eps: float = _f(1e-8, "AdamW epsilon")
    weight_decay: float = _f(0.5, "weight decay of >=2-D weights (official groups)")
    warmup: int = _f(2000, "linear warm-up steps, then cosine to 0")
    epochs: int = _f(32, "epochs; the cosine spans epochs × steps per epoch")
    grad_clip_norm: typing.Optional[float] = _f(None, "clip the global gradient norm (official: off)")
    fused_update: str = _f("auto", "teacher EMA + AdamW in one pass over flat fp32 buffers: auto (on for the "
                           "single-process engine with torch_adamw; off under DeepSpeed, which owns the optimizer), "
                           "on or off (torch AdamW + the foreach EMA)")


@dataclass
class EMASection:
    momentum: float = _f(0.999, "teacher EMA momentum m (0.999 at B_g=1024, 0.99 at 4096)")
    schedule: str = _f("fixed", "fixed (official scripts) or cosine (m -> 1 over training)")
    order: str = _f("before_step", "before_step (official: EMA before the optimizer step) or after_step")


@dataclass
class TrainSection:
    name: str = _f("cosmos", "run name, written into checkpoints")
    seed: int = _f(0, "global seed (model init, data order, augmentations)")
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")
    precision: str = _f("fp32", "fp32, amp_bf16 or amp_fp16 (AMP needs CUDA; fp16 uses a GradScaler)")
    max_steps: typing.Optional[int] = _f(None, "stop after this many optimizer steps (schedule unchanged)")
    save_every_steps: int = _f(1000, "also write epoch_latest.pt every N steps (0 = only at epoch ends)")
    eval_every_steps: int = _f(0, "retrieval eval on data.val_shards every N steps (0 = only at the end)")
    max_nonfinite: int = _f(5, "stop after this many non-finite losses in a row")
    memory_check: bool = _f(True, "refuse at start a batch whose estimated activations exceed the device's free memory")
    auto_resume: bool = _f(True, "without --resume, continue from the newest complete checkpoint in OUTPUT")
    progress: bool = _f(True, "show a progress bar")
    log_every_steps: int = _f(50, "write a progress line (loss, lr, samples/s, ETA) to train.log every N steps (0 = off)")
    tensorboard: bool = _f(True, "write TensorBoard scalars to OUTPUT/tb")
    compile: Toggle = _f("auto", "torch.compile each transformer block (one graph per token shape, reused by every "
                              "layer): auto (on for CUDA, off on CPU and ZeRO-3, the reason logged), on or off")
    cuda_graph: Toggle = _f("auto", "replay the whole step as one CUDA graph, the non-finite skip decided on the device: "
                                 "auto (on for one CUDA process with fp32/bf16, else off, the reason logged), on or off")


@dataclass
class DistributedSection:
    backend: str = _f("auto", "auto (DeepSpeed when launched on several ranks), none, or deepspeed")
    zero_stage: int = _f(1, "DeepSpeed ZeRO stage 0-3 (3 also partitions the fp32 EMA teacher)")
    optimizer: str = _f("torch_adamw", "torch_adamw (fused on CUDA), deepspeed_fused_adam, apex_fused_adam")
    dist_backend: str = _f("auto", "auto (nccl on CUDA, gloo on CPU), nccl or gloo")
    timeout_minutes: int = _f(30, "collective timeout: a hung rank fails with an error after this")
    grad_semantics: str = _f("official", "official ((1/W)·grad of the weights, as DDP) or exact (full grad)")
    stage3_persistence_threshold: int = _f(100000, "ZeRO-3: parameters smaller than this stay gathered")
    shm_comm: bool = _f(False, "use DeepSpeed's shared-memory comm op (JIT-compiles ~60 s on CPU)")
    keep_last: int = _f(3, "DeepSpeed checkpoints kept in OUTPUT/checkpoints (older ones deleted)")


@dataclass
class EvalSection:
    retrieval_root: str = _f("", "zero-shot retrieval root holding coco/ and flickr30k-images/ (empty = off)")
    retrieval_sets: str = _f("coco,flickr30k", "retrieval data sets under retrieval_root")
    retrieval_split: str = _f("official", "official (COCO val2017, Flickr30k val) or karpathy (test splits)")
    imagenet_val: str = _f("", "ImageNet-style val folder for zero-shot classification (empty = off)")
    imagenet_classnames: str = _f("", "optional class-name file (default: open_clip's ImageNet names)")
    sun397_root: str = _f("", "SUN397 folder (seeded split, documented) (empty = off)")
    every_steps: int = _f(0, "zero-shot evaluation every N steps on every rank (0 = only at the end)")
    batch_size: int = _f(256, "evaluation batch size per rank")
    num_workers: int = _f(4, "image-loading workers for evaluation")


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    ema: EMASection = field(default_factory=EMASection)
    train: TrainSection = field(default_factory=TrainSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


# The --trust-checkpoint help of train, eval and export (this module imports no torch: cheap for --help).
TRUST_CHECKPOINT_HELP = ("unpickle checkpoint files in full: such a file can run arbitrary code, so only for files you "
                         "trust (default: only tensors, plain containers and a few known types are read)")


class ConfigError(ValueError):
    pass


def _section_cls(name):
    return {"model": ModelSection, "data": DataSection, "optim": OptimSection, "ema": EMASection,
            "train": TrainSection, "distributed": DistributedSection, "eval": EvalSection}[name]


def _initials(name: str) -> str:
    return "".join(t[0] for t in name.lower().split("_") if t)


def _suggest(word, options, list_all: bool = False) -> str:
    """`` (did you mean 'x'?)`` for the closest option: by spelling (difflib), then as an abbreviation
    (``learning_rate`` ↔ ``lr``: one name's initials spell the other), then by the one option sharing
    the most ``_``-separated words. ``list_all``: without a match, list every option instead."""
    word, options = str(word), [str(o) for o in options]
    close = difflib.get_close_matches(word, options, n=1)
    if not close:
        w = word.lower()
        close = [o for o in options if len(w) > 1 and len(o) > 1
                 and ("_" in w and _initials(w) == o.lower() or "_" in o and _initials(o) == w)]
    if not close:
        words = {t for t in word.lower().split("_") if len(t) > 1}
        shared = {o: len(words & set(o.lower().split("_"))) for o in options}
        best = max(shared.values(), default=0)
        tied = [o for o, n in shared.items() if n == best]
        close = tied if best and len(tied) == 1 else []
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f"; known: {', '.join(options)}" if list_all else ""


def _number(value, hint):
    """A number written as a user writes it: YAML 1.1 reads ``5e-4`` and ``1e23`` (no dot) as strings,
    so those strings are parsed here; ints accept an integral float (``1e3``)."""
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if hint is int and isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else None
    return value


def _coerce(path: str, value, hint):
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(path, value, args[0])
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint in (int, float):
        number = _number(value, hint)
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"config field {path} = {value!r} must be a finite number")
            return hint(number)
    elif origin is typing.Literal:                 # an auto/on/off toggle: YAML 1.1 reads on/off as booleans
        if isinstance(value, bool) and set(typing.get_args(hint)) >= {"on", "off"}:
            return "on" if value else "off"
        if isinstance(value, str):
            return value                           # the choice itself is checked by validate()
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool) and path in ON_OFF_FIELDS:
            return "on" if value else "off"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"config field {path} expects {getattr(hint, '__name__', hint)}, got {value!r}")


def _set(cfg: Config, dotted: str, value) -> None:
    parts = dotted.split(".")
    if len(parts) != 2:
        raise ConfigError(f"config key {dotted!r} must look like section.key (sections: {list(SECTIONS)})")
    sec, key = parts
    if sec not in SECTIONS:
        raise ConfigError(f"unknown config section {sec!r} in {dotted!r}{_suggest(sec, SECTIONS)}")
    cls = _section_cls(sec)
    hints = typing.get_type_hints(cls)
    if key not in hints:
        raise ConfigError(f"unknown config field {dotted!r}{_suggest(key, hints, list_all=True)}")
    setattr(getattr(cfg, sec), key, _coerce(dotted, value, hints[key]))


def apply_dict(cfg: Config, d: dict, source: str = "config") -> Config:
    if not isinstance(d, dict):
        raise ConfigError(f"{source} must be a mapping of sections, got {type(d).__name__}")
    for sec, values in d.items():
        if sec not in SECTIONS:
            raise ConfigError(f"unknown config section {sec!r} in {source}{_suggest(str(sec), SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"section {sec!r} in {source} must be a mapping")
        for key, value in values.items():
            _set(cfg, f"{sec}.{key}", value)
    return cfg


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_config(preset_or_path: str | None = None, overrides=()) -> Config:
    cfg = Config()
    if preset_or_path:
        path = Path(preset_or_path)
        if not path.suffix:
            path = PRESET_DIR / f"{preset_or_path}.yaml"
            if not path.is_file():
                raise ConfigError(f"unknown preset {preset_or_path!r}; presets: {', '.join(list_presets())}")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path} cannot be read: {e}") from None
        apply_dict(cfg, _yaml(text, f"config file {path}") or {}, str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        _set(cfg, key.strip(), _yaml(raw, f"override {item!r}") if raw.strip() else "")
    return cfg


def _yaml(text: str, where: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {' '.join(str(e).split())}") from None


def save_config(cfg: Config, path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def describe() -> list[tuple[str, str, str]]:
    """(key, default, help) for every config field — the --help table."""
    rows = []
    for sec in SECTIONS:
        for f in dataclasses.fields(_section_cls(sec)):
            rows.append((f"{sec}.{f.name}", repr(getattr(_section_cls(sec)(), f.name)), f.metadata.get("help", "")))
    return rows


RENAMED_AUGMENT = {"pil": "torchvision"}            # old data.augment value → its new name
LOCAL_CROP_MIN_SCALE = 0.05      # local crops' area scale is [0.05, data.crop_scale] (§4.4)


def check_crop_scale(value: float, field: str = "data.crop_scale") -> None:
    """The one range check of the crop scale: global crops take [s, 1], local crops [0.05, s]."""
    if not LOCAL_CROP_MIN_SCALE < value < 1.0:
        raise ConfigError(f"config field {field} = {value} must lie in ({LOCAL_CROP_MIN_SCALE}, 1)")


def _choice(path, value, choices):
    if value not in choices:
        raise ConfigError(f"config field {path} = {value!r} must be one of {list(choices)}")


def validate(cfg: Config, world_size: int = 1) -> list[str]:
    """Reject contradictory or impossible values that the config alone shows; returns informational
    notes. The checks that need the package or the machine (the model name resolves, files exist,
    numba / apex / CUDA are there, every worker gets a shard) run in the trainer's build
    (:func:`cosmos_fast.trainer.check_config`, which calls this first)."""
    d, o, e, t = cfg.data, cfg.optim, cfg.ema, cfg.train
    notes = []
    for sec in SECTIONS:                      # also for a Config built in code, not parsed by _coerce
        for f in dataclasses.fields(_section_cls(sec)):
            value = getattr(getattr(cfg, sec), f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"config field {sec}.{f.name} = {value} must be a finite number")
    if not 0 <= t.seed < 2 ** 63:
        raise ConfigError(f"config field train.seed = {t.seed} must lie in [0, 2**63)")
    _choice("model.attention", cfg.model.attention, ATTENTION_BACKENDS)
    _choice("data.backend", d.backend, DATA_BACKENDS)
    _choice("data.caption_mode", d.caption_mode, MODES)
    _choice("data.string_fields", d.string_fields, STRING_FIELD_POLICIES)
    _choice("data.worker_start", d.worker_start, WORKER_START_METHODS)
    if d.augment in RENAMED_AUGMENT:
        raise ConfigError(f"config field data.augment = {d.augment!r} was renamed to {RENAMED_AUGMENT[d.augment]!r}")
    _choice("data.augment", d.augment, AUGMENT_IMPLS)
    _choice("model.pool_impl", cfg.model.pool_impl, ("auto",) + CROSS_POOL_IMPLS)
    _choice("model.loss_impl", cfg.model.loss_impl, ("auto",) + CONTRASTIVE_IMPLS)
    _choice("model.loss_operands", cfg.model.loss_operands, LOSS_OPERANDS)
    _choice("ema.schedule", e.schedule, EMA_SCHEDULES)
    _choice("ema.order", e.order, EMA_ORDERS)
    _choice("train.precision", t.precision, PRECISIONS)
    _choice("train.compile", t.compile, TOGGLES)
    _choice("train.cuda_graph", t.cuda_graph, TOGGLES)
    z = cfg.distributed
    _choice("distributed.backend", z.backend, DIST_BACKENDS)
    _choice("distributed.zero_stage", z.zero_stage, ZERO_STAGES)
    _choice("distributed.optimizer", z.optimizer, OPTIMIZERS)
    _choice("optim.fused_update", cfg.optim.fused_update, TOGGLES)
    _choice("distributed.dist_backend", z.dist_backend, COLLECTIVE_BACKENDS)
    _choice("distributed.grad_semantics", z.grad_semantics, GRAD_SEMANTICS)
    _choice("eval.retrieval_split", cfg.eval.retrieval_split, RETRIEVAL_SPLITS)
    if cfg.eval.every_steps < 0 or cfg.eval.batch_size < 1 or cfg.eval.num_workers < 0:
        raise ConfigError("eval.every_steps, eval.batch_size and eval.num_workers must be >= 0, >= 1 and >= 0")
    if z.timeout_minutes < 1 or z.keep_last < 1:
        raise ConfigError(f"distributed.timeout_minutes ({z.timeout_minutes}) and distributed.keep_last "
                          f"({z.keep_last}) must be >= 1")
    if o.fused_update == "on" and z.optimizer != "torch_adamw":
        raise ConfigError(f"config field optim.fused_update = 'on' replaces torch AdamW, but distributed.optimizer = "
                          f"{z.optimizer!r}: set optim.fused_update=auto or off")
    if o.fused_update == "on" and (z.backend == "deepspeed" or z.backend == "auto" and world_size > 1):
        raise ConfigError("config field optim.fused_update = 'on' but this run uses DeepSpeed, whose engine owns the "
                          "optimizer: set optim.fused_update=auto or off")
    if world_size > 1 and z.backend == "none":
        raise ConfigError(f"distributed.backend = 'none' but the launcher started {world_size} ranks")
    for path, value, lo in [("model.loss_workspace_mb", cfg.model.loss_workspace_mb, 1), ("data.batch_size", d.batch_size, 1), ("data.train_num_samples", d.train_num_samples, 1),
                            ("data.num_workers", d.num_workers, 0), ("data.num_captions", d.num_captions, 2),
                            ("data.local_crops", d.local_crops, 0), ("data.local_size", d.local_size, 1),
                            ("data.shuffle_buffer", d.shuffle_buffer, 1), ("data.shuffle_initial", d.shuffle_initial, 1),
                            ("optim.epochs", o.epochs, 1), ("optim.warmup", o.warmup, 0),
                            ("train.max_nonfinite", t.max_nonfinite, 1), ("train.save_every_steps", t.save_every_steps, 0),
                            ("train.eval_every_steps", t.eval_every_steps, 0), ("train.log_every_steps", t.log_every_steps, 0), ("data.eval_batch_size", d.eval_batch_size, 1)]:
        if value < lo:
            raise ConfigError(f"config field {path} = {value} must be >= {lo}")
    if t.max_steps is not None and t.max_steps < 1:
        raise ConfigError(f"config field train.max_steps = {t.max_steps} must be >= 1 or null")
    check_crop_scale(d.crop_scale)
    if not 0 <= e.momentum <= 1:
        raise ConfigError(f"config field ema.momentum = {e.momentum} must lie in [0, 1]")
    if o.lr <= 0 or o.eps <= 0 or not (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1) or o.weight_decay < 0:
        raise ConfigError(f"optim values out of range: lr={o.lr}, betas=({o.beta1}, {o.beta2}), eps={o.eps}, "
                          f"weight_decay={o.weight_decay}")
    if o.grad_clip_norm is not None and o.grad_clip_norm <= 0:
        raise ConfigError(f"config field optim.grad_clip_norm = {o.grad_clip_norm} must be > 0 or null")
    if not d.train_shards:
        raise ConfigError("config field data.train_shards is empty")
    global_batch = d.batch_size * world_size
    if global_batch > d.train_num_samples:
        raise ConfigError(f"data.batch_size {d.batch_size} × world size {world_size} = {global_batch} is larger than "
                          f"data.train_num_samples = {d.train_num_samples}: every batch would repeat samples; "
                          f"lower the batch or raise data.train_num_samples")
    if d.expected_global_batch is not None and d.expected_global_batch != global_batch:
        raise ConfigError(f"data.batch_size {d.batch_size} × world size {world_size} = {global_batch} but "
                          f"data.expected_global_batch = {d.expected_global_batch}; set the batch or the "
                          f"expectation (null disables the check)")
    notes.append(f"per-device batch {d.batch_size}, world size {world_size}, global batch {global_batch}, "
                 f"gradient accumulation 1")
    return notes
