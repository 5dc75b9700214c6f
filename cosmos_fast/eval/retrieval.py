"""Image↔text retrieval recall with the official multiple-captions rule (cosmos_method.md §6.2).

i2t: for image i, the rank is the best position among its ground-truth captions; t2i: the rank of a
caption's single ground-truth image. R@k = fraction of queries with rank < k. Features are the
normalised unimodal embeddings (no poolers), computed once per model.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def recall_at_k(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                ks=(1, 5, 10)) -> dict:
    """``image_features`` (N_i, D), ``text_features`` (N_t, D), ``text_to_image`` (N_t,) GT image index."""
    scores = image_features.float() @ text_features.float().T                    # N_i × N_t
    n_img = image_features.shape[0]
    # t2i: rank of the GT image among all images for each caption
    gt = scores[text_to_image, torch.arange(scores.shape[1])]
    t2i_rank = (scores.T > gt[:, None]).sum(dim=1)
    # i2t: best rank among the image's GT captions
    order = scores.argsort(dim=1, descending=True)
    positions = torch.empty_like(order)
    positions.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order).contiguous())
    is_gt = text_to_image[None, :] == torch.arange(n_img)[:, None]
    i2t_rank = torch.where(is_gt, positions, torch.full_like(positions, order.shape[1])).min(dim=1).values
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = (i2t_rank < k).float().mean().item()
        out[f"t2i_r{k}"] = (t2i_rank < k).float().mean().item()
    out["n_images"], out["n_texts"] = n_img, int(text_features.shape[0])
    return out


def load_retrieval_shards(urls, caption_key: str = "retrieval_captions"):
    """(list of PIL images, list of captions, text→image index) from webdataset shards.

    A sample whose json or image cannot be decoded (the training loader's rules: ``bad_json``,
    ``corrupt_image``, ``unsupported_image_format``) is skipped with a log line naming shard and key; a
    record without the jpg/json members or the caption list is an error naming the sample."""
    from webdataset import tariterators

    from ..data.captions import SampleError
    from ..data.stream import decode_image, parse_json

    images, captions, owner = [], [], []
    for url in urls:
        files = tariterators.tar_file_expander(tariterators.url_opener([{"url": url}]))
        for sample in tariterators.group_by_keys(files):
            key = sample.get("__key__")
            if "json" not in sample or "jpg" not in sample:
                raise ValueError(f"retrieval sample {key!r} in {url} lacks a jpg or json member")
            try:
                record = parse_json(sample["json"])
                image = decode_image(sample["jpg"]).convert("RGB")
            except SampleError as e:
                log.warning("skipping retrieval sample %r in %s: %s (%s)", key, url, e.reason, e)
                continue
            caps = record.get(caption_key) if isinstance(record, dict) else None
            if not isinstance(caps, list) or not caps:
                raise ValueError(f"retrieval sample {key!r} in {url}: field {caption_key!r} must be a "
                                 f"non-empty list of captions")
            images.append(image)
            captions += caps
            owner += [len(images) - 1] * len(caps)
    return images, captions, torch.tensor(owner)


@torch.no_grad()
def encode_retrieval_set(model, images: torch.Tensor, tokens: torch.Tensor, batch_size: int = 256):
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    img = torch.cat([model.encode_image(images[i:i + batch_size].to(dev)).float().cpu()
                     for i in range(0, len(images), batch_size)])
    txt = torch.cat([model.encode_text(tokens[i:i + batch_size].to(dev)).float().cpu()
                     for i in range(0, len(tokens), batch_size)])
    model.train(was_training)
    return img, txt


def retrieval_eval(model, images: torch.Tensor, tokens: torch.Tensor, text_to_image: torch.Tensor,
                   batch_size: int = 256) -> dict:
    img, txt = encode_retrieval_set(model, images, tokens, batch_size)
    return recall_at_k(img, txt, text_to_image)


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
    position of :func:`recall_at_k`'s sort; with ties it is the optimistic position. Scores are
    computed in ``chunk``-row blocks on the features' device. Mean / median ranks are 1-based.
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
