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
# Stopping without losing work: 300 s before the time limit SLURM sends USR1 to this script
# (--signal=B:USR1@300), which sends TERM to every process of the training step. Each fastcog
# worker then finishes its step, writes a checkpoint and exits; this script requeues the job,
# which resumes from that checkpoint. A preempted job gets TERM from SLURM directly and is
# requeued by SLURM (--requeue); SLURM's KillWait / GraceTime must leave time for one step and
# one checkpoint. torchrun forwards TERM to its workers too, and waits
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds for them (30 by default) before killing them.
#
#SBATCH --job-name=fastcog
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --requeue
#SBATCH --signal=B:USR1@300

set -uo pipefail

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
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-240}

stop_requested=0
on_time_limit() {
    stop_requested=1
    echo "time limit near: asking every worker to checkpoint and stop" >&2
    scancel --signal=TERM "$SLURM_JOB_ID"  # every job step, not this batch shell
}
trap on_time_limit USR1

# In the background, so that the trap runs as soon as the signal arrives (bash runs traps only
# between commands).
srun --kill-on-bad-exit=1 torchrun \
    --nnodes "$NODES" \
    --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$HEAD_NODE:$RDZV_PORT" \
    --rdzv-id "$SLURM_JOB_ID" \
    -m fastcog train "$CONFIG" \
    --set parallel.replicate_degree="$NODES" \
    --set checkpoint.resume_from=latest \
    "$@" &
SRUN_PID=$!
status=0
wait "$SRUN_PID" || status=$?
if [ "$stop_requested" = 1 ]; then
    wait "$SRUN_PID" || status=$?  # the first wait returned when the trap ran
    echo "stopped with a checkpoint (status $status): requeueing job $SLURM_JOB_ID to resume" >&2
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$status"
