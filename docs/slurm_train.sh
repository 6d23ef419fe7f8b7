#!/bin/bash
# fastcog on SLURM: one torchrun per node (srun), which starts one worker per GPU; the nodes
# meet at a c10d rendezvous on the first node of the allocation.
#
#   sbatch --nodes 2 docs/slurm_train.sh configs/t2v_h100.yaml --set train.output_dir=/scratch/runs/t2v
#
# Everything after the config is passed to `fastcog train` (--set overrides). The weights are
# sharded within a node and replicated across nodes (HSDP: parallel.replicate_degree = nodes);
# pass --set parallel.replicate_degree=1 to shard across all GPUs instead. output_dir, the data,
# the cache and model.path must be on a filesystem that every node sees.
#
#SBATCH --job-name=fastcog
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --requeue

set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: sbatch [--nodes N] $0 CONFIG [--set section.key=value ...]" >&2
    exit 2
fi
CONFIG=$1
shift

HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
RDZV_PORT=${RDZV_PORT:-29500}
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
NODES=${SLURM_JOB_NUM_NODES:-1}

# Threads per worker: the node's CPUs shared by its workers (data loading has its own processes).
CPUS=${SLURM_CPUS_PER_TASK:-$GPUS_PER_NODE}
export OMP_NUM_THREADS=$(( CPUS / GPUS_PER_NODE > 0 ? CPUS / GPUS_PER_NODE : 1 ))

# --kill-on-bad-exit: a node whose torchrun fails (a worker died) ends the whole step at once.
# checkpoint.resume_from=latest: a requeued job continues from the newest complete checkpoint
# (a first start, with none yet, starts from scratch).
srun --kill-on-bad-exit=1 torchrun \
    --nnodes "$NODES" \
    --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$HEAD_NODE:$RDZV_PORT" \
    --rdzv-id "$SLURM_JOB_ID" \
    -m fastcog train "$CONFIG" \
    --set parallel.replicate_degree="$NODES" \
    --set checkpoint.resume_from=latest \
    "$@"
