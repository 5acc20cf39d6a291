#!/usr/bin/env bash
# Train on a SLURM cluster: one process per node, each driving its node's GPUs; jax.distributed finds the
# coordinator and the process ids from SLURM's environment.
#
#   sbatch --nodes=2 launch/slurm.sh CONFIG WORKDIR [--config.key=value ...]
#   e.g. sbatch --nodes=2 launch/slurm.sh configs/stllm_7b.py /shared/runs/stllm_7b --config.mesh=fsdp=16
#
# WORKDIR must be on a filesystem every node sees (checkpoints are written by all processes together), and the
# data and the converted weights must be readable from every node. SLURM sends SIGTERM two minutes before the
# time limit: training saves a checkpoint and exits; with --requeue the job restarts and resumes from it.
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

export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"

srun --kill-on-bad-exit=1 python -m stllm_jax.train --distributed --config "$config" --workdir "$workdir" "$@"
