#!/usr/bin/env bash
# Train on one GPU node: a single process drives every local GPU (the mesh spans them all).
#
#   launch/gpu_node.sh CONFIG WORKDIR [--config.key=value ...]
#   e.g. launch/gpu_node.sh configs/stllm_7b.py runs/stllm_7b --config.mesh=fsdp=8
#
# A run that stops abnormally (crash, SIGTERM from a scheduler) is restarted up to MAX_RESTARTS times; every
# restart resumes from the latest checkpoint in WORKDIR. A configuration error (exit status 2) is not retried.
set -uo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
cd "$(dirname "$0")/.."

# Let XLA take most of the GPU memory up front, and overlap collectives with compute.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"

max_restarts=${MAX_RESTARTS:-3}
for attempt in $(seq 0 "$max_restarts"); do
  python -m stllm_jax.train --config "$config" --workdir "$workdir" "$@"
  status=$?
  if [ "$status" -eq 0 ] || [ "$status" -eq 2 ]; then
    exit "$status"
  fi
  echo "training exited with status $status (attempt $attempt of $max_restarts restarts); resuming" >&2
done
exit "$status"
