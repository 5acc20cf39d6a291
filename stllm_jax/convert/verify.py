"""`convert verify CKPT --torch SOURCE`: the converted model and the PyTorch reference on the same inputs.

Both run in float32 on the same random frames and the same random instruction and prompt ids; the logits
over the whole sequence ([visual tokens : text], every vocabulary entry) are compared. A checkpoint stored in
bfloat16 is compared with a reference whose weights are rounded to bfloat16, so the error measures the
conversion, not the precision chosen for storage. Memory: both models at once (float32 torch + ours).
A model with a BT-Adapter (ST-LLM's QA checkpoint) is compared with `bt_adapter_reference`'s EVA-ViT + adapter
tower in place of Hugging Face's per-frame ViT (transformers has no adapter), then Hugging Face's ln_vision,
Q-Former, projection and LLaMA as for the other models.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from stllm_jax import checkpoints, configlib, loading, sharding
from stllm_jax.convert import mappings, reference, sources
from stllm_jax.errors import UserError
from stllm_jax.models import llama, stllm

DEFAULT_TOLERANCE = 1e-4  # relative logit error; float32 7B conversions land near 1e-6


@dataclasses.dataclass(frozen=True)
class Result:
  max_abs_error: float
  relative_error: float
  logits_shape: tuple[int, ...]
  description: str

  def passed(self, tolerance: float) -> bool:
    return bool(np.isfinite(self.relative_error)) and self.relative_error <= tolerance


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """What a checkpoint was converted from: a kind and its paths (`conversion.json`, or given by hand)."""
  kind: str
  paths: dict[str, str]
  # Unpickle Python objects in lavis .pth files: only on the command line's word (--trust-pickle), never on
  # conversion.json's, which comes with the weights directory and may come from someone else.
  trust_pickle: bool = False

  @staticmethod
  def resolve(ckpt: str, torch_dir: str = '', vit: str = '', instructblip: str = '', llm: str = '',
              trust_pickle: bool = False) -> 'SourceSpec':
    if not checkpoints.is_weights_dir(ckpt):
      raise UserError(f'{ckpt} is not a weights directory (model.json and params/); verify checks a conversion')
    if vit or instructblip or llm:
      if not (vit and instructblip and llm):
        raise UserError('a lavis source needs all of --vit, --instructblip and --llm')
      return SourceSpec('lavis', {'vit': vit, 'instructblip': instructblip, 'llm': llm}, trust_pickle)
    if torch_dir:
      sources.require_dir(torch_dir, '--torch')
      kind = sources.detect_kind(torch_dir)
      if kind is None:
        raise UserError(f'--torch {torch_dir}: not a Hugging Face InstructBLIP, ST-LLM or LLaMA directory (no '
                        'config.json with a known model_type); for LAVIS files give --vit, --instructblip and --llm')
      return SourceSpec(kind, {'source': torch_dir})
    info = checkpoints.conversion_info(ckpt)
    if not info:
      raise UserError(f'{ckpt} does not record its source (no {checkpoints.CONVERSION_JSON}); give --torch DIR '
                      '(or --vit/--instructblip/--llm)')
    return SourceSpec(info['kind'], {k: info[k] for k in ('source', 'vit', 'instructblip', 'llm') if k in info},
                      trust_pickle)


def random_batch(model_config: Any, num_frames: int, text_len: int, qformer_text_len: int,
                 seed: int) -> dict[str, np.ndarray]:
  """Random normalised frames and random token ids (one sample, no padding)."""
  cfg = stllm.model_config(model_config)
  rng = np.random.default_rng(seed)
  size = cfg.vision.image_size
  ones = lambda n: np.ones((1, n), np.int32)
  return dict(frames=rng.standard_normal((1, num_frames, size, size, 3)).astype(np.float32),
              qformer_input_ids=rng.integers(1, cfg.qformer.vocab_size, (1, qformer_text_len)).astype(np.int32),
              qformer_attention_mask=ones(qformer_text_len),
              input_ids=rng.integers(1, cfg.llm.vocab_size, (1, text_len)).astype(np.int32),
              attention_mask=ones(text_len))


def default_frames(model_config: Any) -> int:
  cfg = stllm.model_config(model_config)
  return cfg.num_local_frames if cfg.video_input == 'global_local' else 2


def compare(ours: np.ndarray, theirs: np.ndarray, description: str) -> Result:
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  if ours.shape != theirs.shape:
    raise UserError(f'logit shapes differ: ours {list(ours.shape)}, PyTorch {list(theirs.shape)}')
  diff = ours - theirs
  return Result(float(np.abs(diff).max()), float(np.linalg.norm(diff) / np.linalg.norm(theirs)), ours.shape,
                description)


def _float32(model_config: dict) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(model_config)
  cfg.dtype = 'float32'
  return cfg


def verify(ckpt: str, spec: SourceSpec, num_frames: int = 0, text_len: int = 16, seed: int = 0,
           log: Callable[[str], None] = print) -> Result:
  if not checkpoints.is_weights_dir(ckpt):
    raise UserError(f'{ckpt} is not a weights directory (model.json and params/); verify checks a conversion')
  model = checkpoints.read_model_config(ckpt)
  llm_only = {p.split('/')[0] for p in checkpoints.stored_param_shapes(ckpt)} == {'llm'}
  round_bf16 = model['llm']['param_dtype'] == 'bfloat16'
  mesh = sharding.make_mesh('fsdp=1')
  if llm_only or spec.kind == 'hf-llama':
    if not (llm_only and spec.kind == 'hf-llama'):
      raise UserError(f'{ckpt} and the {spec.kind} source do not match: an LLM-only weights directory verifies '
                      'against a LLaMA directory, a whole model against an InstructBLIP/LAVIS/ST-LLM source')
    return _verify_llama(ckpt, model, spec, text_len, seed, round_bf16, mesh, log)
  cfg = _float32(model)
  if cfg.vision.bt_adapter.depth and spec.kind != 'stllm':
    raise UserError(f'{ckpt} has a BT-Adapter (model.vision.bt_adapter.depth={cfg.vision.bt_adapter.depth}), which '
                    f'a {spec.kind} source does not hold; it verifies against the ST-LLM QA checkpoint it came from')
  batch = random_batch(cfg, num_frames or default_frames(cfg), text_len, qformer_text_len=8, seed=seed)
  log(f'PyTorch reference from the {spec.kind} source ({", ".join(spec.paths.values())})'
      + (' with weights rounded to bfloat16' if round_bf16 else ''))
  torch_reference = _reference_model(spec, cfg, round_bf16)
  theirs = reference.stllm_logits(torch_reference, cfg, batch)
  del torch_reference
  log(f'JAX model from {ckpt}')
  params = loading.load_model(ckpt, mesh).params
  ours = jax.jit(lambda p, b: stllm.STLLM(cfg).apply({'params': p}, b))(params, batch)
  frames = batch['frames'].shape[1]
  return compare(np.asarray(ours), theirs, f'{frames} frames, {text_len} text tokens, seed {seed}')


def _reference_model(spec: SourceSpec, cfg: ml_collections.ConfigDict, round_bf16: bool) -> reference.Reference:
  if spec.kind == 'hf-instructblip':
    return reference.Reference(reference.hf_instructblip(sources.require_dir(spec.paths['source'], 'the source'),
                                                         round_bf16))
  if spec.kind == 'lavis':
    prepared = sources.prepare_lavis(spec.paths['vit'], spec.paths['instructblip'], spec.paths['llm'], cfg,
                                     trust_pickle=spec.trust_pickle)
    return reference.lavis_instructblip(prepared.tensors, cfg, '', round_bf16)
  if spec.kind == 'stllm':
    prepared = sources.prepare_stllm(spec.paths['source'], cfg)
    return reference.lavis_instructblip(prepared.tensors, cfg, mappings.STLLM_PREFIX, round_bf16)
  raise UserError(f'unknown source kind {spec.kind!r}')


def _verify_llama(ckpt: str, model: dict, spec: SourceSpec, text_len: int, seed: int, round_bf16: bool,
                  mesh: Any, log: Callable[[str], None]) -> Result:
  llm_cfg = configlib.from_dict(llama.LlamaConfig, dict(model['llm']), 'model.llm')
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, llm_cfg.vocab_size, (1, text_len)).astype(np.int32)
  mask = np.ones_like(ids)
  log(f'PyTorch reference: LlamaForCausalLM from {spec.paths["source"]}')
  torch_model = reference.hf_llama(sources.require_dir(spec.paths['source'], 'the source'), llm_cfg.vocab_size,
                                   round_bf16)
  theirs = reference.llama_logits(torch_model, ids, mask)
  del torch_model
  params = checkpoints.load_stored_params(ckpt, mesh)['llm']
  ours = jax.jit(lambda p: llama.Llama(llm_cfg).apply({'params': p}, ids, mask, method='forward_ids'))(params)
  return compare(np.asarray(ours), theirs, f'{text_len} text tokens, seed {seed}')


def report(result: Result, tolerance: float) -> str:
  verdict = 'OK' if result.passed(tolerance) else 'FAILED'
  return (f'logits {list(result.logits_shape)} ({result.description}): max |difference| {result.max_abs_error:.3g}, '
          f'relative error {result.relative_error:.3g} (tolerance {tolerance:g}): {verdict}')

