#!/usr/bin/env bash
# Launch any tessera entry point on several nodes under SLURM, one torchrun per node.
#   sbatch --nodes=2 --gpus-per-node=8 scripts/slurm.sh main_prior.py --config configs/imagenet256/prior/gpt_b.yaml \
#       --tokenizer runs/vqgan --run-dir runs/gpt_b
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
GPUS=${SLURM_GPUS_PER_NODE:-8}
srun bash -c "torchrun --nnodes=$SLURM_NNODES --node_rank=\$SLURM_NODEID --nproc_per_node=$GPUS \
  --master_addr=$MASTER_ADDR --master_port=${MASTER_PORT:-29500} $*"
