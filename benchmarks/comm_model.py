"""Per-rank communication volume of one COSMOS training step under DeepSpeed ZeRO (ring formulas).

:func:`comm_volume` is the model that benchmarks/scaling.py projects to A100 clusters and that
benchmarks/profile_train.py compares with the volume it measures from a torch.profiler run;
:func:`official_loss_allgather` is what the official loss gathers per rank (benchmarks/bench_rank.py
counts it from the collectives each path issues).
"""
from __future__ import annotations

CATEGORIES = ("feature_allgather", "loss_stats_allreduce", "feature_grad_reduce", "grad_reduce",
              "zero3_param_gather", "zero3_teacher_gather", "param_allgather_after_step")
N_CAPS, N_TEACHER, PAIRS = 8, 2, 80


def comm_volume(n_params: int, stage: int, world: int, *, batch: int, dim: int = 512, param_bytes: int = 2,
                grad_bytes: int = 2, feature_bytes: int = 2, teacher_partitioned: bool = True,
                teacher_bytes: int = 4, reduce_scatter: bool = True, zero3_regather: bool = False,
                n_caps: int = N_CAPS,
                n_teacher: int = N_TEACHER, pairs: int = PAIRS, stats_bytes: int = 4) -> dict[str, float]:
    """Per-rank bytes on the wire per training step, by category (ring algorithms).

    With W ranks, a = (W−1)/W (all-gather / reduce-scatter) and r = 2(W−1)/W (all-reduce), P
    parameters, B per-rank batch, B_g = B·W, D feature width:
      feature_allgather    a · (n_caps + 2·n_teacher) · B_g · D · feature_bytes   (student text,
                           teacher image + text features gathered by the loss)
      loss_stats_allreduce r · (2 · pairs · B_g + 2 · pairs) · stats_bytes  (column max and sum of
                           exp per pair and column, fp32; per-pair totals and diagonals)
      feature_grad_reduce  (a if reduce_scatter else r) · n_caps · B_g · D · feature_bytes
                           + r · 2 · stats_bytes  (text-feature gradients back to their owners;
                           the two logit-scale gradients)
      grad_reduce          stage 0: r · P · grad_bytes (all-reduce); stages 1–3: a · P · grad_bytes
                           (reduce-scatter; r · P · grad_bytes with reduce_scatter=False, as
                           gloo / DeepSpeed's CPU path all-reduce instead)
      param_allgather_after_step  stages 1–2: a · P · param_bytes (updated partitions)
      zero3_param_gather   stage 3: a · P · param_bytes (gathered once in the forward; small
                           "persistent" parameters are re-gathered after the step instead), or
                           2 · a · P · param_bytes with zero3_regather=True (the textbook ZeRO-3
                           volume, when live-parameter / reuse-distance limits release the weights
                           between forward and backward; the trainer's limits are 1e9, so a
                           ViT-B keeps them — measured on CPU: one gather per step)
      zero3_teacher_gather stage 3 with a partitioned fp32 teacher: a · P · teacher_bytes
    """
    out = dict.fromkeys(CATEGORIES, 0.0)
    if world <= 1:
        return out
    a, r = (world - 1) / world, 2 * (world - 1) / world
    bg = batch * world
    out["feature_allgather"] = a * (n_caps + 2 * n_teacher) * bg * dim * feature_bytes
    out["loss_stats_allreduce"] = r * (2 * pairs * bg + 2 * pairs) * stats_bytes
    out["feature_grad_reduce"] = (a if reduce_scatter else r) * n_caps * bg * dim * feature_bytes + r * 2 * stats_bytes
    if stage == 0:
        out["grad_reduce"] = r * n_params * grad_bytes
    else:
        out["grad_reduce"] = (a if reduce_scatter else r) * n_params * grad_bytes
    if stage in (1, 2):
        out["param_allgather_after_step"] = a * n_params * param_bytes
    if stage == 3:
        out["zero3_param_gather"] = (2 if zero3_regather else 1) * a * n_params * param_bytes
        if teacher_partitioned:
            out["zero3_teacher_gather"] = a * n_params * teacher_bytes
    return out


def official_loss_allgather(batch: int, world: int, dim: int = 512, *, feature_bytes: int = 4,
                            pairs: int = PAIRS) -> float:
    """Per-rank bytes the official loss gathers per step (cosmos_method.md §3.4): both operands of
    each pair all-gathered, (W − 1)·B·D·feature_bytes received per gather, 2·pairs gathers. Under the
    official fp16 autocast the normalised features are fp32 (the norm is autocast to fp32), hence
    the default of 4 bytes: ≈ 1.33 GB at B = 32, W = 128, D = 512 (0.67 GB if they were 16-bit)."""
    return 2 * pairs * (world - 1) * batch * dim * feature_bytes
