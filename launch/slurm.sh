#!/usr/bin/env bash
# Train on a SLURM cluster: one process per node, each driving its node's GPUs; jax.distributed finds the
# coordinator and the process ids from SLURM's environment.
#
#   sbatch --nodes=2 launch/slurm.sh CONFIG WORKDIR [--config.key=value ...]
#   e.g. sbatch --nodes=2 launch/slurm.sh configs/stllm_7b.py /shared/runs/stllm_7b --config.mesh=fsdp=16
#
# What this assumes about the cluster:
# - srun starts one task per node (--ntasks-per-node=1) and gives each SLURM_JOB_ID, SLURM_PROCID (the process
#   id), SLURM_NTASKS (the process count), SLURM_LOCALID and SLURM_STEP_NODELIST; each task sees its node's
#   SLURM_GPUS_ON_NODE GPUs (default 8) as devices 0, 1, ...;
# - process 0 runs on the first node of SLURM_STEP_NODELIST, which the other nodes reach by that name, on port
#   61440 + SLURM_JOB_ID % 4096 (or JAX_COORDINATOR_PORT if set), a port that must be free there (jax's rule);
# - WORKDIR is on a filesystem every node sees (checkpoints are written by all processes together), and the data
#   and the converted weights are readable from every node (each process reads its own shards of the weights).
# The exit status is srun's: 0 when every task succeeded; --kill-on-bad-exit ends the other tasks when one fails.
# SLURM sends SIGTERM two minutes before the time limit: training saves a checkpoint and exits; with --requeue
# the job restarts and resumes from it.
#SBATCH --job-name=stllm_jax
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --output=slurm-%j.out
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: sbatch --nodes=N $0 CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"

# jax's SLURM detection shows each process the one GPU numbered SLURM_LOCALID (one process per GPU); here one
# process per node drives all the node's GPUs.
export JAX_LOCAL_DEVICE_IDS=${JAX_LOCAL_DEVICE_IDS:-$(seq -s, 0 $((${SLURM_GPUS_ON_NODE:-8} - 1)))}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"

srun --kill-on-bad-exit=1 python -m stllm_jax.train --distributed --config "$config" --workdir "$workdir" "$@"
