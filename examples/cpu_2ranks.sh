#!/usr/bin/env bash
# The same entry point on a CPU machine: 2 ranks, gloo, ZeRO-3, the tiny model on the demo data.
set -euo pipefail
cosmos-fast make-demo-data --output-dir runs/demo/data
DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module cosmos_fast.train --config tiny-cpu \
  --output-dir runs/ds-cpu distributed.backend=deepspeed distributed.zero_stage=3 \
  data.num_workers=1 train.max_steps=20
