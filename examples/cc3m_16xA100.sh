#!/usr/bin/env bash
# COSMOS ViT-B/16 on CC3M-recap: 16 × A100-40GB (4 nodes × 4), 64 per GPU, global batch 1024,
# 32 epochs, EMA momentum 0.999 — the official recipe (its training scripts).
# Launch from the first node with passwordless ssh to the others (DeepSpeed's pdsh launcher).
set -euo pipefail
source "$(dirname "$0")/nccl_env.sh"
deepspeed --hostfile examples/hostfile.example --num_gpus 4 \
  --module cosmos_fast.train --config cc3m-vitb16 --output-dir runs/cc3m-vitb16 \
  data.train_shards='/data/cc3m/{0000..0575}.tar' \
  train.precision=amp_bf16 distributed.zero_stage=1
# restarting the same command continues from the newest complete checkpoint (train.auto_resume)
