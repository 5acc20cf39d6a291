"""LLaMA decoder (Vicuna v1.1 for ST-LLM; LLaMA-2/3 style bases through `num_kv_heads` and `rope_theta`).

Pre-norm blocks: RMSNorm -> causal self-attention with rotate-half RoPE -> residual, RMSNorm -> SwiGLU
-> residual; a final RMSNorm, then an untied (or tied) LM head. The module takes embeddings, not ids,
because ST-LLM feeds `[visual tokens : text embeddings]`; `embed_tokens` gives the text half.

The block names the outputs of its projections (`layers.PROJECTION_NAMES`: query_proj, key_proj, value_proj,
out_proj, mlp_gate, mlp_up) for the named remat policies of `layers.REMAT_POLICIES` (`llm.remat_policy`).

Generation passes a `KVCache` (static size S, written at `cache.index`): the same blocks and the same
attention function then attend from the L new tokens to all S cache slots, and return the updated cache.
"""

from __future__ import annotations

import dataclasses
import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from stllm_jax.models import layers
from stllm_jax.models.layers import Array, Dtype


LORA_TARGETS = ('query', 'key', 'value', 'out', 'gate', 'up', 'down')


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int = 32001  # LLaMA's 32000 + [PAD]
  width: int = 4096
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: int = 0  # 0: width // num_heads
  mlp_dim: int = 11008
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  max_positions: int = 2048
  tie_word_embeddings: bool = False
  param_dtype: str = 'float32'
  init_std: float = 0.02  # std of fresh Dense kernels (BERT/LLaMA's 0.02; larger for tiny from-scratch towers)
  scan_layers: bool = True
  scan_unroll: int = 1  # scanned layers per iteration of the compiled loop; num_layers: no loop (small models on CPUs)
  remat_policy: str = 'none'
  # LoRA (the paper's low-memory variant): rank 0 = off; targets among query, key, value, out, gate, up, down
  lora_rank: int = 0
  lora_alpha: float = 32.0  # the released code's (PEFT's scale alpha / r)
  lora_targets: tuple[str, ...] = ('query', 'value')
  lora_dropout: float = 0.05  # on the LoRA input, in training only

  def lora(self, name: str) -> dict:
    """Dense keyword arguments for the projection `name`."""
    return dict(lora_rank=self.lora_rank if name in self.lora_targets else 0, lora_alpha=self.lora_alpha,
                lora_dropout=self.lora_dropout)

  @property
  def attention_head_dim(self) -> int:
    return self.head_dim or self.width // self.num_heads

  def validate(self, where: str = 'llm') -> None:
    if not self.head_dim and self.width % self.num_heads:
      raise ValueError(f'{where}.width={self.width} is not a multiple of {where}.num_heads={self.num_heads}')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'{where}.num_heads={self.num_heads} is not a multiple of '
                       f'{where}.num_kv_heads={self.num_kv_heads}')
    if self.attention_head_dim % 2:
      raise ValueError(f'RoPE needs an even head dim, got {self.attention_head_dim}')
    layers.check_scan_unroll(self.scan_unroll, where)
    unknown = set(self.lora_targets) - set(LORA_TARGETS)
    if unknown:
      raise ValueError(f'{where}.lora_targets has {sorted(unknown)}; choose among {LORA_TARGETS}')


@flax.struct.dataclass
class RopeTables:
  """cos and sin of every rotary angle, computed once per forward and shared by every layer's queries and keys.

  `sin` carries the sign of rotate-half (its first half negated), so x rotated = x * cos + swap(x) * sin, where
  swap exchanges the two halves of the head dim. A pytree: it passes through scanned layer stacks like an array.
  """
  cos: Array  # float32 [B, L, 1, hd]
  sin: Array  # float32 [B, L, 1, hd], [-sin, sin] over the two halves


def rope_tables(positions: Array, head_dim: int, theta: float) -> RopeTables:
  """Rotate-half RoPE's tables for int positions [B, L], in float32."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [hd/2]
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, L, hd/2]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  return RopeTables(jnp.concatenate([cos, cos], axis=-1)[:, :, None, :],
                    jnp.concatenate([-sin, sin], axis=-1)[:, :, None, :])


def rotary_embedding(x: Array, rope: RopeTables) -> Array:
  """Rotate-half RoPE, computed in float32: x [B, L, H, hd] -> x * cos + [-x2, x1] * sin (halves x1, x2)."""
  x32 = x.astype(jnp.float32)
  first, second = jnp.split(x32, 2, axis=-1)
  swapped = jnp.concatenate([second, first], axis=-1)
  return (x32 * rope.cos + swapped * rope.sin).astype(x.dtype)


def causal_mask(attention_mask: Array, padding_last: bool) -> layers.AttentionMask:
  """Position i sees positions j <= i that are not padding (attention_mask [B, L], 1 = real token).

  `padding_last`: every row is real tokens, then padding: the key lengths suffice (what cuDNN applies without
  a mask in memory, at any length, also under differentiation); otherwise the padding stays a key mask.
  """
  if padding_last:
    return layers.AttentionMask(key_lengths=jnp.sum(attention_mask, axis=1, dtype=jnp.int32), is_causal=True)
  return layers.AttentionMask(key_mask=attention_mask, is_causal=True)


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer for S slots; slots [0, index) are written."""
  key: Array  # [layers, B, S, Hkv, hd]
  value: Array  # [layers, B, S, Hkv, hd]
  index: Array  # int32 []: the slot the next token goes to


def init_cache(config: LlamaConfig, batch: int, length: int, dtype: Dtype = jnp.float32) -> KVCache:
  """An empty cache of `length` slots (prompt + new tokens) for `batch` sequences."""
  shape = (config.num_layers, batch, length, config.num_kv_heads, config.attention_head_dim)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))


def cached_causal_mask(slot_mask: Array, index: Array, length: int) -> layers.AttentionMask:
  """New token i (in slot index + i) sees slots j <= index + i that hold real tokens (a dense [B, 1, L, S] mask).

  slot_mask [B, S]: 1 where a slot holds (or, after this call, will hold) a real token.
  """
  slots = jnp.arange(slot_mask.shape[1])
  causal = slots[None, :] <= index + jnp.arange(length)[:, None]  # [L, S]
  return layers.AttentionMask(mask=causal[None, None] & slot_mask.astype(bool)[:, None, None, :])


class LlamaAttention(nn.Module):
  config: LlamaConfig
  dtype: Dtype
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x: Array, mask: layers.AttentionMask, rope: RopeTables, cache_index: Array | None = None,
               layer_cache: tuple[Array, Array] | None = None) -> tuple[Array, tuple[Array, Array] | None]:
    """-> (output [B, L, D], this layer's updated (key, value) cache or None).

    With `layer_cache` ([B, S, Hkv, hd] each), this call's keys and values are written at `cache_index`
    and the queries attend over all S slots (`mask` over [L, S]).
    """
    cfg = self.config
    pdt = layers.as_dtype(cfg.param_dtype)
    hd = cfg.attention_head_dim
    project = lambda name, n_heads, axis: layers.dense(
        (n_heads, hd), ('embed', axis, 'head_dim'), use_bias=False, name=name, dtype=self.dtype,
        param_dtype=pdt, **cfg.lora(name), init_std=cfg.init_std)(x)
    query = checkpoint_name(rotary_embedding(project('query', cfg.num_heads, 'heads'), rope),
                            'query_proj')  # [B, L, H, hd]
    key = checkpoint_name(rotary_embedding(project('key', cfg.num_kv_heads, 'kv_heads'), rope),
                          'key_proj')  # [B, L, Hkv, hd]
    value = checkpoint_name(project('value', cfg.num_kv_heads, 'kv_heads'), 'value_proj')  # [B, L, Hkv, hd]
    query = layers.constrain(query, ('activation_batch', 'activation_length', 'activation_heads', None))
    new_cache = None
    if layer_cache is not None:
      write = lambda stored, new: jax.lax.dynamic_update_slice(stored, new.astype(stored.dtype), (0, cache_index, 0, 0))
      key, value = new_cache = (write(layer_cache[0], key), write(layer_cache[1], value))  # [B, S, Hkv, hd]
    out = layers.attention(query, key, value, mask, self.attention_impl)  # [B, L, H, hd]
    out = layers.dense(cfg.width, ('heads', 'head_dim', 'embed'), axis=(-2, -1), use_bias=False, name='out',
                       dtype=self.dtype, param_dtype=pdt, **cfg.lora('out'), init_std=cfg.init_std)(out)
    return checkpoint_name(out, 'out_proj'), new_cache  # [B, L, D]


class LlamaMLP(nn.Module):
  config: LlamaConfig
  dtype: Dtype

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    pdt = layers.as_dtype(cfg.param_dtype)
    up = lambda name: layers.dense(cfg.mlp_dim, ('embed', 'mlp'), use_bias=False, name=name, dtype=self.dtype,
                                   param_dtype=pdt, **cfg.lora(name), init_std=cfg.init_std)(x)
    h = nn.silu(checkpoint_name(up('gate'), 'mlp_gate')) * checkpoint_name(up('up'), 'mlp_up')  # [B, L, F]
    h = layers.constrain(h, ('activation_batch', 'activation_length', 'activation_mlp'))
    return layers.dense(cfg.width, ('mlp', 'embed'), use_bias=False, name='down', dtype=self.dtype,
                        param_dtype=pdt, **cfg.lora('down'), init_std=cfg.init_std)(h)


class LlamaBlock(nn.Module):
  config: LlamaConfig
  dtype: Dtype
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x: Array, mask: layers.AttentionMask, rope: RopeTables, cache_index: Array | None = None,
               layer_cache: tuple[Array, Array] | None = None) -> tuple[Array, tuple[Array, Array] | None]:
    cfg = self.config
    norm = lambda name: layers.RMSNorm(cfg.rms_norm_eps, dtype=self.dtype,
                                       param_dtype=layers.as_dtype(cfg.param_dtype), name=name)
    attended, new_cache = LlamaAttention(cfg, self.dtype, self.attention_impl, name='attention')(
        norm('attention_norm')(x), mask, rope, cache_index, layer_cache)
    x = x + attended
    x = x + LlamaMLP(cfg, self.dtype, name='mlp')(norm('mlp_norm')(x))
    return layers.constrain(x, ('activation_batch', 'activation_length', 'activation_embed')), new_cache


class Llama(nn.Module):
  """`embed_tokens(ids)`, then `__call__(embeddings, mask, positions)` -> final hidden, then `logits(hidden)`."""
  config: LlamaConfig
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  def setup(self):
    cfg = self.config
    pdt = layers.as_dtype(cfg.param_dtype)
    self.embed = nn.Embed(cfg.vocab_size, cfg.width, dtype=self.dtype, param_dtype=pdt,
                          embedding_init=layers.param_init(nn.initializers.normal(0.02), ('vocab', 'embed')))
    self.blocks = layers.LayerStack(LlamaBlock, cfg, cfg.num_layers, cfg.scan_layers, cfg.remat_policy,
                                    self.dtype, self.attention_impl, unroll=cfg.scan_unroll)
    self.final_norm = layers.RMSNorm(cfg.rms_norm_eps, dtype=self.dtype, param_dtype=pdt)
    if not cfg.tie_word_embeddings:
      self.lm_head = layers.dense(cfg.vocab_size, ('embed', 'vocab'), use_bias=False, dtype=self.dtype,
                                  param_dtype=pdt, init_std=cfg.init_std)

  def embed_tokens(self, input_ids: Array) -> Array:  # [B, L] -> [B, L, D]
    return self.embed(input_ids)

  def __call__(self, embeddings: Array, attention_mask: Array, positions: Array | None = None,
               cache: KVCache | None = None, padding_last: bool = False) -> Array | tuple[Array, KVCache]:
    """embeddings [B, L, D], attention_mask [B, L] (1 = real token) -> final hidden states [B, L, D].

    `padding_last` (without a cache): the caller guarantees that every row of attention_mask is ones, then
    zeros; attention then masks by key lengths (see `causal_mask`). Padding elsewhere needs the default, False.

    With `cache` (S slots): the L tokens go into slots [cache.index, cache.index + L); attention_mask is
    then [B, S] over the slots (1 = real token, these L included) and `positions` [B, L] must be given;
    returns (hidden [B, L, D], the cache with index + L).
    """
    if cache is not None:
      length = embeddings.shape[1]
      x = layers.constrain(embeddings.astype(self.dtype), ('activation_batch', 'activation_length', 'activation_embed'))
      x, (key, value) = self.blocks(x, cached_causal_mask(attention_mask, cache.index, length), self.rope(positions),
                                    cache.index, per_layer=(cache.key, cache.value))
      return self.final_norm(x), KVCache(key, value, cache.index + length)
    batch, length = attention_mask.shape
    if length > self.config.max_positions:
      raise ValueError(f'the LLM input has {length} tokens, more than llm.max_positions='
                       f'{self.config.max_positions}: use fewer frames or shorter text')
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    x = layers.constrain(embeddings.astype(self.dtype), ('activation_batch', 'activation_length', 'activation_embed'))
    x = self.blocks(x, causal_mask(attention_mask, padding_last), self.rope(positions))
    return self.final_norm(x)

  def rope(self, positions: Array) -> RopeTables:
    return rope_tables(positions, self.config.attention_head_dim, self.config.rope_theta)

  def logits(self, hidden: Array) -> Array:
    """[B, L, D] -> float32 logits [B, L, vocab]."""
    if self.config.tie_word_embeddings:
      logits = self.embed.attend(hidden)
    else:
      logits = self.lm_head(hidden)
    return layers.constrain(logits, ('activation_batch', 'activation_length', 'activation_vocab')).astype(jnp.float32)

  def forward_ids(self, input_ids: Array, attention_mask: Array) -> Array:
    """Plain causal LM on token ids: [B, L] -> logits [B, L, vocab]."""
    return self.logits(self(self.embed_tokens(input_ids), attention_mask))


def abstract_variables(config: LlamaConfig, dtype: Dtype = jnp.float32) -> dict:
  """Shapes, dtypes and logical axes of every parameter of a stand-alone LLM (boxed), allocating nothing; traced
  once per config and process, each call getting its own containers."""
  return layers.fresh_containers(_abstract_variables(config, dtype))


@functools.lru_cache(maxsize=8)
def _abstract_variables(config: LlamaConfig, dtype: Dtype) -> dict:
  ids = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(lambda: Llama(config, dtype).init(jax.random.key(0), ids, ids + 1, method='forward_ids'))
