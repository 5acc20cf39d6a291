"""The weights a model runs with: the params a training run starts from (`initial_params`) and the model that
chat, evaluation and export load (`load_model`) from a weights directory or a training workdir. Reading and
writing the files themselves, and checking them, is `checkpoints`' business."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, NamedTuple

import flax
import jax
import ml_collections

from stllm_jax import checkpoints, sharding
from stllm_jax import params as params_lib
from stllm_jax.errors import UserError
from stllm_jax.models import bt_adapter, stllm


def initial_params(config: Any, model_cfg: stllm.STLLMConfig, shardings: Any,
                   log: Callable[[str], None] = lambda message: None) -> Any:
  """The params a run starts from, placed with `shardings`: random (seeded) or `config.init.checkpoint`
  (strictly: every stored leaf used, every model leaf filled, except fresh `config.init.new_params`). From a
  checkpoint only the leaves it lacks are initialised: a 7B model's random LLM is never made just to be replaced."""
  programs = _placed_programs(model_cfg, sharding.cache_key(shardings))
  key = jax.random.key(config.seed)
  path = config.init.checkpoint
  if not path:
    log(f'random initial weights (seed {config.seed})')
    return _with_adapter_from_vit(programs.init(key), model_cfg, shardings, config.seed, log)
  stored = checkpoints.stored_param_shapes(path)
  flat_abstract = params_lib.flat(flax.linen.meta.unbox(stllm.abstract_variables(model_cfg))['params'])
  expected = {k: tuple(v.shape) for k, v in flat_abstract.items()}
  unknown = sorted(set(stored) - set(expected))
  misshaped = sorted(f'{k} {list(stored[k])} vs model {list(expected[k])}'
                     for k in set(stored) & set(expected) if stored[k] != expected[k])
  absent = sorted(set(expected) - set(stored))
  not_new = [k for k in absent if not params_lib.is_frozen(k, tuple(config.init.new_params))]
  if unknown or misshaped or not_new:
    lines = [f'{path} does not fit config.model:']
    for title, items in (('in the checkpoint, not in the model', unknown), ('mis-shaped', misshaped),
                         ('in the model, not in the checkpoint (and not in init.new_params)', not_new)):
      if items:
        lines.append(f'  {title}: {len(items)}, e.g. ' + ', '.join(items[:5]))
    raise UserError('\n'.join(lines))
  flat_shardings = params_lib.flat(shardings)
  target = params_lib.nested(
      {k: jax.ShapeDtypeStruct(flat_abstract[k].shape, flat_abstract[k].dtype, sharding=flat_shardings[k])
       for k in stored})
  loaded = params_lib.flat(checkpoints.load_weights(path, target))
  log(f'initial weights from {path}' + (f'; newly initialised: {", ".join(sorted({k.split("/")[0] for k in absent}))}'
                                        if absent else ''))
  fresh = _fresh_leaves(model_cfg, sharding.cache_key(shardings), tuple(absent))(key) if absent else {}
  params = params_lib.nested({**loaded, **fresh})
  if any(k.startswith(f'{ADAPTER}/') for k in stored):
    return params
  return _with_adapter_from_vit(params, model_cfg, shardings, config.seed, log)


@functools.lru_cache(maxsize=8)
def _fresh_leaves(model_cfg: stllm.STLLMConfig, shardings_key: Any, names: tuple[str, ...]) -> Callable:
  """key -> {name: leaf} of the seeded initialisation, only the leaves named: the same values as the whole
  model's init (each leaf's random stream depends on its path alone), and XLA computes nothing else."""
  flat_shardings = params_lib.flat(sharding.from_cache_key(shardings_key))
  return jax.jit(lambda key: {k: params_lib.flat(stllm.init_params(model_cfg, key))[k] for k in names},
                 out_shardings={k: flat_shardings[k] for k in names})


ADAPTER = 'bt_adapter'


def _with_adapter_from_vit(params: Any, model_cfg: stllm.STLLMConfig, shardings: Any, seed: int,
                           log: Callable[[str], None]) -> Any:
  """`params` with the BT-Adapter started as the released code starts it (spatial layers copied from the ViT's
  last blocks, see `bt_adapter.init_from_vit`); unchanged for a model without one."""
  depth = model_cfg.vision.bt_adapter.depth
  if not depth:
    return params
  first = model_cfg.vision.depth - depth
  log(f'BT-Adapter started from ViT blocks {first}-{model_cfg.vision.depth - 1} (spatial layers), zero temporal '
      'output and CLS, N(0, 1) frame positions, as the released code starts it')
  start = _placed_programs(model_cfg, sharding.cache_key(shardings)).adapter_from_vit
  return start(params, jax.random.fold_in(jax.random.key(seed), 0x42544144))


class _PlacedPrograms(NamedTuple):
  init: Callable  # key -> fresh params
  adapter_from_vit: Callable  # (params, key) -> params with the BT-Adapter started from the ViT (params donated)


@functools.lru_cache(maxsize=8)
def _placed_programs(model_cfg: stllm.STLLMConfig, shardings_key: Any) -> _PlacedPrograms:
  """The jitted programs that make a model config's starting params on these shardings, built once per process (a
  second run of the same model in one process traces nothing again)."""
  shardings = sharding.from_cache_key(shardings_key)
  return _PlacedPrograms(
      init=jax.jit(functools.partial(stllm.init_params, model_cfg), out_shardings=shardings),
      adapter_from_vit=jax.jit(lambda p, key: bt_adapter.init_from_vit(p, model_cfg, key), out_shardings=shardings,
                               donate_argnums=0))


@dataclasses.dataclass
class LoadedModel:
  model_config: ml_collections.ConfigDict  # config.model
  params: Any  # the full param tree, placed on the mesh
  llm_tokenizer: str  # local tokenizer directories ('' if the source names none)
  qformer_tokenizer: str
  description: str  # what was loaded, for messages


def load_model(path: str, mesh: jax.sharding.Mesh | None = None) -> LoadedModel:
  """A model for inference from either a weights directory (`convert` output) or a training workdir (its
  latest checkpoint; frozen parts come from the run's `init.checkpoint` or its seeded initialisation)."""
  mesh = mesh or sharding.make_mesh('fsdp=1')
  if checkpoints.is_weights_dir(path):
    model = ml_collections.ConfigDict(checkpoints.read_model_config(path))
    checkpoints.check_complete(path, model)
    shardings = sharding.param_shardings(stllm.abstract_variables(model), mesh)
    abstract = jax.tree_util.tree_map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
                                      flax.linen.meta.unbox(stllm.abstract_variables(model))['params'], shardings)
    tokenizers = os.path.join(path, checkpoints.TOKENIZERS_DIR)
    tok = lambda name: os.path.join(tokenizers, name) if os.path.isdir(os.path.join(tokenizers, name)) else ''
    return LoadedModel(model, checkpoints.load_weights(path, abstract), tok('llm'), tok('qformer'),
                       f'weights {path}')
  run_dir = os.path.join(path, 'checkpoints')
  found = checkpoints.latest_run_extra(path)
  if found is None:
    raise UserError(f'{path} is neither a weights directory (with {checkpoints.MODEL_JSON} and '
                    f'{checkpoints.PARAMS_DIR}/) nor a training workdir with a checkpoint (in {run_dir}/)')
  latest, extra = found
  where = f'checkpoint step {latest} in {os.path.abspath(run_dir)}'
  try:
    config = ml_collections.ConfigDict(extra['config'])
  except Exception as error:  # a damaged JSON item  # pylint: disable=broad-except
    raise checkpoints.damaged(where, f'its JSON item cannot be read ({checkpoints.read_error(error)})') from None
  resolve = functools.partial(checkpoints.resolve_run_path, origin=extra.get('origin', {}), workdir=path)
  config.init.checkpoint = resolve(config.init.checkpoint)
  if config.init.checkpoint and not os.path.isdir(config.init.checkpoint):
    raise UserError(f'the run in {path} started from the weights {config.init.checkpoint} (config.init.checkpoint), '
                    'which are no longer there; its frozen towers come from them')
  model_cfg = stllm.model_config(config.model)
  shardings = sharding.param_shardings(stllm.abstract_variables(model_cfg), mesh)
  params = initial_params(config, model_cfg, shardings)
  trainable, frozen = params_lib.split_params(params, tuple(config.train.frozen))
  frozen_now = checkpoints.checksums(frozen)
  changed = checkpoints.checksum_mismatches(extra.get('frozen_checksums', frozen_now), frozen_now)
  if changed:
    raise UserError(f'the frozen weights {config.init.checkpoint or "(seeded initialisation)"} differ from those the '
                    f'run in {path} was trained with ({len(changed)} params, e.g. {changed[0]})')
  target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), trainable)
  params = params_lib.merge_params(checkpoints.restore_run_params(path, latest, extra, target), frozen)
  data = config.get('data', {})
  return LoadedModel(config.model, params, resolve(data.get('llm_tokenizer', '')),
                     resolve(data.get('qformer_tokenizer', '')), f'step {latest} of the run in {path}')
