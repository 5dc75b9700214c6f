"""OpenAI CLIP's per-channel image normalisation (x − mean) / std on [0, 1] RGB, the last step of
every crop path: torchvision (:mod:`.transforms`), the fused kernel (:mod:`cosmos_fast.ops.multicrop`) and
DALI (:mod:`.dali_multicrop`); :mod:`.recipe` names them as the recipe's last step."""

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
