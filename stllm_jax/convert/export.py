"""Weights directory (or training workdir) -> a Hugging Face PyTorch directory: `convert export-hf CKPT OUT`.

OUT holds what `InstructBlipForConditionalGeneration.from_pretrained(OUT)` reads: config.json and sharded
safetensors with the vision tower, Q-Former, projection and the LLaMA (`language_model.*`), plus the LLM
tokenizer (top level) and the Q-Former tokenizer (`qformer_tokenizer/`) when the weights have them. ST-LLM's
own modules, which InstructBLIP lacks, go to a side file in ST-LLM's names (`stllm_heads.safetensors`:
`mvm_decoder.*`, `down_proj.*`, `up_proj.*`, and the QA model's BT-Adapter `visual_encoder.BTAdapter_*`) with
`stllm_config.json` (video input, number of local frames, the BT-Adapter's architecture, ln_vision eps, the image
token). LoRA weights are merged into the kernels they adapt. An LLM-only directory (`convert hf-llama`) exports
as a `LlamaForCausalLM` directory.

InstructBLIP's forward and `generate` put the visual tokens where the LLM input ids hold its image token
(`config.image_token_index`). A vocabulary without `<image>` gets it as Hugging Face's own InstructBLIP
checkpoints do: a token after the tokenizer's last (Vicuna's [PAD] 32000 -> `<image>` 32001), saved in the
exported tokenizer, with a new embedding and LM-head row, each the mean of the others (as [PAD]'s).

Names come from the same rule tables as the import (`mappings`, each rule's `inverse`), the list of tensors
from the Hugging Face model itself (built on the meta device; the BT-Adapter's from the PyTorch reference tower,
`reference.bt_adapter_tower`), and the export is strict too: every Hugging Face tensor is produced and every one
of our params is written exactly once.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable

import flax
import jax
import numpy as np

from stllm_jax import checkpoints, configlib, loading
from stllm_jax.convert import hf, mappings, reference, strict
from stllm_jax.convert.tensor_files import format_bytes, write_safetensors
from stllm_jax.errors import UserError
from stllm_jax.models import llama, stllm

DEFAULT_MAX_SHARD_BYTES = 5 * 2 ** 30
HEADS_FILE = 'stllm_heads.safetensors'
STLLM_CONFIG_FILE = 'stllm_config.json'
IMAGE_TOKEN = '<image>'  # the LLM input id InstructBLIP replaces with the visual tokens (Hugging Face's name)
VOCAB_MATRICES = ('language_model.model.embed_tokens.weight', 'language_model.lm_head.weight')


class ReadOnce:
  """Our unscanned params by path; remembers what was read, and for which tensor (`reader`, set by the
  caller), so an export can prove it wrote each once and name both sides of a problem."""

  def __init__(self, flat_params: dict[str, Any]):
    self.view = strict.unscanned_view(flat_params)
    self.shapes = strict.unscanned_template(flat_params)  # {path: (shape, dtype)}
    self.reads: dict[str, list[str]] = {}  # path -> the tensors made from it
    self.reader = ''  # the Hugging Face tensor being made

  def __call__(self, path: str) -> np.ndarray:
    if path not in self.view:
      raise ValueError(f'the weights have no {path}')
    self.reads.setdefault(path, []).append(self.reader)
    return self.view[path]()

  def read_by(self, name: str) -> str:
    """' (from path [shape], ...)': the params the tensor `name` was made from ('' if none)."""
    paths = [f'{p} {list(self.shapes[p][0])}' for p, readers in self.reads.items() if name in readers]
    return f' (from {", ".join(paths)})' if paths else ''

  def problems(self) -> list[str]:
    unread = sorted(set(self.view) - set(self.reads))
    twice = sorted(p for p, readers in self.reads.items() if len(readers) > 1)
    return ([f'not written anywhere: {p}' for p in unread[:20]] + (['...'] if len(unread) > 20 else [])
            + [f'written more than once: {p} (to {", ".join(self.reads[p])})' for p in twice])


def merge_lora(flat: dict[str, Any], llm_config: Any) -> dict[str, Any]:
  """Kernels with their LoRA update added ((alpha / r) * A @ B); the LoRA leaves removed."""
  cfg = configlib.from_dict(llama.LlamaConfig, llm_config, 'model.llm')
  out = {k: v for k, v in flat.items() if '/lora/' not in k}
  for path in [k for k in flat if k.endswith('/lora/a')]:
    base = path[:-len('/lora/a')]
    kernel, a, b = (np.asarray(flat[p]) for p in (f'{base}/kernel', path, f'{base}/lora/b'))
    lead = a.ndim + b.ndim - 2 - kernel.ndim  # 1 for a scanned stack of layers, else 0
    a2 = a.reshape(a.shape[:lead] + (-1, cfg.lora_rank)).astype(np.float32)
    b2 = b.reshape(b.shape[:lead] + (cfg.lora_rank, -1)).astype(np.float32)
    delta = np.matmul(a2, b2).reshape(kernel.shape) * (cfg.lora_alpha / cfg.lora_rank)
    out[f'{base}/kernel'] = (kernel.astype(np.float32) + delta).astype(kernel.dtype)
  return out


def hf_tensor_specs(model_class: Any, config: Any) -> list[tuple[str, tuple[int, ...]]]:
  """(name, shape) of every tensor of a Hugging Face model, from the model built on the meta device."""
  import torch  # pylint: disable=g-import-not-at-top
  with torch.device('meta'):
    model = model_class(config)
  tied = set()
  if getattr(config.get_text_config(), 'tie_word_embeddings', False):
    tied = {n for n in model.state_dict() if n.endswith('lm_head.weight')}
  return [(name, tuple(t.shape)) for name, t in model.state_dict().items() if name not in tied]


def bt_adapter_specs(model_cfg: stllm.STLLMConfig) -> list[tuple[str, tuple[int, ...]]]:
  """(ST-LLM name, shape) of every BT-Adapter tensor (`visual_encoder.BTAdapter_*`), from the PyTorch reference
  tower built on the meta device; none without an adapter."""
  if not model_cfg.vision.bt_adapter.depth:
    return []
  tower = reference.bt_adapter_tower(model_cfg.vision)
  return [(mappings.BT_ADAPTER_PREFIX + name, tuple(t.shape)) for name, t in tower.state_dict().items()
          if name.startswith('BTAdapter_')]


def plan_shards(specs: list[tuple[str, tuple[int, ...]]], itemsize: int, max_bytes: int) -> list[list]:
  """Consecutive groups of specs of at most `max_bytes` each (a bigger tensor gets a shard of its own)."""
  shards, current, size = [], [], 0
  for name, shape in specs:
    nbytes = int(np.prod(shape)) * itemsize
    if current and size + nbytes > max_bytes:
      shards.append(current)
      current, size = [], 0
    current.append((name, shape))
    size += nbytes
  if current:
    shards.append(current)
  return shards


def tokenizer_with_image_token(directory: str) -> Any:
  """The LLM tokenizer of `directory` (None if there is none) with IMAGE_TOKEN, added after its last token if
  it has none, as the `image_token` Hugging Face's InstructBlipProcessor looks up."""
  import transformers  # pylint: disable=g-import-not-at-top
  if not (directory and os.path.isdir(directory)):
    return None
  return transformers.AutoTokenizer.from_pretrained(directory, extra_special_tokens={'image_token': IMAGE_TOKEN})


def image_token_index(llm_tokenizer: Any, vocab_size: int) -> int:
  """The id of IMAGE_TOKEN: the tokenizer's (`tokenizer_with_image_token`), else the first id past the vocabulary."""
  return vocab_size if llm_tokenizer is None else llm_tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def new_vocab_rows(image_token_index: int, vocab_size: int) -> int:
  """Rows the LLM's embedding and LM head need for the image token (0: it has a row already)."""
  return max(image_token_index + 1 - vocab_size, 0)


def instructblip_config(model: Any, image_token_index: int, new_rows: int) -> Any:
  """The Hugging Face `InstructBlipConfig` of our `config.model`, with the image token and its vocabulary rows."""
  import transformers  # pylint: disable=g-import-not-at-top
  config = {k: v for k, v in hf.hf_instructblip_config(model).items() if k != 'model_type'}
  config['text_config']['vocab_size'] += new_rows
  return transformers.InstructBlipConfig(**config, image_token_index=image_token_index)


def with_vocab_rows(produce: Callable[[str, tuple[int, ...]], np.ndarray],
                    new_rows: int) -> Callable[[str, tuple[int, ...]], np.ndarray]:
  """`produce(name, shape)` whose LLM embedding and LM head (`VOCAB_MATRICES`) end in `new_rows` mean rows."""
  def produce_grown(name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in VOCAB_MATRICES or not new_rows:
      return produce(name, shape)
    return mappings.with_mean_rows(produce(name, (shape[0] - new_rows, *shape[1:])), new_rows)
  return produce_grown


def _load(ckpt: str) -> tuple[Any, dict[str, Any], dict[str, str], bool]:
  """(config.model, flat params, tokenizer dirs, llm_only) of a weights directory or a training workdir."""
  if not os.path.exists(ckpt):
    raise UserError(f'{ckpt} does not exist')
  if checkpoints.is_weights_dir(ckpt):
    stored = checkpoints.stored_param_shapes(ckpt)
    if {p.split('/')[0] for p in stored} == {'llm'}:
      model = checkpoints.read_model_config(ckpt)
      flat = flax.traverse_util.flatten_dict(checkpoints.load_stored_params(ckpt), sep='/')
      tokenizer = os.path.join(ckpt, checkpoints.TOKENIZERS_DIR, 'llm')
      return model, flat, {'llm': tokenizer if os.path.isdir(tokenizer) else ''}, True
  loaded = loading.load_model(ckpt)
  return (loaded.model_config.to_dict(), flax.traverse_util.flatten_dict(loaded.params, sep='/'),
          {'llm': loaded.llm_tokenizer, 'qformer': loaded.qformer_tokenizer}, False)


def export_hf(ckpt: str, out: str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: str = '',
              log: Callable[[str], None] = print, progress: Callable[..., Any] | None = None) -> dict[str, Any]:
  """Writes the Hugging Face directory `out` (atomically); returns a summary."""
  import tqdm  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  progress = progress or (lambda **kw: tqdm.tqdm(**kw))
  if os.path.exists(out):
    raise UserError(f'{out} already exists; choose a new output directory (nothing was written)')
  model, flat, tokenizer_dirs, llm_only = _load(ckpt)
  model_cfg = stllm.model_config(model)
  flat = merge_lora(flat, model['llm'])
  dtype = np.dtype(jax.numpy.dtype(dtype or model_cfg.llm.param_dtype))
  llm_tokenizer, new_rows = None, 0
  if llm_only:
    config = transformers.LlamaConfig(**hf.hf_llama_config(model['llm']))
    model_class, rules = transformers.LlamaForCausalLM, mappings.llama_rules('', 'llm/')
  else:
    llm_tokenizer = tokenizer_with_image_token(tokenizer_dirs['llm'])
    image_index = image_token_index(llm_tokenizer, model_cfg.llm.vocab_size)
    new_rows = new_vocab_rows(image_index, model_cfg.llm.vocab_size)
    config = instructblip_config(model, image_index, new_rows)
    model_class, rules = transformers.InstructBlipForConditionalGeneration, mappings.hf_instructblip_rules()
  specs = hf_tensor_specs(model_class, config)
  get = ReadOnce({k: v for k, v in flat.items() if k.split('/')[0] not in mappings.STLLM_OWN_MODULES})
  head_get = ReadOnce({k: v for k, v in flat.items() if k.split('/')[0] in mappings.STLLM_OWN_MODULES})
  heads = mappings.stllm_head_tensors({k: tuple(v.shape) for k, v in flat.items()})
  heads += [] if llm_only else bt_adapter_specs(model_cfg)
  produce = with_vocab_rows(lambda name, shape: mappings.export_tensor(rules, name, shape, get), new_rows)
  dry_run(specs, produce, get)
  dry_run(heads, lambda name, shape: mappings.export_tensor(mappings.stllm_head_rules(''), name, shape, head_get),
          head_get)

  parent = os.path.dirname(os.path.abspath(out))
  staging = os.path.join(parent, f'{os.path.basename(os.path.abspath(out))}{checkpoints.INCOMPLETE}{os.getpid()}')
  total = sum(int(np.prod(shape)) for _, shape in specs + heads) * dtype.itemsize
  try:
    os.makedirs(staging)
    config.dtype = str(dtype)
    config.save_pretrained(staging)
    bar = progress(total=total, unit='B', unit_scale=True, unit_divisor=1024, desc='writing')
    _write_shards(staging, specs, shape_of=dict(specs), produce=produce, dtype=dtype, max_bytes=max_shard_bytes,
                  on_tensor=bar.update)
    if heads:
      shapes = dict(heads)
      write_safetensors(os.path.join(staging, HEADS_FILE), [(n, s, dtype) for n, s in heads],
                        lambda n: mappings.export_tensor(mappings.stllm_head_rules(''), n, shapes[n], head_get),
                        {'format': 'pt'}, on_tensor=bar.update)
    bar.close()
    if not llm_only:
      _write_stllm_config(staging, model_cfg, bool(heads), config.image_token_index, new_rows)
    _write_tokenizers(staging, tokenizer_dirs, llm_tokenizer)
    os.rename(staging, out)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  if not llm_only:
    log(f'note: the LLM input ids hold {IMAGE_TOKEN} (id {config.image_token_index}) where InstructBLIP puts the '
        f'visual tokens' + (f'; it is new: the vocabulary grows to {config.text_config.vocab_size}, its embedding '
                            'and LM-head rows the mean of the others' if new_rows else ''))
  if not llm_only and model_cfg.ln_vision_eps != model_cfg.vision.layer_norm_eps:
    log(f'note: Hugging Face applies ln_vision as post_layernorm with eps {model_cfg.vision.layer_norm_eps:g}; this '
        f'model uses {model_cfg.ln_vision_eps:g} (set model.vision_model.post_layernorm.eps after loading; '
        f'{STLLM_CONFIG_FILE} records it)')
  if not llm_only and model_cfg.vision.bt_adapter.depth:
    log(f'note: the BT-Adapter (visual_encoder.BTAdapter_*) is in {HEADS_FILE}, described in {STLLM_CONFIG_FILE}: '
        'transformers has no such module, so InstructBlipForConditionalGeneration alone computes vision features '
        'without it, which are not this model\'s')
  log(f'wrote {len(specs) + len(heads)} tensors ({format_bytes(total)}, {dtype}) to {out}')
  return dict(tensors=len(specs) + len(heads), bytes=total)


def dry_run(specs: list[tuple[str, tuple[int, ...]]], produce: Callable, get: ReadOnce) -> None:
  """Maps every name to our params without reading any values: fails before anything is written, naming the
  Hugging Face tensor and the params it is made from."""
  problems = []
  real_view = get.view
  get.view = {p: (lambda shape=shape, dtype=dtype: np.broadcast_to(np.zeros((), dtype), shape))
              for p, (shape, dtype) in get.shapes.items()}
  try:
    for name, shape in specs:
      get.reader = name
      try:
        array = produce(name, shape)
        if tuple(array.shape) != tuple(shape):
          problems.append(f'{name}{get.read_by(name)}: our params give shape {list(array.shape)}, Hugging Face '
                          f'expects {list(shape)}')
      except ValueError as err:
        problems.append(f'{name}{get.read_by(name)}: {err}')
    problems += get.problems()
  finally:
    get.view, get.reads, get.reader = real_view, {}, ''
  if problems:
    raise UserError('the weights do not map onto the Hugging Face layout:\n  ' + '\n  '.join(problems))


def _write_shards(directory: str, specs, shape_of, produce, dtype, max_bytes, on_tensor) -> None:
  shards = plan_shards(specs, dtype.itemsize, max_bytes)
  names = (['model.safetensors'] if len(shards) == 1 else
           [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))])
  weight_map, total = {}, 0
  for filename, shard in zip(names, shards):
    total += write_safetensors(os.path.join(directory, filename), [(n, s, dtype) for n, s in shard],
                               lambda n: produce(n, shape_of[n]), {'format': 'pt'}, on_tensor=on_tensor)
    weight_map.update({n: filename for n, _ in shard})
  if len(shards) > 1:
    with open(os.path.join(directory, 'model.safetensors.index.json'), 'w') as f:
      json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2)


def bt_adapter_info(model_cfg: stllm.STLLMConfig) -> dict[str, Any] | None:
  """The BT-Adapter's architecture for `stllm_config.json` (None without an adapter)."""
  adapter, vit_depth = model_cfg.vision.bt_adapter, model_cfg.vision.depth
  if not adapter.depth:
    return None
  return dict(depth=adapter.depth, max_frames=adapter.max_frames,
              vit_blocks=list(range(vit_depth - adapter.depth, vit_depth)),  # the ViT blocks it reads
              temporal_norm_eps=adapter.temporal_norm_eps, spatial_norm_eps=adapter.spatial_norm_eps,
              drop_path=adapter.drop_path)


def _write_stllm_config(directory: str, model_cfg: stllm.STLLMConfig, has_heads: bool, image_token_index: int,
                        new_rows: int) -> None:
  info = dict(video_input=model_cfg.video_input, num_local_frames=model_cfg.num_local_frames,
              global_mlp_dim=model_cfg.global_mlp_dim, mvm_head=model_cfg.mvm_head, mvm_norm_eps=model_cfg.mvm_norm_eps,
              bt_adapter=bt_adapter_info(model_cfg),
              ln_vision_eps=model_cfg.ln_vision_eps, heads_file=HEADS_FILE if has_heads else None,
              image_token=IMAGE_TOKEN, image_token_index=image_token_index, image_token_added=bool(new_rows),
              num_query_tokens=model_cfg.qformer.num_query_tokens,
              note='ST-LLM puts the visual tokens first: [V : text]; to generate from one image, input_ids are '
                   'image_token_index num_query_tokens times, then the prompt. image_token_added: the token is new, '
                   'its embedding and LM-head rows the mean of the others (pass suppress_tokens=[image_token_index] '
                   'to generate to keep it out of answers). ln_vision is vision_model.post_layernorm with '
                   'eps ln_vision_eps. down_proj/up_proj (global-local) add up(relu(down(mean over frames))) to '
                   'each local frame\'s tokens; mvm_decoder is a training-only head. visual_encoder.BTAdapter_* '
                   '(bt_adapter, the QA model; ST-LLM\'s stllm/models/eva_btadapter.py, which transformers lacks) '
                   'runs beside vision_model on the outputs of vit_blocks over all frames of a video together; '
                   'each frame\'s vision_model output before post_layernorm becomes the mean of the last block\'s '
                   'output and the adapter\'s.')
  with open(os.path.join(directory, STLLM_CONFIG_FILE), 'w') as f:
    json.dump(info, f, indent=2)


def _write_tokenizers(directory: str, tokenizer_dirs: dict[str, str], llm_tokenizer: Any) -> None:
  """LLM tokenizer files at the top level (`llm_tokenizer`, the one with the image token, when given), the
  Q-Former's under qformer_tokenizer/ (Hugging Face's layout)."""
  if llm_tokenizer is not None:
    llm_tokenizer.save_pretrained(directory)
  for which, source in tokenizer_dirs.items():
    if source and os.path.isdir(source) and not (which == 'llm' and llm_tokenizer is not None):
      target = directory if which == 'llm' else os.path.join(directory, 'qformer_tokenizer')
      shutil.copytree(source, target, dirs_exist_ok=True)
