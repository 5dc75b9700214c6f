"""Image↔text retrieval recall with the official multiple-captions rule (cosmos_method.md §6.2).

i2t: for image i, the rank is the best position among its ground-truth captions; t2i: the rank of a
caption's single ground-truth image. R@k = fraction of queries with rank < k. Features are the
normalised unimodal embeddings (no poolers), computed once per model.
"""
from __future__ import annotations

import io
import json

import torch
from PIL import Image


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
    """(list of PIL images, list of captions, text→image index) from webdataset shards."""
    from webdataset import tariterators

    images, captions, owner = [], [], []
    for url in urls:
        files = tariterators.tar_file_expander(tariterators.url_opener([{"url": url}]))
        for sample in tariterators.group_by_keys(files):
            key = sample.get("__key__")
            if "json" not in sample or "jpg" not in sample:
                raise ValueError(f"retrieval sample {key!r} in {url} lacks a jpg or json member")
            record = json.loads(sample["json"])
            caps = record.get(caption_key)
            if not isinstance(caps, list) or not caps:
                raise ValueError(f"retrieval sample {key!r} in {url}: field {caption_key!r} must be a "
                                 f"non-empty list of captions")
            images.append(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
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
