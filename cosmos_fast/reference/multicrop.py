"""The multicrop op's reference: one §4.4 crop made by torchvision's own functions, one by one (what
:class:`~cosmos_fast.data.transforms.MultiCropTransform` calls), from given random parameters. The
Numba kernel (:mod:`cosmos_fast.ops.multicrop`) is tested and benchmarked against it."""
from __future__ import annotations

import numpy as np
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from torchvision.transforms import InterpolationMode

from ..data.normalize import OPENAI_MEAN, OPENAI_STD
from ..data.recipe import JITTER_ORDERS, PARAM_FIELDS, SOLARIZE_THRESHOLD


def reference_crop(img, params, size: int) -> np.ndarray:
    """The normalised (3, size, size) float32 crop. ``img``: a PIL RGB image or an HWC uint8 array;
    ``params``: a mapping with the :data:`~cosmos_fast.data.recipe.PARAM_FIELDS` names or a vector in
    that order."""
    p = params if isinstance(params, dict) else dict(zip(PARAM_FIELDS, np.asarray(params, dtype=np.float32).tolist()))
    img = Image.fromarray(np.asarray(img, dtype=np.uint8)) if not isinstance(img, Image.Image) else img
    out = TF.resized_crop(img, int(p["y0"]), int(p["x0"]), int(p["h"]), int(p["w"]), [size, size],
                          InterpolationMode.BICUBIC)
    if p["flip"]:
        out = TF.hflip(out)
    if p["jitter"]:
        ops = ((TF.adjust_brightness, "brightness"), (TF.adjust_contrast, "contrast"),
               (TF.adjust_saturation, "saturation"), (TF.adjust_hue, "hue"))
        for k in JITTER_ORDERS[int(p["order"])]:
            fn, name = ops[k]
            out = fn(out, float(p[name]))
    if p["gray"]:
        out = TF.rgb_to_grayscale(out, 3)
    if p["blur"]:
        out = out.filter(ImageFilter.GaussianBlur(radius=float(p["radius"])))
    if p["solarize"]:
        out = TF.solarize(out, SOLARIZE_THRESHOLD)
    return TF.normalize(TF.to_tensor(out), OPENAI_MEAN, OPENAI_STD).numpy()
