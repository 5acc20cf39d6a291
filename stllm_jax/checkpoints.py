"""Checkpoints on disk, in two kinds.

Model weights (what the converter writes and training starts from, what chat and evaluation read):
    DIR/model.json       the `config.model` the params belong to (their layout: scanned or not, dtypes)
    DIR/params/          an orbax PyTree checkpoint of the (unboxed) param tree; written from sharded arrays
                         (`convert --mesh`) its chunks are the shards, so each host of a job reads only its own
    DIR/tokenizers/      optional: `llm/` and `qformer/` Hugging Face tokenizer directories
    DIR/conversion.json  optional: where the weights came from (source kind and paths), for `convert verify`
    DIR/digests.json     fingerprints of every array (and of model.json), checked on every load
A weights directory may hold part of the model only (`convert hf-llama`: the `llm/` params); `check_complete`
names the missing parts. It is written under a temporary name and renamed when complete, so a directory
with the final name is always whole.
Training runs (`WORKDIR/checkpoints/<step>/`): an orbax CheckpointManager whose every step holds the
train state (step, trainable params, optimizer state, PRNG key) and a JSON item (data-iterator state,
a fingerprint of the frozen params, the config, the exact fingerprints of every saved array and of the
JSON item itself). Saves are atomic: orbax writes to a temporary name and renames when complete, so a
killed run never leaves a half-written step that looks usable.

Damage after the write (a flipped byte, a truncated or missing file) is caught on load by the
fingerprints (`stllm_jax.integrity`): `DamagedCheckpoint` names the step or directory and the array.
Training then falls back to the newest intact step; chat, evaluation and export refuse.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from typing import Any, Callable, Iterator, Mapping

from absl import logging as absl_logging
import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from stllm_jax import integrity, sharding
from stllm_jax import params as params_lib
from stllm_jax.errors import UserError
from stllm_jax.models import stllm

MODEL_JSON = 'model.json'
PARAMS_DIR = 'params'
TOKENIZERS_DIR = 'tokenizers'
CONVERSION_JSON = 'conversion.json'
DIGESTS_JSON = 'digests.json'
INCOMPLETE = '.incomplete-'  # infix of a directory being written
DAMAGED_DIR = 'damaged_checkpoints'  # beside a run's checkpoints/: damaged steps are moved here, not deleted


class DamagedCheckpoint(UserError):
  """A checkpoint or weights directory whose files do not hold what was saved (or cannot be read)."""


def damaged(where: str, problem: str) -> DamagedCheckpoint:
  return DamagedCheckpoint(f'{where} is damaged: {problem}')


def read_error(error: BaseException) -> str:
  """The first line of a read error, without tensorstore's dump of its spec."""
  lines = str(error).strip().splitlines()
  first = lines[0].split('. See full TensorStore details')[0] if lines else ''
  return f'{type(error).__name__}: {first[:300]}'


# ---------------------------------------------------------------------------------------- model weights

def is_weights_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, MODEL_JSON)) and os.path.isdir(os.path.join(path, PARAMS_DIR))


def save_weights(path: str, params: Any, model_config: dict, *, tokenizers: dict[str, Any] | None = None,
                 conversion: dict | None = None, shardings: Any = None,
                 progress: Callable[[Any], Any] = lambda items: items) -> None:
  """Writes a weights directory at `path` (which must not exist), atomically.

  params: the (unboxed) param tree, numpy or jax arrays; numpy leaves are written straight from host memory
    (one chunk per array). With `shardings` (a matching tree of NamedShardings) each leaf is first placed on
    the mesh, replacing it in `params` itself, and written shard by shard (one chunk per shard).
  tokenizers: {'llm' | 'qformer': a Hugging Face tokenizer} saved under tokenizers/.
  conversion: what the weights were converted from (conversion.json).
  """
  if os.path.exists(path):
    raise FileExistsError(f'{path} already exists; choose a new output directory')
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  staging = os.path.join(parent, f'{os.path.basename(os.path.abspath(path))}{INCOMPLETE}{os.getpid()}')
  try:
    os.makedirs(staging)
    for name, tokenizer in (tokenizers or {}).items():
      tokenizer.save_pretrained(os.path.join(staging, TOKENIZERS_DIR, name))
    _write_json(os.path.join(staging, MODEL_JSON), model_config)
    if conversion is not None:
      _write_json(os.path.join(staging, CONVERSION_JSON), conversion)
    if shardings is not None:
      place_in_place(params, shardings, progress)
    with ocp.Checkpointer(_weights_handler()) as checkpointer:
      checkpointer.save(os.path.join(staging, PARAMS_DIR), args=ocp.args.PyTreeSave(params))
    _write_json(os.path.join(staging, DIGESTS_JSON), {'params': integrity.digests(params),
                                                      MODEL_JSON: integrity.json_sha256(model_config)})
    os.rename(staging, path)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


def _weights_handler() -> ocp.PyTreeCheckpointHandler:
  """Orbax's PyTree handler, set up so that saving adds (almost) no host memory to the params themselves:
  numpy leaves are written from their own memory (orbax's default deep-copies every one before writing) and
  without zstd (which buffers a compressed copy; weights hardly compress). Readers need nothing special."""
  registry = ocp.type_handlers.create_type_handler_registry(
      (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
      (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)))
  return ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry)


def _write_json(path: str, value: Any) -> None:
  with open(path, 'w') as f:
    json.dump(value, f, indent=2, sort_keys=True)


def place_in_place(params: dict, shardings: Any, progress: Callable[[Any], Any] = lambda items: items) -> None:
  """Replaces every leaf of the nested dict `params` by a jax array placed with the matching sharding (a
  dropped host leaf is freed at once: the tree never exists twice)."""
  flat_shardings = params_lib.flat(shardings)
  for path in progress(list(params_lib.flat(params))):
    *parents, leaf = path.split('/')
    node = params
    for key in parents:
      node = node[key]
    node[leaf] = jax.device_put(node[leaf], flat_shardings[path])


def conversion_info(path: str) -> dict:
  """conversion.json of a weights directory ({} if it has none)."""
  info_path = os.path.join(path, CONVERSION_JSON)
  if not os.path.isfile(info_path):
    return {}
  with open(info_path) as f:
    return json.load(f)


def read_model_config(path: str) -> dict:
  if not is_weights_dir(path):
    raise FileNotFoundError(f'{path} is not a stllm_jax weights directory (it needs {MODEL_JSON} and {PARAMS_DIR}/); '
                            'produce one with `python -m stllm_jax.convert ...` (see README "Weights")')
  with open(os.path.join(path, MODEL_JSON)) as f:
    return json.load(f)


def load_weights(path: str, abstract_params: Any) -> Any:
  """Restores params into `abstract_params` (ShapeDtypeStructs with shardings: each device reads its shard),
  checked against the directory's fingerprints (DamagedCheckpoint names what differs)."""
  model_config = read_model_config(path)
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      params = checkpointer.restore(os.path.abspath(os.path.join(path, PARAMS_DIR)), abstract_params)
  except Exception as error:  # whatever a damaged file makes orbax / tensorstore raise  # pylint: disable=broad-except
    raise damaged(f'weights directory {path}', f'{PARAMS_DIR}/ cannot be read ({read_error(error)}); '
                   'convert the weights again') from None
  _check_weights_digests(path, model_config, params)
  return params


def _check_weights_digests(path: str, model_config: dict, params: Any) -> None:
  digests_path = os.path.join(path, DIGESTS_JSON)
  if not os.path.isfile(digests_path):
    print(f'warning: {path} has no {DIGESTS_JSON} (written by an older stllm_jax), so its arrays cannot be '
          'checked for damage; convert again to add it', file=sys.stderr)
    return
  try:
    with open(digests_path) as f:
      stored = json.load(f)
    expected_params, expected_model = stored['params'], stored[MODEL_JSON]
  except (OSError, ValueError, KeyError, TypeError) as error:
    raise damaged(f'weights directory {path}', f'{DIGESTS_JSON} cannot be read ({read_error(error)})') from None
  if integrity.json_sha256(model_config) != expected_model:
    raise damaged(f'weights directory {path}', f'{MODEL_JSON} was changed after the weights were written')
  actual = integrity.digests(params)
  changed = integrity.mismatches({k: v for k, v in expected_params.items() if k in actual}, actual)
  if changed:
    raise damaged(f'weights directory {path}', f'{len(changed)} arrays under {PARAMS_DIR}/ differ from what '
                   f'was written (e.g. {", ".join(changed[:3])}); convert the weights again')


def stored_param_metadata(path: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{'a/b/kernel': (shape, dtype)} of a weights directory, read from its metadata (no tensor is loaded)."""
  read_model_config(path)
  with ocp.StandardCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(os.path.abspath(os.path.join(path, PARAMS_DIR)))
  tree = getattr(metadata, 'item_metadata', metadata)
  tree = getattr(tree, 'tree', tree)
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, 'shape'))[0]
  return {'/'.join(str(getattr(k, 'key', k)) for k in path_): (tuple(leaf.shape), np.dtype(leaf.dtype))
          for path_, leaf in leaves}


def stored_param_shapes(path: str) -> dict[str, tuple[int, ...]]:
  """{'a/b/kernel': shape} of a weights directory, read from its metadata (no tensor is loaded)."""
  return {k: shape for k, (shape, _) in stored_param_metadata(path).items()}


def load_stored_params(path: str, mesh: jax.sharding.Mesh | None = None) -> Any:
  """Whatever params a weights directory holds (the whole model or a part), as stored, replicated on `mesh`."""
  mesh = mesh or sharding.make_mesh('fsdp=1')
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)
              for k, (shape, dtype) in stored_param_metadata(path).items()}
  return load_weights(path, params_lib.nested(abstract))


def check_complete(path: str, model_config: Any) -> None:
  """Raises a UserError naming what a weights directory lacks, has in excess or holds mis-shaped for the
  model of its own model config."""
  stored, expected = stored_param_shapes(path), model_param_shapes(model_config)
  missing = sorted(set(expected) - set(stored))
  extra = sorted(set(stored) - set(expected))
  misshaped = sorted(f'{k} {list(stored[k])} vs {list(expected[k])}'
                     for k in set(stored) & set(expected) if stored[k] != expected[k])
  if missing or extra or misshaped:
    problems = []
    if missing:
      problems.append(f'it lacks {len(missing)} params (of {", ".join(sorted({p.split("/")[0] for p in missing}))})')
    if extra:
      problems.append(f'{len(extra)} of its params are not in the model (e.g. {", ".join(extra[:3])})')
    if misshaped:
      problems.append(f'{len(misshaped)} are mis-shaped (e.g. {misshaped[0]})')
    raise UserError(f'{path} does not hold the model its {MODEL_JSON} describes: {"; ".join(problems)}. '
                    '(A `convert hf-llama` directory holds the LLM only.)')


def model_param_shapes(model_config: Any) -> dict[str, tuple[int, ...]]:
  """{'a/b/kernel': shape} of every param of the model `model_config` (nothing is allocated)."""
  params = flax.linen.meta.unbox(stllm.abstract_variables(model_config))['params']
  return {k: tuple(v.shape) for k, v in params_lib.flat(params).items()}


# ---------------------------------------------------------------------------------------- training runs

class RunCheckpoints:
  """Save / find / restore / set aside the checkpoints of one training run in `workdir/checkpoints`."""

  def __init__(self, workdir: str, max_to_keep: int = 3):
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True)
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self.damaged_directory = os.path.abspath(os.path.join(workdir, DAMAGED_DIR))
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=('state', 'extra'))

  def latest_step(self, reload: bool = False) -> int | None:
    """The newest complete step (`reload`: as on disk now, e.g. after a failed save)."""
    if reload:
      self.manager.reload()
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, extra: dict) -> None:
    """Starts an asynchronous save (the next save, `wait` or `close` waits for it). `extra` (JSON) gains the
    fingerprints of every array of `state` and of itself, which `restore` checks."""
    extra = json.loads(json.dumps(dict(extra, digests=integrity.digests(state))))  # as it will read back
    extra['sha256'] = integrity.json_sha256(extra)
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    extra=ocp.args.JsonSave(extra)), force=True)

  def restore(self, step: int, like_state: Any) -> tuple[Any, dict]:
    """Restores step `step` with the shapes, dtypes and shardings of `like_state`; DamagedCheckpoint if a file
    cannot be read or does not hold what was saved."""
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)), like_state)
    where = f'checkpoint step {step} in {self.directory}'
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                    extra=ocp.args.JsonRestore()))
    except Exception as error:  # whatever a damaged file makes orbax / tensorstore raise  # pylint: disable=broad-except
      raise damaged(where, f'it cannot be read ({read_error(error)})') from None
    check_run_digests(where, restored.extra, restored.state)
    return restored.state, restored.extra

  def set_aside(self, step: int) -> str:
    """Moves a damaged step out of the run (into workdir/damaged_checkpoints/), so it is neither resumed
    from nor overwritten; returns where it went."""
    os.makedirs(self.damaged_directory, exist_ok=True)
    target = os.path.join(self.damaged_directory, str(step))
    suffix = 1
    while os.path.exists(target):
      target, suffix = os.path.join(self.damaged_directory, f'{step}.{suffix}'), suffix + 1
    os.rename(os.path.join(self.directory, str(step)), target)
    self.manager.reload()
    return target

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def check_run_digests(where: str, extra: Any, state: Any, only: str = '') -> None:
  """DamagedCheckpoint unless the JSON item `extra` and every array of `state` (whose paths start with `only`)
  match the fingerprints saved with them. A step written before fingerprints existed is let through with a
  warning."""
  if not isinstance(extra, dict):
    raise damaged(where, 'its JSON item is not an object')
  if 'sha256' not in extra and 'digests' not in extra:
    print(f'warning: {where} has no fingerprints (written by an older stllm_jax); its arrays cannot be checked '
          'for damage', file=sys.stderr)
    return
  saved_sha = extra.get('sha256')
  if saved_sha != integrity.json_sha256({k: v for k, v in extra.items() if k != 'sha256'}):
    raise damaged(where, 'its JSON item (data-iterator state, config, fingerprints) was changed after the save')
  actual = integrity.digests(state)
  expected = {k: v for k, v in extra['digests'].items() if k.startswith(only)}
  changed = integrity.mismatches(expected, actual)
  if changed:
    raise damaged(where, f'{len(changed)} arrays differ from what was saved (e.g. {", ".join(changed[:3])})')


def checksums(tree: Any) -> dict[str, list[float]]:
  """{path: [sum, sum of squares]} per leaf, computed on the devices (works for sharded, multi-host params).

  Stored with a run so that a resumed run can check it has the same frozen weights it started with.
  """
  sums = _sums_and_squares(tree)
  return {jax.tree_util.keystr(path): [float(v) for v in np.asarray(value)]
          for path, value in jax.tree_util.tree_flatten_with_path(sums)[0]}


@jax.jit
def _sums_and_squares(tree: Any) -> Any:
  as_f32 = lambda x: x.astype(jnp.float32)
  return jax.tree_util.tree_map(lambda x: jnp.stack([jnp.sum(as_f32(x)), jnp.sum(jnp.square(as_f32(x)))]), tree)


def checksum_mismatches(expected: dict[str, list[float]], actual: dict[str, list[float]],
                        rtol: float = 1e-4) -> list[str]:
  """Paths whose checksums differ (beyond summation-order noise), or that only one side has."""
  paths = sorted(set(expected) | set(actual))
  return [p for p in paths if p not in expected or p not in actual
          or not np.allclose(expected[p], actual[p], rtol=rtol, atol=1e-6)]


@contextlib.contextmanager
def _orbax_quiet() -> Iterator[None]:
  """Hides orbax's warning that a checkpoint opened read-only is read-only (it is meant to be)."""
  previous = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    yield
  finally:
    absl_logging.set_verbosity(previous)


def restore_run_params(workdir: str, step: int, extra: Mapping[str, Any], target: Any) -> Any:
  """The trainable params saved at `step` of the run in `workdir` (target: their abstract arrays, placed),
  checked against the step's fingerprints."""
  run_dir = os.path.abspath(os.path.join(workdir, 'checkpoints'))
  where = f'checkpoint step {step} in {run_dir}'
  try:
    with ocp.PyTreeCheckpointer() as checkpointer:
      restored = checkpointer.restore(
          os.path.join(run_dir, str(step), 'state'),
          args=ocp.args.PyTreeRestore(item={'params': target}, partial_restore=True,
                                      restore_args=ocp.checkpoint_utils.construct_restore_args({'params': target})))
  except Exception as error:  # whatever a damaged file makes orbax / tensorstore raise  # pylint: disable=broad-except
    raise damaged(where, f'its params cannot be read ({read_error(error)})') from None
  check_run_digests(where, extra, {'params': restored['params']}, only='params/')
  return restored['params']


def latest_run_extra(workdir: str) -> tuple[int, dict] | None:
  """(the newest step of the training run in `workdir`, that step's JSON item: config, origin, fingerprints); None
  where the workdir has no checkpoint. DamagedCheckpoint if the JSON item cannot be read."""
  run_dir = os.path.abspath(os.path.join(workdir, 'checkpoints'))
  if not os.path.isdir(run_dir):  # checked first: opening a manager would create the directory
    return None
  options = ocp.CheckpointManagerOptions(create=False, read_only=True, save_interval_steps=0)
  with _orbax_quiet(), ocp.CheckpointManager(run_dir, options=options, item_names=('state', 'extra')) as manager:
    latest = manager.latest_step()
    if latest is None:
      return None
    try:
      return latest, manager.restore(latest, args=ocp.args.Composite(extra=ocp.args.JsonRestore())).extra
    except Exception as error:  # a damaged JSON item  # pylint: disable=broad-except
      raise damaged(f'checkpoint step {latest} in {run_dir}',
                     f'its JSON item cannot be read ({read_error(error)})') from None


def run_origin(workdir: str) -> dict[str, str]:
  """Where a run's relative config paths (init.checkpoint, tokenizers) were relative to: saved with it."""
  return {'cwd': os.path.abspath(os.getcwd()), 'workdir': os.path.abspath(workdir)}


def resolve_run_path(path: str, origin: Mapping[str, str], workdir: str) -> str:
  """A path from a run's saved config, usable from any directory: an absolute path as it is; a relative one
  against the directory the run was started from, or, for one inside the run's workdir (the demo's towers),
  inside `workdir` wherever it is now. '' stays ''."""
  if not path or os.path.isabs(path):
    return path
  started_in, old_workdir = origin.get('cwd', os.getcwd()), origin.get('workdir', '')
  candidates = [os.path.join(started_in, path)]
  if old_workdir:
    inside = os.path.relpath(os.path.join(started_in, path), old_workdir)
    if not inside.startswith(os.pardir):
      candidates.append(os.path.join(os.path.abspath(workdir), inside))
  candidates.append(os.path.abspath(path))
  return next((c for c in candidates if os.path.exists(c)), candidates[0])
