#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: the same command runs on every host of the slice; jax.distributed finds the
# other hosts through the TPU metadata.
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh CONFIG WORKDIR [--config.key=value ...]
#
# What this assumes about the slice:
# - `gcloud compute tpus tpu-vm ssh --worker=all` reaches every host, runs the command in the home directory, and
#   fails (non-zero status, which this script returns) when the command fails on a host;
# - the repository is checked out as ~/stllm_jax on every host, with its requirements (jax[tpu] instead of the
#   CPU jax line of requirements.txt), e.g.
#     gcloud compute tpus tpu-vm ssh $TPU_NAME --zone $ZONE --worker=all --command \
#       "git clone REPO stllm_jax && cd stllm_jax && pip install -r requirements.txt 'jax[tpu]==0.10.2'"
# - WORKDIR, the data and the converted weights are on storage every host sees (a shared mount).
# Elsewhere (no TPU metadata) the same command runs with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
# JAX_PROCESS_ID set on each host (tests/test_multiprocess.py does this).
set -euo pipefail
if [ $# -lt 2 ] || [ -z "${TPU_NAME:-}" ] || [ -z "${ZONE:-}" ]; then
  echo "usage: TPU_NAME=NAME ZONE=ZONE $0 CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
args=$(printf ' %q' --config "$config" --workdir "$workdir" "$@")  # quoted for the hosts' shell
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
  "cd stllm_jax && python -m stllm_jax.train --distributed$args"
