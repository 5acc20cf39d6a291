"""Checkpoints on disk, in two kinds.

Model weights (what the converter writes and training starts from, what chat and evaluation read):
    DIR/model.json    the `config.model` the params belong to
    DIR/params/       an orbax PyTree checkpoint of the (unboxed) param tree
    DIR/tokenizers/   optional: `llm/` and `qformer/` Hugging Face tokenizer directories
Training runs (`WORKDIR/checkpoints/<step>/`): an orbax CheckpointManager whose every step holds the
train state (step, trainable params, optimizer state, PRNG key) and a JSON item (data-iterator state,
a fingerprint of the frozen params, the config). Saves are atomic: orbax writes to a temporary name and
renames when complete, so a killed run never leaves a half-written step that looks usable.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

MODEL_JSON = 'model.json'
PARAMS_DIR = 'params'


# ---------------------------------------------------------------------------------------- model weights

def is_weights_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, MODEL_JSON)) and os.path.isdir(os.path.join(path, PARAMS_DIR))


def save_weights(path: str, params: Any, model_config: dict) -> None:
  """Writes `params` and the model config they belong to under `path` (which must not exist)."""
  if os.path.exists(path):
    raise FileExistsError(f'{path} already exists; choose a new output directory')
  os.makedirs(path)
  with open(os.path.join(path, MODEL_JSON), 'w') as f:
    json.dump(model_config, f, indent=2, sort_keys=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.abspath(os.path.join(path, PARAMS_DIR)), params)


def read_model_config(path: str) -> dict:
  if not is_weights_dir(path):
    raise FileNotFoundError(f'{path} is not a stllm_jax weights directory (it needs {MODEL_JSON} and {PARAMS_DIR}/); '
                            'produce one with `python -m stllm_jax.convert ...` (see README "Weights")')
  with open(os.path.join(path, MODEL_JSON)) as f:
    return json.load(f)


def load_weights(path: str, abstract_params: Any) -> Any:
  """Restores params into `abstract_params` (ShapeDtypeStructs with shardings: each device reads its shard)."""
  read_model_config(path)
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(os.path.abspath(os.path.join(path, PARAMS_DIR)), abstract_params)


def stored_param_shapes(path: str) -> dict[str, tuple[int, ...]]:
  """{'a/b/kernel': shape} of a weights directory, read from its metadata (no tensor is loaded)."""
  read_model_config(path)
  with ocp.StandardCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(os.path.abspath(os.path.join(path, PARAMS_DIR)))
  tree = getattr(metadata, 'item_metadata', metadata)
  tree = getattr(tree, 'tree', tree)
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, 'shape'))[0]
  return {'/'.join(str(getattr(k, 'key', k)) for k in path_): tuple(leaf.shape) for path_, leaf in leaves}


# ---------------------------------------------------------------------------------------- training runs

class RunCheckpoints:
  """Save / find / restore the checkpoints of one training run in `workdir/checkpoints`."""

  def __init__(self, workdir: str, max_to_keep: int = 3):
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True)
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=('state', 'extra'))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, extra: dict) -> None:
    """Starts an asynchronous save (the next save, `wait` or `close` waits for it)."""
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    extra=ocp.args.JsonSave(extra)), force=True)

  def restore(self, step: int, like_state: Any) -> tuple[Any, dict]:
    """Restores step `step` with the shapes, dtypes and shardings of `like_state`."""
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)), like_state)
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                  extra=ocp.args.JsonRestore()))
    return restored.state, restored.extra

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def checksums(tree: Any) -> dict[str, list[float]]:
  """{path: [sum, sum of squares]} per leaf, computed on the devices (works for sharded, multi-host params).

  Stored with a run so that a resumed run can check it has the same frozen weights it started with.
  """
  sums = jax.jit(lambda t: jax.tree_util.tree_map(
      lambda x: jnp.stack([jnp.sum(x.astype(jnp.float32)), jnp.sum(jnp.square(x.astype(jnp.float32)))]), t))(tree)
  return {jax.tree_util.keystr(path): [float(v) for v in np.asarray(value)]
          for path, value in jax.tree_util.tree_flatten_with_path(sums)[0]}


def checksum_mismatches(expected: dict[str, list[float]], actual: dict[str, list[float]],
                        rtol: float = 1e-4) -> list[str]:
  """Paths whose checksums differ (beyond summation-order noise), or that only one side has."""
  paths = sorted(set(expected) | set(actual))
  return [p for p in paths if p not in expected or p not in actual
          or not np.allclose(expected[p], actual[p], rtol=rtol, atol=1e-6)]
