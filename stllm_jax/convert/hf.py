"""Hugging Face PyTorch models -> our config and params, strictly.

`load_hf_instructblip(state_dict, hf_config)` takes an `InstructBlipForConditionalGeneration` state dict
(names -> tensors, arrays or lazy loaders) and its config (a transformers config or the `config.json`
dict) and returns `(config.model as a ConfigDict, params)`. `load_hf_llama` does the same for a
`LlamaForCausalLM` alone, returning `(config.model.llm, params of the Llama module)`. The architecture
comes from the Hugging Face config; everything else (dtype, scan, remat, video input) from `base`.

The other direction (`export-hf`, `verify`): `hf_instructblip_config(config.model)` and
`hf_llama_config(config.model.llm)` give the Hugging Face configs of our models.
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections
import numpy as np

from stllm_jax import configlib
from stllm_jax.convert import mappings, strict
from stllm_jax.models import llama, stllm


def _as_dict(hf_config: Any) -> dict:
  return hf_config.to_dict() if hasattr(hf_config, 'to_dict') else dict(hf_config)


def _require(cfg: Mapping, key: str, allowed, where: str) -> None:
  value = cfg.get(key, allowed[0])
  if value not in allowed:
    raise ValueError(f'{where}.{key}={value!r} is not supported (supported: {list(allowed)})')


def _rope_theta(text: Mapping) -> float:
  """rope theta from transformers >= 5 (`rope_parameters`) or older (`rope_theta`, `rope_scaling`) configs."""
  rope = text.get('rope_parameters') or {}
  scaling = text.get('rope_scaling') or {}
  rope_type = rope.get('rope_type') or scaling.get('rope_type') or scaling.get('type') or 'default'
  if rope_type != 'default':
    raise ValueError(f'RoPE type {rope_type!r} is not supported; only plain RoPE (rope_type "default") is')
  return float(rope.get('rope_theta', text.get('rope_theta', 10000.0)))


# Model types whose config.json is a LlamaConfig: LLaMA itself and the released ST-LLM checkpoints.
LLAMA_MODEL_TYPES = ('llama', 'st_llm_hf')


def llm_config_from_hf(text: Any, base: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  """A `LlamaConfig` (as a dict/HF config) -> our `config.model.llm`."""
  text = _as_dict(text)
  if text.get('model_type', 'llama') not in LLAMA_MODEL_TYPES:
    raise ValueError(f'the language model is a {text["model_type"]!r}; only LLaMA-family models convert')
  _require(text, 'hidden_act', ('silu',), 'text_config')
  _require(text, 'attention_bias', (False,), 'text_config')
  _require(text, 'mlp_bias', (False,), 'text_config')
  cfg = ml_collections.ConfigDict(base.to_dict()) if base is not None else configlib.to_config_dict(llama.LlamaConfig())
  heads = text['num_attention_heads']
  cfg.update(vocab_size=text['vocab_size'], width=text['hidden_size'], num_layers=text['num_hidden_layers'],
             num_heads=heads, num_kv_heads=text.get('num_key_value_heads') or heads,
             head_dim=text.get('head_dim') or 0, mlp_dim=text['intermediate_size'],
             rms_norm_eps=float(text['rms_norm_eps']), rope_theta=_rope_theta(text),
             max_positions=text['max_position_embeddings'],
             tie_word_embeddings=bool(text.get('tie_word_embeddings', False)))
  if cfg.head_dim == cfg.width // heads:
    cfg.head_dim = 0
  return cfg


def model_config_from_hf_instructblip(hf_config: Any,
                                      base: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  """An `InstructBlipConfig` -> our `config.model` (architecture from HF, the rest from `base`)."""
  hf = _as_dict(hf_config)
  vision, qformer = hf['vision_config'], hf['qformer_config']
  _require(vision, 'hidden_act', ('gelu',), 'vision_config')
  _require(qformer, 'hidden_act', ('gelu',), 'qformer_config')
  _require(qformer, 'position_embedding_type', ('absolute',), 'qformer_config')
  if qformer.get('encoder_hidden_size', vision['hidden_size']) != vision['hidden_size']:
    raise ValueError(f'qformer_config.encoder_hidden_size={qformer["encoder_hidden_size"]} differs from '
                     f'vision_config.hidden_size={vision["hidden_size"]}')
  cfg = ml_collections.ConfigDict(base.to_dict()) if base is not None else stllm.default_config()
  cfg.vision.update(image_size=vision['image_size'], patch_size=vision['patch_size'], width=vision['hidden_size'],
                    depth=vision['num_hidden_layers'], num_heads=vision['num_attention_heads'],
                    mlp_dim=vision['intermediate_size'], layer_norm_eps=float(vision['layer_norm_eps']),
                    qkv_bias=bool(vision.get('qkv_bias', True)))
  cfg.qformer.update(width=qformer['hidden_size'], num_layers=qformer['num_hidden_layers'],
                     num_heads=qformer['num_attention_heads'], mlp_dim=qformer['intermediate_size'],
                     vocab_size=qformer['vocab_size'], max_positions=qformer['max_position_embeddings'],
                     layer_norm_eps=float(qformer['layer_norm_eps']),
                     cross_attention_freq=qformer['cross_attention_frequency'],
                     num_query_tokens=hf['num_query_tokens'])
  # Hugging Face's post_layernorm (= ln_vision) uses the vision eps; LAVIS uses 1e-5.
  cfg.ln_vision_eps = float(vision['layer_norm_eps'])
  cfg.llm = llm_config_from_hf(hf['text_config'], cfg.llm)
  return cfg


def rope_inv_freq_check(llm: Any):
  """The check for `rotary_emb.inv_freq` buffers of LLaMA checkpoints saved by transformers < 4.31."""
  llm = configlib.from_dict(llama.LlamaConfig, llm, 'model.llm')
  return mappings.rope_inv_freq(llm.attention_head_dim, llm.rope_theta)


def hf_llama_config(llm: Any) -> dict:
  """Our `config.model.llm` -> a Hugging Face `LlamaConfig` as a dict (the `text_config` of InstructBLIP)."""
  cfg = configlib.from_dict(llama.LlamaConfig, llm, 'model.llm')
  return dict(model_type='llama', architectures=['LlamaForCausalLM'], vocab_size=cfg.vocab_size,
              hidden_size=cfg.width, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
              num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.attention_head_dim, intermediate_size=cfg.mlp_dim,
              hidden_act='silu', rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_positions,
              rope_parameters=dict(rope_type='default', rope_theta=cfg.rope_theta), rope_theta=cfg.rope_theta,
              attention_bias=False, mlp_bias=False, tie_word_embeddings=cfg.tie_word_embeddings,
              dtype=cfg.param_dtype)


def hf_instructblip_config(model: Any) -> dict:
  """Our `config.model` -> a Hugging Face `InstructBlipConfig` as a dict.

  Hugging Face applies `ln_vision` as the vision tower's `post_layernorm` with the vision eps, so a model
  whose `ln_vision_eps` differs (LAVIS: 1e-5 against EVA's 1e-6) cannot say so here; callers note it.
  """
  cfg = stllm.model_config(model)
  vision, qformer = cfg.vision, cfg.qformer
  return dict(
      model_type='instructblip', architectures=['InstructBlipForConditionalGeneration'],
      num_query_tokens=qformer.num_query_tokens,
      vision_config=dict(hidden_size=vision.width, intermediate_size=vision.mlp_dim, num_hidden_layers=vision.depth,
                         num_attention_heads=vision.num_heads, image_size=vision.image_size,
                         patch_size=vision.patch_size, hidden_act='gelu', layer_norm_eps=vision.layer_norm_eps,
                         qkv_bias=vision.qkv_bias),
      qformer_config=dict(hidden_size=qformer.width, num_hidden_layers=qformer.num_layers,
                          num_attention_heads=qformer.num_heads, intermediate_size=qformer.mlp_dim,
                          vocab_size=qformer.vocab_size, max_position_embeddings=qformer.max_positions,
                          layer_norm_eps=qformer.layer_norm_eps, hidden_act='gelu',
                          cross_attention_frequency=qformer.cross_attention_freq,
                          encoder_hidden_size=vision.width, position_embedding_type='absolute'),
      text_config=hf_llama_config(cfg.llm))


def _untie(tensors: Mapping[str, Any], lm_head_name: str, tied: bool) -> tuple[dict, Any]:
  """With tied embeddings, a source `lm_head.weight` is the embedding again: set it aside to compare."""
  tensors = dict(tensors)
  return tensors, (tensors.pop(lm_head_name, None) if tied else None)


def _check_tied(lm_head: Any, embedding: np.ndarray, name: str) -> None:
  if lm_head is not None and not np.array_equal(strict.to_numpy(lm_head).astype(embedding.dtype), embedding):
    raise ValueError(f'the config ties the LM head to the embedding, but {name} differs from the embedding')


def load_hf_instructblip(state_dict: Mapping[str, Any], hf_config: Any,
                         base: ml_collections.ConfigDict | None = None,
                         source_name: str = 'the InstructBLIP checkpoint') -> tuple[ml_collections.ConfigDict, dict]:
  """(HF InstructBLIP state dict, its config) -> (our config.model, params as a nested numpy tree)."""
  cfg = model_config_from_hf_instructblip(hf_config, base)
  tensors, lm_head = _untie(state_dict, 'language_model.lm_head.weight', cfg.llm.tie_word_embeddings)
  template = strict.abstract_leaves(stllm.abstract_variables(cfg))
  rules = mappings.hf_instructblip_rules(rope_inv_freq_check(cfg.llm))
  params = strict.load_strict(tensors, rules, template, source_name)
  _check_tied(lm_head, params['llm']['embed']['embedding'], 'language_model.lm_head.weight')
  return cfg, params


def load_hf_llama(state_dict: Mapping[str, Any], hf_config: Any,
                  base: ml_collections.ConfigDict | None = None,
                  source_name: str = 'the LLaMA checkpoint') -> tuple[ml_collections.ConfigDict, dict]:
  """(HF LlamaForCausalLM state dict, its config) -> (our config.model.llm, params of `Llama`)."""
  cfg = llm_config_from_hf(hf_config, base)
  tensors, lm_head = _untie(state_dict, 'lm_head.weight', cfg.tie_word_embeddings)
  llm_cfg = configlib.from_dict(llama.LlamaConfig, cfg, 'model.llm')
  llm_cfg.validate()
  template = strict.abstract_leaves(llama.abstract_variables(llm_cfg))
  params = strict.load_strict(tensors, mappings.llama_rules('', '', rope_inv_freq_check(cfg)), template, source_name)
  _check_tied(lm_head, params['embed']['embedding'], 'lm_head.weight')
  return cfg, params
