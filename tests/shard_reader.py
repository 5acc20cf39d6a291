"""One process of a multi-process job that loads a weights directory over a mesh spanning all processes' devices.

    JAX_COORDINATOR_ADDRESS=... JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i python tests/shard_reader.py WEIGHTS MESH OUT

Prints one JSON line: the bytes this process read from files (/proc/self/io rchar) while loading the weights
sharded over MESH, and while loading all of them (replicated) for comparison; writes this process's shards of
every array to OUT/process_<i>.npz ('path|start:stop,...' -> the shard), for the caller to check.
"""

import json
import os
import sys

import flax
import jax
import numpy as np

from stllm_jax import checkpoints, loading, sharding, train


def bytes_read() -> int:
  with open('/proc/self/io') as f:
    return int(next(line for line in f if line.startswith('rchar:')).split()[1])


def measured(load):
  before = bytes_read()
  value = load()
  jax.block_until_ready(value)
  return value, bytes_read() - before


def shard_key(path: str, index: tuple) -> str:
  return path + '|' + ','.join(f'{s.start or 0}:{"" if s.stop is None else s.stop}' for s in index)


def main(weights: str, mesh_spec: str, out: str) -> None:
  train.initialize_distributed()
  mesh = sharding.make_mesh(mesh_spec)
  loading.load_model(weights, mesh)  # once first: imports and compilations are not counted below
  loaded, sharded = measured(lambda: loading.load_model(weights, mesh).params)
  _, whole = measured(lambda: checkpoints.load_stored_params(weights, mesh))
  shards = {shard_key(path, shard.index): np.asarray(shard.data)
            for path, leaf in flax.traverse_util.flatten_dict(loaded, sep='/').items()
            for shard in leaf.addressable_shards}
  np.savez(os.path.join(out, f'process_{jax.process_index()}.npz'), **shards)
  print(json.dumps({'process': jax.process_index(), 'sharded_bytes_read': sharded, 'whole_bytes_read': whole}),
        flush=True)


if __name__ == '__main__':
  main(*sys.argv[1:])
