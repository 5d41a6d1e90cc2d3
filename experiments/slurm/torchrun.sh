#!/bin/bash
# kd_lightning with torchrun, for clusters without SLURM (Lightning detects torchrun's environment itself).
#
#   bash experiments/slurm/torchrun.sh experiments/digits/base.yaml experiments/digits/kd.yaml
#
# Multi-node: set NNODES to the number of nodes and MASTER to the first node's address, and start this script on
# every node (the one line to change is NNODES=...). Resume a stopped run with --ckpt_path <its last.ckpt>.
set -euo pipefail
NNODES=${NNODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(python3 -c "import torch; print(max(torch.cuda.device_count(), 1))")}
ACCELERATOR=${ACCELERATOR:-$(python3 -c "import torch; print('gpu' if torch.cuda.is_available() else 'cpu')")}
MASTER=${MASTER:-localhost}

# arguments: config files (*.yaml, merged in order), then any overrides (--model.init_args.terms.kd.init_args.temperature 2 ...)
configs=()
for arg in "$@"; do case "$arg" in *.yaml|*.yml) configs+=(--config "$arg") ;; *) configs+=("$arg") ;; esac; done

if [ "$NNODES" = 1 ]; then rendezvous=(--standalone); else rendezvous=(--rdzv_backend=c10d --rdzv_endpoint="$MASTER:29500"); fi
torchrun "${rendezvous[@]}" --nnodes="$NNODES" --nproc_per_node="$GPUS_PER_NODE" -m kd_lightning.cli fit \
    "${configs[@]}" \
    --trainer.accelerator "$ACCELERATOR" \
    --trainer.devices "$GPUS_PER_NODE" \
    --trainer.num_nodes "$NNODES" \
    --trainer.strategy ddp
