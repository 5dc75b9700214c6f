"""Image↔text retrieval metrics with the official multiple-captions rule (cosmos_method.md §6.2):
the one recall implementation, used by ``cosmos-fast eval`` and by training's evaluations alike
(through :func:`cosmos_fast.eval.evaluate.evaluate_models`).

i2t: for image i, the rank is the best position among its ground-truth captions; t2i: the rank of a
caption's single ground-truth image. R@k = fraction of queries with rank < k. Features are the
normalised unimodal embeddings (no poolers), computed once per model.
"""
from __future__ import annotations

import torch


def _median_rank(ranks: torch.Tensor) -> float:
    """1-based median rank as usually reported: floor(median of 0-based ranks) + 1."""
    return float(torch.quantile(ranks.double(), 0.5).floor().item() + 1)


@torch.no_grad()
def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                      ks=(1, 5, 10), chunk: int = 1024) -> dict:
    """Recall@k, mean and median rank in both directions, without an N_i×N_t sort.

    ``image_features`` (N_i, D) and ``text_features`` (N_t, D) are L2-normalised, ``text_to_image``
    (N_t,) gives each caption's image. The rank of a query is the number of candidates scoring
    strictly higher than its best ground truth: for i2t the best-scoring of the image's captions
    (the multiple-captions rule, §6.2), for t2i the caption's single image. Without ties this is the
    position in a descending sort of the scores; with ties it is the optimistic position. Scores are
    computed in ``chunk``-row blocks on the features' device; R@k and mean ranks are float64
    fractions. Mean / median ranks are 1-based.
    """
    img, txt = image_features.float(), text_features.float().to(image_features.device)
    owner = text_to_image.to(img.device).long()
    n_img, n_txt = img.shape[0], txt.shape[0]
    if owner.shape != (n_txt,):
        raise ValueError(f"text_to_image must have shape ({n_txt},), got {tuple(owner.shape)}")
    if n_txt and (owner.min() < 0 or owner.max() >= n_img):
        raise ValueError(f"text_to_image holds indices outside [0, {n_img})")
    if n_img == 0 or torch.bincount(owner, minlength=n_img).min() == 0:
        raise ValueError("every image needs at least one caption for image→text ranks")
    i2t = torch.empty(n_img, dtype=torch.long, device=img.device)
    for s in range(0, n_img, chunk):
        scores = img[s:s + chunk] @ txt.T                                     # c × N_t
        is_gt = owner[None, :] == torch.arange(s, s + scores.shape[0], device=img.device)[:, None]
        best_gt = scores.masked_fill(~is_gt, float("-inf")).amax(dim=1, keepdim=True)
        i2t[s:s + chunk] = (scores > best_gt).sum(dim=1)
    t2i = torch.empty(n_txt, dtype=torch.long, device=img.device)
    for s in range(0, n_txt, chunk):
        scores = txt[s:s + chunk] @ img.T                                     # c × N_i
        gt = scores.gather(1, owner[s:s + chunk, None])
        t2i[s:s + chunk] = (scores > gt).sum(dim=1)
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = (i2t < k).double().mean().item()
        out[f"t2i_r{k}"] = (t2i < k).double().mean().item()
    out["i2t_mean_rank"] = i2t.double().mean().item() + 1
    out["i2t_median_rank"] = _median_rank(i2t)
    out["t2i_mean_rank"] = t2i.double().mean().item() + 1
    out["t2i_median_rank"] = _median_rank(t2i)
    out["n_images"], out["n_texts"] = n_img, n_txt
    return out
