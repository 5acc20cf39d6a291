"""The four kinds of PyTorch weights users bring, and their conversion into a weights directory.

Each `prepare_*` function inspects a source without loading its tensors and returns a `Prepared`: the
`config.model` of the output, the source's tensors (read later, one at a time), the name rules, the
tokenizers and notes for the user. `convert` then assembles the params strictly (`strict.load_strict`:
every source tensor used once, every parameter filled) and writes the weights directory atomically.

  hf-instructblip DIR   `InstructBlipForConditionalGeneration` (architecture from config.json; tokenizers
                        from DIR and DIR/qformer_tokenizer)
  lavis                 eva_vit_g.pth + instruct_blip_vicuna7b_trimmed.pth + a Vicuna directory: the paper's
                        starting point (EVA block 39 dropped, a [PAD] row added to the vocabulary)
  stllm DIR             a released ST-LLM checkpoint (LLaMA config.json, sharded .bin); its heads decide
                        the model: down_proj/up_proj -> global-local input, mvm_decoder -> MVM head,
                        visual_encoder.BTAdapter_* (the QA checkpoint) -> the BT-Adapter, its depth and
                        frame count from the checkpoint.
  hf-llama DIR          a LLaMA/Vicuna directory: the LLM alone (a weights directory with `llm/` only)
The vision tower and Q-Former of LAVIS and ST-LLM sources have no config of their own: their architecture is
the base config's (the 7B model unless `--config` says otherwise), and strict loading checks every shape.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import flax
import jax
import ml_collections

from stllm_jax import checkpoints, configlib, sharding
from stllm_jax.convert import hf, mappings, strict
from stllm_jax.convert.strict import Rule
from stllm_jax.convert.tensor_files import TensorFile, TensorSet, format_bytes, format_count, hf_directory_files
from stllm_jax.data import conversation
from stllm_jax.data.errors import DataError
from stllm_jax.errors import UserError
from stllm_jax.models import llama, stllm

KINDS = ('hf-instructblip', 'lavis', 'stllm', 'hf-llama')
DTYPES = ('float32', 'bfloat16')
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer.model', 'vocab.txt')
QFORMER_TOKENIZER_SUBDIR = 'qformer_tokenizer'  # where Hugging Face's InstructBlipProcessor keeps it
# config.json model_type -> the source kind that reads such a directory
KIND_OF_MODEL_TYPE = {'instructblip': 'hf-instructblip', 'st_llm_hf': 'stllm', 'llama': 'hf-llama'}


@dataclasses.dataclass
class Prepared:
  kind: str
  model_config: ml_collections.ConfigDict  # config.model of the output
  tensors: TensorSet
  rules: list[Rule]
  tokenizer_dirs: dict[str, str]  # 'llm' / 'qformer' -> a tokenizer directory
  notes: list[str]  # what the conversion does beyond renaming, for the user
  provenance: dict  # conversion.json
  llm_only: bool = False


# ---------------------------------------------------------------------------------------------- inspection

def require_dir(path: str, what: str) -> str:
  if not os.path.exists(path):
    raise UserError(f'{what} {path!r} does not exist')
  if not os.path.isdir(path):
    raise UserError(f'{what} {path!r} is a file; it should be a directory')
  return os.path.abspath(path)


def require_file(path: str, what: str) -> str:
  if not os.path.exists(path):
    raise UserError(f'{what} {path!r} does not exist')
  if os.path.isdir(path):
    raise UserError(f'{what} {path!r} is a directory; it should be a file')
  return os.path.abspath(path)


def read_hf_config(directory: str) -> dict:
  path = os.path.join(directory, 'config.json')
  if not os.path.isfile(path):
    raise UserError(f'{directory} has no config.json; it is not a Hugging Face model directory')
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as err:
    raise UserError(f'{path} is not valid JSON: {err}') from None


def detect_kind(directory: str) -> str | None:
  """The source kind of a model directory from its config.json `model_type` (None if unknown)."""
  if not os.path.isfile(os.path.join(directory, 'config.json')):
    return None
  return KIND_OF_MODEL_TYPE.get(read_hf_config(directory).get('model_type'))


def require_kind(directory: str, config: dict, kind: str, what: str) -> None:
  model_type = config.get('model_type')
  if KIND_OF_MODEL_TYPE.get(model_type) != kind:
    other = KIND_OF_MODEL_TYPE.get(model_type)
    hint = f'; convert it with `python -m stllm_jax.convert {other} {directory}`' if other else ''
    raise UserError(f'{directory} holds a {model_type!r} model (config.json model_type), not {what}{hint}')


def has_tokenizer(directory: str) -> bool:
  return bool(directory) and any(os.path.isfile(os.path.join(directory, f)) for f in TOKENIZER_FILES)


def _llm_config(config: dict, base: ml_collections.ConfigDict, directory: str) -> ml_collections.ConfigDict:
  try:
    return hf.llm_config_from_hf(config, base)
  except ValueError as err:
    raise UserError(f'{directory}: {err}') from None


def new_vocab_rows(llm_dir: str, vocab_size: int) -> int:
  """Rows the LLM's embedding needs for its tokenizer with ST-LLM's `[PAD]` (0 or 1; anything else is an error)."""
  needed = len(load_tokenizer('llm', llm_dir))
  if needed > vocab_size + 1:
    raise UserError(f'the tokenizer of {llm_dir} has {needed} tokens with [PAD] but the embedding has {vocab_size} '
                    'rows; only the [PAD] row is ever added, so this tokenizer does not belong to these weights')
  return max(needed - vocab_size, 0)


def load_tokenizer(which: str, directory: str):
  try:
    return conversation.load_llm_tokenizer(directory) if which == 'llm' else \
        conversation.load_qformer_tokenizer(directory)
  except DataError as err:
    raise UserError(f'{which} tokenizer: {err}') from None


def _base(base: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict((base if base is not None else stllm.default_config()).to_dict())
  # A conversion writes exactly what the source holds: no LoRA, and the heads and the BT-Adapter only if the
  # source has them.
  cfg.llm.lora_rank = 0
  cfg.video_input, cfg.mvm_head = 'all', False
  cfg.vision.bt_adapter.depth = 0
  return cfg


# ------------------------------------------------------------------------------------------------ sources

def prepare_hf_instructblip(directory: str, base: ml_collections.ConfigDict | None = None,
                            llm_tokenizer: str = '', qformer_tokenizer: str = '') -> Prepared:
  directory = require_dir(directory, 'the InstructBLIP directory')
  config = read_hf_config(directory)
  require_kind(directory, config, 'hf-instructblip', 'an InstructBlipForConditionalGeneration')
  try:
    cfg = hf.model_config_from_hf_instructblip(config, _base(base))
  except (ValueError, KeyError) as err:
    raise UserError(f'{directory}/config.json: {err}') from None
  rules = mappings.hf_instructblip_rules(hf.rope_inv_freq_check(cfg.llm))
  if cfg.llm.tie_word_embeddings:
    rules.insert(0, (r'language_model\.lm_head\.weight', mappings.SameAs('llm/embed/embedding')))
  qformer_dir = os.path.join(directory, QFORMER_TOKENIZER_SUBDIR)
  tokenizers = {'llm': llm_tokenizer or (directory if has_tokenizer(directory) else ''),
                'qformer': qformer_tokenizer or (qformer_dir if has_tokenizer(qformer_dir) else '')}
  tensors = TensorSet(hf_directory_files(directory), directory)
  notes = k_bias_notes(mappings.k_bias_maxima(tensors.matching(mappings.HF_QKV_BIAS)), cfg.vision.depth)
  return Prepared('hf-instructblip', cfg, tensors, rules, tokenizers, notes,
                  {'kind': 'hf-instructblip', 'source': directory})


def k_bias_notes(maxima: dict[int, float], depth: int) -> list[str]:
  """The note on the non-zero k biases `mappings.FusedQVBias` drops ({ViT layer: max |k bias|}; none: [])."""
  if not maxima:
    return []
  layers = ', '.join(str(layer) for layer in sorted(maxima))
  return [f'the k third of vision_model.encoder.layers.N.self_attn.qkv.bias is not zero in {len(maxima)} of {depth} '
          f'layers (N = {layers}; max |k| {max(maxima.values()):.3g}): dropped, exactly (a k bias adds q . k_bias to '
          'every score of a query row, which softmax cancels); the q and v thirds fill '
          'vision/blocks/layers_N/attn/q_bias and v_bias']


def prepare_lavis(vit: str, instructblip: str, llm: str, base: ml_collections.ConfigDict | None = None,
                  qformer_tokenizer: str = '', trust_pickle: bool = False) -> Prepared:
  vit = require_file(vit, '--vit (eva_vit_g.pth)')
  instructblip = require_file(instructblip, '--instructblip (instruct_blip_vicuna7b_trimmed.pth)')
  llm = require_dir(llm, '--llm (the Vicuna directory)')
  config = read_hf_config(llm)
  require_kind(llm, config, 'hf-llama', 'a LLaMA/Vicuna model')
  if not has_tokenizer(llm):
    raise UserError(f'{llm} has no tokenizer; the lavis conversion needs Vicuna\'s tokenizer to add [PAD]')
  cfg = _base(base)
  cfg.llm = _llm_config(config, cfg.llm, llm)
  rows = new_vocab_rows(llm, cfg.llm.vocab_size)
  cfg.llm.vocab_size += rows
  cfg.ln_vision_eps = 1e-5  # LAVIS's ln_vision is a plain torch LayerNorm
  vit_file = TensorFile(vit, prefix='visual_encoder.', key='model', trusted=trust_pickle)
  blip_file = TensorFile(instructblip, key='model', trusted=trust_pickle)
  _require_names(vit_file, 'visual_encoder.cls_token', '--vit', 'EVA-ViT-g weights (eva_vit_g.pth)')
  _require_names(blip_file, 'query_tokens', '--instructblip', 'InstructBLIP weights (instruct_blip_vicuna7b_trimmed.pth)')
  tensors = TensorSet([vit_file, blip_file, *hf_directory_files(llm)], f'{vit} + {instructblip} + {llm}')
  depth = cfg.vision.depth
  notes = [f'EVA-ViT-g block {depth} (the checkpoint\'s last) is dropped: its tensors visual_encoder.blocks.{depth}.* '
           f'fill no parameter (BLIP-2 uses the {depth} blocks before it, vision/blocks/layers_0..{depth - 1})',
           'the q and v biases of each ViT block are kept as EVA\'s q_bias and v_bias (its k bias is zero)',
           'llm_proj becomes the projection into the LLM']
  if rows:
    notes.append(f'the vocabulary grows to {cfg.llm.vocab_size} for [PAD] (id {cfg.llm.vocab_size - 1}): its '
                 'embedding row and LM-head row are the mean of the existing rows')
  rules = mappings.lavis_rules(cfg.vision.depth, hf.rope_inv_freq_check(cfg.llm), rows)
  return Prepared('lavis', cfg, tensors, rules, {'llm': llm, 'qformer': qformer_tokenizer}, notes,
                  {'kind': 'lavis', 'vit': vit, 'instructblip': instructblip, 'llm': llm, 'trust_pickle': trust_pickle})


def _require_names(tensor_file: TensorFile, name: str, flag: str, what: str) -> None:
  names = tensor_file.names()
  if name not in names:
    raise UserError(f'{flag} {tensor_file.path} does not hold {what}: it has no {name[len(tensor_file.prefix):]!r} '
                    f'(its first tensors: {[n[len(tensor_file.prefix):] for n in names[:3]]})')


def prepare_stllm(directory: str, base: ml_collections.ConfigDict | None = None, qformer_tokenizer: str = '',
                  num_local_frames: int = 0) -> Prepared:
  directory = require_dir(directory, 'the ST-LLM checkpoint directory')
  config = read_hf_config(directory)
  tensors = TensorSet(hf_directory_files(directory), directory)
  names = tensors.names()
  if not any(n.startswith(mappings.STLLM_PREFIX) for n in names):
    require_kind(directory, config, 'stllm', 'an ST-LLM checkpoint')
    raise UserError(f'{directory} holds no {mappings.STLLM_PREFIX}* tensors, so it is not an ST-LLM checkpoint')
  cfg = _base(base)
  cfg.llm = _llm_config(config, cfg.llm, directory)
  notes = _bt_adapter(cfg, tensors, names)
  if mappings.STLLM_PREFIX + 'down_proj.weight' in names:
    cfg.video_input = 'global_local'
    cfg.global_mlp_dim = int(tensors.read(mappings.STLLM_PREFIX + 'down_proj.weight').shape[0])
    cfg.num_local_frames = _local_frames(tensors, names, num_local_frames) or cfg.num_local_frames
    notes.append(f'global-local input (down_proj/up_proj): video_input=global_local, {cfg.num_local_frames} local '
                 f'frames, f_m width {cfg.global_mlp_dim}')
  cfg.mvm_head = any(n.startswith(mappings.STLLM_PREFIX + 'mvm_decoder.') for n in names)
  notes.append('MVM head (mvm_decoder) ' + ('converted' if cfg.mvm_head else 'absent: training adds a fresh one'))
  if mappings.STLLM_PREFIX + 'embed_tokens.weight' in names:
    notes.append(f'the second copy of the LLM embedding, {mappings.STLLM_PREFIX}embed_tokens.weight, is checked '
                 'equal to model.embed_tokens.weight (-> llm/embed/embedding) and not stored')
  tokenizers = {'llm': directory if has_tokenizer(directory) else '', 'qformer': qformer_tokenizer}
  rules = mappings.stllm_rules(hf.rope_inv_freq_check(cfg.llm), cfg.num_local_frames)
  return Prepared('stllm', cfg, tensors, rules, tokenizers, notes, {'kind': 'stllm', 'source': directory})


def _bt_adapter(cfg: ml_collections.ConfigDict, tensors: TensorSet, names: list[str]) -> list[str]:
  """Sets `model.vision.bt_adapter` from the checkpoint's `visual_encoder.BTAdapter_*` tensors (the QA model):
  the depth from the temporal layers, max_frames from the rows of the frame-position table. Returns the note."""
  prefix = mappings.STLLM_PREFIX + mappings.BT_ADAPTER_PREFIX
  depth = mappings.bt_adapter_depth(names, prefix)
  if not depth:
    return []
  adapter = cfg.vision.bt_adapter
  adapter.depth = depth
  if prefix + mappings.BT_ADAPTER_POSITION in names:  # without it, the strict load names the missing table
    adapter.max_frames = int(tensors.read(prefix + mappings.BT_ADAPTER_POSITION).shape[0])
  first = cfg.vision.depth - depth
  return [f'BT-Adapter ({prefix}BTAdapter_*, the QA model): {depth} temporal + spatial layer pairs beside ViT '
          f'blocks {first}..{cfg.vision.depth - 1}, at most {adapter.max_frames} frames per video '
          f'(model.vision.bt_adapter, params bt_adapter/)']


def _local_frames(tensors: TensorSet, names: list[str], requested: int) -> int:
  """The number of local frames: the checkpoint's (its `residual_index` buffer), else `requested` (0: unknown)."""
  name = mappings.STLLM_PREFIX + 'residual_index'
  if name not in names:
    return requested
  stored = int(tensors.read(name).size)
  if requested and requested != stored:
    raise UserError(f'--num-local-frames {requested} contradicts the checkpoint, trained with {stored} local frames')
  return stored


def prepare_hf_llama(directory: str, base: ml_collections.ConfigDict | None = None) -> Prepared:
  directory = require_dir(directory, 'the LLaMA directory')
  config = read_hf_config(directory)
  require_kind(directory, config, 'hf-llama', 'a LLaMA/Vicuna model')
  cfg = _base(base)
  cfg.llm = _llm_config(config, cfg.llm, directory)
  notes, rows = [], 0
  if has_tokenizer(directory):
    rows = new_vocab_rows(directory, cfg.llm.vocab_size)
    cfg.llm.vocab_size += rows
    if rows:
      notes.append(f'the vocabulary grows to {cfg.llm.vocab_size} for [PAD] (id {cfg.llm.vocab_size - 1}): its '
                   'embedding row and LM-head row are the mean of the existing rows')
  rules = mappings.llama_rules('', 'llm/', hf.rope_inv_freq_check(cfg.llm), rows)
  if cfg.llm.tie_word_embeddings:
    rules.insert(0, (r'lm_head\.weight', mappings.SameAs('llm/embed/embedding')))
  notes.append('only the LLM is converted (params llm/); the rest of model.json is the base config')
  tokenizers = {'llm': directory if has_tokenizer(directory) else '', 'qformer': ''}
  return Prepared('hf-llama', cfg, TensorSet(hf_directory_files(directory), directory), rules, tokenizers, notes,
                  {'kind': 'hf-llama', 'source': directory}, llm_only=True)


# ------------------------------------------------------------------------------------------------ writing

def with_dtype(model_config: ml_collections.ConfigDict, dtype: str) -> ml_collections.ConfigDict:
  """Params stored in `dtype`, and computed in it (chat and evaluation run the model as it is stored)."""
  if dtype not in DTYPES:
    raise UserError(f'--dtype {dtype!r}: choose one of {DTYPES}')
  cfg = ml_collections.ConfigDict(model_config.to_dict())
  cfg.vision.param_dtype = cfg.qformer.param_dtype = cfg.llm.param_dtype = cfg.dtype = dtype
  return cfg


def param_template(model_config: ml_collections.ConfigDict, llm_only: bool) -> dict[str, jax.ShapeDtypeStruct]:
  """Flat {path: ShapeDtypeStruct} of the params a source fills."""
  if llm_only:
    llm_cfg = configlib.from_dict(llama.LlamaConfig, model_config.llm, 'model.llm')
    return {f'llm/{k}': v for k, v in strict.abstract_leaves(llama.abstract_variables(llm_cfg)).items()}
  return strict.abstract_leaves(stllm.abstract_variables(model_config))


def tokenizer_problems(model_config: Any, tokenizers: dict[str, Any]) -> list[str]:
  """Tokenizers whose ids do not fit the embeddings they index."""
  problems = []
  for which, rows in (('llm', model_config.llm.vocab_size), ('qformer', model_config.qformer.vocab_size)):
    tokenizer = tokenizers.get(which)
    if tokenizer is not None and len(tokenizer) > rows:
      problems.append(f'the {which} tokenizer has {len(tokenizer)} tokens but the {which} embedding has {rows} rows')
  return problems


def mesh_shardings(model_config: Any, template: dict[str, Any], mesh_spec: str) -> Any:
  """NamedShardings (nested like the params) of the template's leaves on the mesh `mesh_spec`."""
  try:
    mesh = sharding.make_mesh(mesh_spec)
  except ValueError as err:
    raise UserError(f'--mesh {mesh_spec}: {err} (on a CPU-only host, simulate devices with '
                    'XLA_FLAGS=--xla_force_host_platform_device_count=N)') from None
  full = flax.traverse_util.flatten_dict(
      sharding.param_shardings(stllm.abstract_variables(model_config), mesh), sep='/')
  return flax.traverse_util.unflatten_dict({k: full[k] for k in template}, sep='/')


def convert(prepared: Prepared, out: str, dtype: str = 'float32', mesh: str = '',
            log: Callable[[str], None] = print, progress: Callable[..., Any] | None = None) -> dict[str, Any]:
  """Assembles and writes the weights directory `out`; returns a summary (sizes, counts)."""
  import tqdm  # pylint: disable=g-import-not-at-top
  progress = progress or (lambda items, **kw: tqdm.tqdm(items, **kw))
  if os.path.exists(out):
    raise UserError(f'{out} already exists; choose a new output directory (nothing was written)')
  cfg = with_dtype(prepared.model_config, dtype)
  try:
    stllm.model_config(cfg)
  except (ValueError, TypeError) as err:
    raise UserError(f'the converted model config is invalid: {err}') from None
  tokenizers = {which: load_tokenizer(which, d) for which, d in prepared.tokenizer_dirs.items() if d}
  problems = tokenizer_problems(cfg, tokenizers)
  if problems:
    raise UserError('the tokenizers do not fit the weights: ' + '; '.join(problems))
  template = param_template(cfg, prepared.llm_only)
  shardings = mesh_shardings(cfg, template, mesh) if mesh else None
  for note in prepared.notes:
    log(f'note: {note}')
  needs = f'chat, evaluation and training on data need it (saved in {out}/{checkpoints.TOKENIZERS_DIR}/'
  if 'llm' not in tokenizers:
    log(f'warning: the source has no LLM tokenizer; {needs}llm)')
  if 'qformer' not in tokenizers and not prepared.llm_only:
    log(f'warning: no Q-Former tokenizer (pass --qformer-tokenizer with a bert-base-uncased directory); {needs}qformer)')
  names = prepared.tensors.names()
  source_bytes = prepared.tensors.nbytes()
  log(f'reading {len(names)} tensors ({format_bytes(source_bytes)}) from {prepared.tensors.description}')
  start = time.time()
  params = strict.load_strict(
      prepared.tensors, prepared.rules, template, prepared.tensors.description,
      progress=lambda items: progress(items, total=len(names), unit='tensor', desc='converting'))
  output_bytes = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(params))
  num_params = strict.num_elements(params)
  log(f'writing {format_count(num_params)} params ({format_bytes(output_bytes)}, {dtype}) to {out}'
      + (f' sharded over mesh {mesh}' if mesh else ''))
  checkpoints.save_weights(
      out, params, cfg.to_dict(), tokenizers=tokenizers, shardings=shardings,
      conversion={**prepared.provenance, 'dtype': dtype, 'notes': prepared.notes},
      progress=lambda items: progress(items, unit='leaf', desc='placing on the mesh'))
  del params
  summary = dict(tensors=len(names), source_bytes=source_bytes, output_bytes=output_bytes, params=num_params,
                 seconds=time.time() - start)
  log(f'done in {summary["seconds"]:.0f} s: {out} ({format_bytes(output_bytes)})')
  return summary
