"""``cosmos-fast eval``: zero-shot evaluation of a checkpoint (ours or an official release).

    cosmos-fast eval --checkpoint FILE_OR_RUN [--model teacher|student|both] [--model-config ViT-B-16|tiny|cfg.json]
                     [--retrieval-root DIR [--retrieval-sets coco,flickr30k] [--retrieval-split official|karpathy]]
                     [--val-shards PATTERN]
                     [--imagenet-val DIR [--imagenet-classnames FILE]] [--sun397-root DIR [--sun397-seed S]]
                     [--segmentation-root DIR [--segmentation-sets voc21,context60,... | --seg-w-background]
                      [--csa | --no-csa]]
                     [--batch-size N] [--num-workers N] [--device auto|cpu|cuda:N] [--precision fp32|amp_bf16|amp_fp16]
                     [--output results.json] [--trust-checkpoint]
    cosmos-fast eval --huggingface-repo-name sankim2/cosmos --huggingface-model-name cosmos_vitb16_cc3m.pt ...

A released model named with ``--huggingface-*`` is fetched with ``huggingface_hub`` where the network
allows and read from the local hub cache otherwise (``HF_HUB_OFFLINE=1`` reads only the cache;
``HF_HUB_CACHE`` / ``HF_HOME`` locate it). ``--model`` defaults to the teacher (the EMA model, which
the official segmentation evaluation uses); ``both`` evaluates student and teacher on one pass over
the data, as the official ``main.py`` does. A file holding a single model is evaluated once, under
the name ``model``. ``--checkpoint`` also takes a run folder or its ``checkpoints/`` folder (the
newest complete checkpoint, as ``export``) or a DeepSpeed tag folder. ``--model-config`` defaults to
the model the checkpoint records (our runs do), else to ViT-B-32 when the file name says ``vitb32``
and to ViT-B-16 otherwise. Without ``--retrieval-sets`` the retrieval sets whose annotation file is
absent are skipped with a warning; a set named there must exist. ``--val-shards`` evaluates the
held-out webdataset shards training evaluates (``data.val_shards``).

Zero-shot segmentation (cosmos_method.md §6.5, the SCLIP protocol) runs on the benchmarks found under
``--segmentation-root`` (the folder holding ``VOCdevkit/``, ``ade/``, ...): ``--segmentation-sets``
names them (each must exist); without it, the three with-background sets when ``--seg-w-background``
is given, else the five without background, those absent skipped with a warning. The paper's
protocol segments with the **teacher** (the default ``--model``), in fp32 whatever ``--precision``
says, with the CSA last block (``--no-csa``: the plain last block). Its result per set: ``mIoU``,
``per_class_iou`` (null for an absent class), ``n_images``,
``csa``. Only tensors, plain
containers and a few known types are unpickled: a file that holds other objects is refused (exit 2)
unless ``--trust-checkpoint`` says its code may run.

The JSON written with ``--output``: ``{model, model_config, checkpoint, source, huggingface, epoch,
run_name, image_size, split, datasets: {name: {metrics..., n_images, n_texts | n_classes, ...}}}``;
with ``--model both`` the per-model results are under ``models: {student: {datasets}, teacher:
{datasets}}`` instead of ``datasets``. Exit status 0 on success, 2 on a usage or input error.
"""
from __future__ import annotations

import argparse
import json
import os
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ..config import TRUST_CHECKPOINT_HELP
from ..device import resolve_device
from ..checkpointing import find_checkpoint
from ..engine import AMP_DTYPES
from ..export import check_against, read_deepspeed, recorded_model
from ..model import create_model
from ..model.checkpoint import CheckpointMismatchError, select_state_dict, strip_prefix, torch_load
from .datasets import RETRIEVAL_SETS, SPLITS, load_present
from .evaluate import evaluate_models, format_results, load_eval_sets
from .seg_datasets import SEG_SETS, SEG_SETS_WITH_BACKGROUND, SEG_SETS_WITHOUT_BACKGROUND, load_segmentation_set
from .seg_types import SegmentationSet
from .segmentation import evaluate_segmentation
from .sharding import Shards

WEIGHTS = ("teacher", "student", "both")

log = logging.getLogger(__name__)


class CheckpointSourceError(RuntimeError):
    """The checkpoint could not be located (bad path, or not downloadable and not in the hub cache)."""


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_cache_dir() -> str | None:
    """The hub cache named by the environment *now* (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def download_checkpoint(repo_id: str, filename: str, revision: str | None = None, cache_dir=None) -> Path:
    """``hf_hub_download`` of a released checkpoint; only the local cache under ``HF_HUB_OFFLINE=1``."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    offline = _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")
    cache_dir = cache_dir or _hub_cache_dir()
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, revision=revision, cache_dir=cache_dir,
                                    local_files_only=offline))
    except (OSError, ValueError, EntryNotFoundError) as e:
        where = cache_dir or "the default hub cache"
        mode = "offline (HF_HUB_OFFLINE=1): only the cache was read" if offline else \
            "the download failed and the file is not in the cache"
        raise CheckpointSourceError(
            f"cannot get {filename!r} from the Hugging Face repo {repo_id!r} ({mode}; cache: {where}): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Download it where the network "
            f"allows (it lands in the hub cache), or pass --checkpoint PATH") from e


def resolve_checkpoint(checkpoint=None, repo_id: str | None = None, filename: str | None = None,
                       revision: str | None = None) -> tuple[Path, dict | None]:
    """(path, huggingface info or None) from either a path or a (repo, file) pair."""
    if checkpoint and (repo_id or filename):
        raise ValueError("give either --checkpoint or --huggingface-repo-name/--huggingface-model-name, not both")
    if repo_id or filename:
        if not (repo_id and filename):
            raise ValueError("--huggingface-repo-name and --huggingface-model-name go together")
        path = download_checkpoint(repo_id, filename, revision)
        return path, {"repo": repo_id, "file": filename, "revision": revision}
    if not checkpoint:
        raise ValueError("no checkpoint: pass --checkpoint PATH or --huggingface-repo-name/--huggingface-model-name")
    return find_checkpoint(checkpoint), None


def model_config_and_label(value, checkpoint_name: str = "", recorded: str | None = None):
    """(config for ``create_model``, label): a model name, or a JSON file holding a config dict.

    ``None`` takes the model the checkpoint records (``recorded``), else guesses from the file name
    (official releases record nothing): ViT-B-32 when it says ``vitb32``, ViT-B-16 otherwise."""
    if value is None and recorded is not None:
        value = recorded
    if value is None:
        low = checkpoint_name.lower().replace("-", "").replace("_", "")
        value = "ViT-B-32" if "vitb32" in low else "ViT-B-16"
    if isinstance(value, Mapping):
        return dict(value), "custom"
    path = Path(value)
    if path.suffix.lower() == ".json" or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"model config file {path} not found")
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"model config file {path} is not valid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"model config file {path} must hold a JSON object, got {type(cfg).__name__}")
        return cfg, str(path)
    return value, value


def read_checkpoint(path, weights: Sequence[str] = ("teacher",), *, trust: bool = False):
    """The checkpoint body: a file's contents, or a DeepSpeed tag folder's ``teacher.pt`` plus (only
    when ``weights`` asks for it) the student consolidated from the ZeRO partitions."""
    path = Path(path)
    if path.is_dir():
        return read_deepspeed(path, trust=trust, student="student" in weights)
    return torch_load(path, trust=trust)


def load_models(path, model_config, weights: Sequence[str] = ("teacher",), device="cpu", *,
                trust: bool = False, body=None) -> tuple[dict, dict]:
    """Build and load ``weights`` ("student" / "teacher") from one read of the file.

    A file holding one model (bare state dict, or ``state_dict`` without ``ema_state_dict``) yields a
    single entry ``"model"``. Returns ``({name: model in eval mode}, {"epoch", "run_name"})``.
    ``trust=True`` allows full unpickling, which can run code from the file (``--trust-checkpoint``).
    ``body`` is the file already read with :func:`read_checkpoint`. Weights that do not fit the model
    raise CheckpointMismatchError ending with the ``--model-config`` to pass.
    """
    obj = read_checkpoint(path, weights, trust=trust) if body is None else body
    recorded = recorded_model(obj)
    two = isinstance(obj, Mapping) and (any(k in obj for k in ("student", "teacher"))
                                        or {"state_dict", "ema_state_dict"} <= set(obj))
    models = {}
    for w in (weights if two else ("model",)):
        if w not in ("student", "teacher", "model"):
            raise ValueError(f"unknown weights {w!r}; choose student or teacher")
        sd = strip_prefix(select_state_dict(obj, w if two else None, path))
        model = create_model(model_config)
        check_against(model, sd, path, recorded, model_config, "--model-config")
        model.load_state_dict(sd, strict=True)
        models[w] = model.to(device).eval()
    meta = {}
    if isinstance(obj, Mapping):
        meta = {"epoch": obj.get("epoch") if isinstance(obj.get("epoch"), int) else None,
                "run_name": obj.get("name") if isinstance(obj.get("name"), str) else None}
    return models, meta


def default_num_workers(cap: int = 8) -> int:
    """The CPU cores this process may use (its affinity mask where the OS has one), at most ``cap``:
    more image-decoding workers than cores only add contention (and PyTorch warns about it)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cap, cores))


def load_segmentation_sets(root, names: Sequence[str] | str | None = None,
                           with_background: bool = False) -> list[SegmentationSet]:
    """The segmentation benchmarks under ``root``, read (and checked) before anything is encoded.

    ``names`` (a sequence or a comma-separated string) are loaded and must exist; ``None`` means
    :data:`SEG_SETS_WITH_BACKGROUND` when ``with_background``, else :data:`SEG_SETS_WITHOUT_BACKGROUND`,
    the absent ones logged as skipped (a root holding none of them is an error)."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if names is not None:
        unknown = [n for n in names if n not in SEG_SETS]
        if unknown or not names:
            raise ValueError(f"unknown segmentation set(s) {', '.join(unknown) or '(none given)'}; "
                             f"choose from {','.join(SEG_SETS)}")
        return [load_segmentation_set(n, root) for n in names]
    return load_present(SEG_SETS_WITH_BACKGROUND if with_background else SEG_SETS_WITHOUT_BACKGROUND,
                        lambda name: load_segmentation_set(name, root), "segmentation",
                        f"segmentation root {root} holds none of the "
                        f"{'with' if with_background else 'without'}-background sets: ", missing=FileNotFoundError)


def evaluate_segmentation_sets(models: Mapping[str, nn.Module], seg_sets: Sequence[SegmentationSet], *,
                               csa: bool = True, device="cpu", distributed: bool | None = None, group=None,
                               progress: bool = False) -> dict:
    """``{model: {set: evaluate_segmentation's dict}}``. ``distributed=None`` shards the images across
    ranks exactly when ``torch.distributed`` is initialised (every rank a contiguous part, the
    confusion matrices summed, so every rank returns the same results); call it on every rank."""
    shards = Shards(distributed, group)
    results = {name: {} for name in models}
    with torch.no_grad():
        for name, model in models.items():
            for seg_set in seg_sets:
                results[name][seg_set.name] = evaluate_segmentation(model, seg_set, csa=csa, device=device,
                                                                    shards=shards, progress=progress)
    return results


def evaluate_checkpoint(checkpoint=None, *, huggingface_repo: str | None = None, huggingface_file: str | None = None,
                        huggingface_revision: str | None = None, model: str = "teacher", model_config=None,
                        device="auto", trust_checkpoint: bool = False, **eval_kwargs) -> dict:
    """Resolve, load and evaluate a checkpoint; returns the report written by ``--output``.

    ``trust_checkpoint=True`` unpickles the file in full (it can then run arbitrary code); by
    default a file holding more than tensors, plain containers and a few known types is refused.

    ``eval_kwargs`` go to :func:`cosmos_fast.eval.evaluate.evaluate_models` (retrieval_root,
    retrieval_sets, split, imagenet_val, imagenet_classnames, sun397_root, batch_size, ...), except
    ``segmentation_root``, ``segmentation_sets``, ``seg_w_background`` (:func:`load_segmentation_sets`)
    and ``csa`` (:func:`evaluate_segmentation_sets`); segmentation results join the retrieval and
    classification ones, one entry per set.
    """
    if model not in WEIGHTS:
        raise ValueError(f"--model must be one of {WEIGHTS}, got {model!r}")
    split = eval_kwargs.get("split", "official")
    data_keys = ("retrieval_root", "retrieval_sets", "split", "imagenet_val", "imagenet_classnames", "sun397_root",
                 "sun397_seed", "val_shards")
    seg_root = eval_kwargs.pop("segmentation_root", None)
    seg_names = eval_kwargs.pop("segmentation_sets", None)
    seg_w_background = eval_kwargs.pop("seg_w_background", False)
    csa = eval_kwargs.pop("csa", True)
    if seg_root is None and (seg_names is not None or seg_w_background):
        raise ValueError("--segmentation-sets and --seg-w-background need --segmentation-root")
    if seg_names is not None and seg_w_background:
        raise ValueError("give either --segmentation-sets or --seg-w-background (which picks the with-background "
                         f"sets {','.join(SEG_SETS_WITH_BACKGROUND)}), not both")
    data = {k: eval_kwargs.pop(k) for k in data_keys if k in eval_kwargs}
    # annotation errors surface before a (1.2 GB) checkpoint is read
    wants_other = any(data.get(k) for k in ("retrieval_root", "val_shards", "imagenet_val", "sun397_root"))
    sets = load_eval_sets(**data) if wants_other or seg_root is None else []
    seg_sets = load_segmentation_sets(seg_root, seg_names, seg_w_background) if seg_root is not None else []
    path, hf = resolve_checkpoint(checkpoint, huggingface_repo, huggingface_file, huggingface_revision)
    weights = ("student", "teacher") if model == "both" else (model,)
    body = read_checkpoint(path, weights, trust=trust_checkpoint)
    cfg, label = model_config_and_label(model_config, path.name, recorded_model(body))
    dev = resolve_device(device)
    models, meta = load_models(path, cfg, weights, dev, trust=trust_checkpoint, body=body)
    # the resolution the run trained and evaluated at (data.global_size), else the model's
    run_size = ((body.get("config") or {}).get("data") or {}).get("global_size") if isinstance(body, Mapping) else None
    image_size = eval_kwargs.get("image_size") or (run_size if isinstance(run_size, int) else None) \
        or next(iter(models.values())).cfg.vision_cfg.image_size
    eval_kwargs["image_size"] = image_size
    results = (evaluate_models(models, device=dev, distributed=False, sets=sets, **eval_kwargs) if sets
               else {name: {} for name in models})
    if seg_sets:
        seg = evaluate_segmentation_sets(models, seg_sets, csa=csa, device=dev, distributed=False,
                                         progress=eval_kwargs.get("progress", False))
        for name in models:
            results[name].update(seg[name])
    report = {"model": "model" if "model" in models else model, "model_config": label,
              "checkpoint": str(path.resolve()), "source": "huggingface" if hf else "local", "huggingface": hf,
              **meta, "image_size": image_size, "split": split}
    if len(models) == 1:
        report["datasets"] = next(iter(results.values()))
    else:
        report["models"] = {name: {"datasets": per_set} for name, per_set in results.items()}
    return report


# ---------------------------------------------------------------------------------------- parser
def _add_eval_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    src = p.add_argument_group("checkpoint")
    src.add_argument("--checkpoint", help="checkpoint file (official format, ours, or a bare state dict), or a run "
                                          "folder / its checkpoints/ folder (the newest complete checkpoint)")
    src.add_argument("--huggingface-repo-name", metavar="REPO", help="e.g. sankim2/cosmos")
    src.add_argument("--huggingface-model-name", metavar="FILE", help="e.g. cosmos_vitb16_cc3m.pt")
    src.add_argument("--huggingface-revision", metavar="REV", help="branch, tag or commit (default main)")
    src.add_argument("--model", choices=WEIGHTS, default="teacher",
                     help="weights to evaluate (default teacher; both = student and teacher, as main.py)")
    src.add_argument("--model-config", metavar="NAME_OR_JSON",
                     help="ViT-B-16, ViT-B-32, tiny or a JSON config file (default: the model the checkpoint records; "
                          "for a file that records none, ViT-B-32 if its name says vitb32, else ViT-B-16)")
    src.add_argument("--trust-checkpoint", action="store_true", help=TRUST_CHECKPOINT_HELP)
    data = p.add_argument_group("data")
    data.add_argument("--retrieval-root", metavar="DIR", help="folder holding coco/ and flickr30k-images/")
    data.add_argument("--retrieval-sets", default=None,
                      help=f"comma-separated, from {','.join(RETRIEVAL_SETS)}; each must exist (default: those whose "
                           f"annotation file is under --retrieval-root; the others are skipped with a warning)")
    data.add_argument("--val-shards", metavar="PATTERN",
                      help="held-out webdataset shards, as training's data.val_shards (brace pattern, json field "
                           "retrieval_captions), evaluated as the set 'val_shards'")
    data.add_argument("--retrieval-split", choices=SPLITS, default="official",
                      help="official = COCO val2017 + Flickr30k val (published numbers); karpathy = 5k/1k test")
    data.add_argument("--imagenet-val", metavar="DIR", help="ImageFolder of <wnid>/*.JPEG (imagenet/data/val_images)")
    data.add_argument("--imagenet-classnames", metavar="FILE",
                      help="class names for a folder with other than 1000 classes (lines, JSON list or map)")
    data.add_argument("--sun397-root", metavar="DIR", help="torchvision SUN397 layout (SUN397/ClassName.txt)")
    data.add_argument("--sun397-seed", type=int, default=0, help="seed of the documented SUN397 test subset")
    data.add_argument("--segmentation-root", metavar="DIR",
                      help="zero-shot segmentation (§6.5): the folder holding the benchmarks (VOCdevkit/, ade/, "
                           "cityscapes/, coco_stuff164k/); the paper's protocol uses the teacher (--model teacher, "
                           "the default) in fp32")
    data.add_argument("--segmentation-sets", default=None,
                      help=f"comma-separated, from {','.join(SEG_SETS)}; each must exist (default: the "
                           f"without-background sets {','.join(SEG_SETS_WITHOUT_BACKGROUND)}, or with "
                           f"--seg-w-background {','.join(SEG_SETS_WITH_BACKGROUND)}; absent ones skipped)")
    data.add_argument("--seg-w-background", action="store_true",
                      help=f"segment the with-background sets ({','.join(SEG_SETS_WITH_BACKGROUND)}) instead of "
                           f"the without-background ones")
    data.add_argument("--csa", action=argparse.BooleanOptionalAction, default=True,
                      help="segmentation with the CSA last block (q·qᵀ + k·kᵀ attention, §6.5; default) or the "
                           "plain one (--no-csa)")
    run = p.add_argument_group("run")
    run.add_argument("--batch-size", type=int, default=256, help="images per batch (default 256)")
    run.add_argument("--num-workers", type=int, default=default_num_workers(),
                     help="image-decoding worker processes (default: the cores available, at most 8: %(default)s)")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    run.add_argument("--precision", choices=tuple(AMP_DTYPES), default="fp32",
                     help="fp32, or autocast in bf16 / fp16 (default fp32)")
    run.add_argument("--image-size", type=int, help="evaluation resolution (default: the model's)")
    run.add_argument("--output", metavar="JSON", help="write the results here")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``eval`` sub-command to an ``add_subparsers()`` object; it dispatches to :func:`run_eval`."""
    p = subparsers.add_parser("eval", help="zero-shot retrieval / classification / segmentation of a checkpoint",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    _add_eval_args(p)
    p.set_defaults(func=run_eval)
    return p


def run_eval(args) -> int:
    if args.batch_size < 1 or args.num_workers < 0:
        print("cosmos-fast eval: error: --batch-size must be >= 1 and --num-workers >= 0", file=sys.stderr)
        return 2
    if not (args.retrieval_root or args.val_shards or args.imagenet_val or args.sun397_root
            or args.segmentation_root):
        print("cosmos-fast eval: error: nothing to evaluate; pass --retrieval-root, --val-shards, --imagenet-val, "
              "--sun397-root and/or --segmentation-root", file=sys.stderr)
        return 2
    if args.retrieval_sets is not None and not args.retrieval_root:
        print("cosmos-fast eval: error: --retrieval-sets needs --retrieval-root", file=sys.stderr)
        return 2
    try:
        report = evaluate_checkpoint(
            args.checkpoint, huggingface_repo=args.huggingface_repo_name,
            huggingface_file=args.huggingface_model_name, huggingface_revision=args.huggingface_revision,
            model=args.model, model_config=args.model_config, device=args.device,
            trust_checkpoint=args.trust_checkpoint,
            retrieval_root=args.retrieval_root, retrieval_sets=args.retrieval_sets, split=args.retrieval_split,
            imagenet_val=args.imagenet_val, imagenet_classnames=args.imagenet_classnames,
            sun397_root=args.sun397_root, sun397_seed=args.sun397_seed, val_shards=args.val_shards,
            segmentation_root=args.segmentation_root, segmentation_sets=args.segmentation_sets,
            seg_w_background=args.seg_w_background, csa=args.csa, batch_size=args.batch_size,
            num_workers=args.num_workers, image_size=args.image_size, autocast_dtype=AMP_DTYPES[args.precision],
            progress=not args.no_progress)
    except (FileNotFoundError, ValueError, KeyError, TypeError, CheckpointSourceError,
            CheckpointMismatchError) as e:
        print(f"cosmos-fast eval: error: {e}", file=sys.stderr)
        return 2
    per_model = report["models"] if "models" in report else {report["model"]: {"datasets": report["datasets"]}}
    print(format_results({name: r["datasets"] for name, r in per_model.items()}))
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, out)
        print(f"results written to {out}")
    return 0


def main(argv=None) -> int:
    """``python -m cosmos_fast.eval.cli [eval args]`` (the same as ``cosmos-fast eval``)."""
    parser = _add_eval_args(argparse.ArgumentParser(prog="cosmos-fast eval", description=__doc__.split("\n\n")[0]))
    return run_eval(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
