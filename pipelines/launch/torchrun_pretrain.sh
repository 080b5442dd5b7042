#!/bin/bash
# Hashtag pretraining launched with torchrun, one command per node. Edit NNODES, the
# rendezvous host and the config's data paths. On every node, from the repository root:
#   NNODES=4 MASTER=node001 bash pipelines/launch/torchrun_pretrain.sh
#   NNODES=1 bash pipelines/launch/torchrun_pretrain.sh max_steps=1000     # one node, overrides after
# Lightning detects torchrun's environment and uses its ranks; it launches nothing itself.
set -euo pipefail
NNODES=${NNODES:-1}
GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}
MASTER=${MASTER:-localhost}
CONFIG=${CONFIG:-configs/pretrain/ig_resnext101_32x8d.yaml}
export OMP_NUM_THREADS=1
.venv/bin/torchrun --nnodes="$NNODES" --nproc-per-node="$GPUS" \
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER:29500" --rdzv-id="${RDZV_ID:-wsl}" \
    -m wsl.cli pretrain --config "$CONFIG" trainer.num_nodes="$NNODES" trainer.devices="$GPUS" "$@"
