"""The instruction-aware Q-Former of InstructBLIP (a BERT-base with learned queries).

Input sequence: `[32 learned queries ; instruction tokens]` (word + absolute position embeddings on the
text, one LayerNorm over both). Every layer runs bidirectional self-attention over the whole sequence;
in every `cross_attention_freq`-th layer the query positions also cross-attend to the image tokens;
query and text positions then go through separate feed-forward networks. Post-norm (BERT): each
sub-layer is `LayerNorm(x + f(x))` with eps 1e-12. Only the query outputs leave the module.

Dropout (BERT's, `dropout` for both kinds; training only, with deterministic=False and a 'dropout' rng):
on the attention probabilities of every self- and cross-attention, and on the hidden states after the
embedding LayerNorm, after each attention output projection and after each FFN output projection (the
last two before their residual LayerNorm).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from stllm_jax.models import layers
from stllm_jax.models.layers import Array, Dtype


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
  width: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  vocab_size: int = 30523  # BERT uncased + [DEC]
  max_positions: int = 512
  layer_norm_eps: float = 1e-12
  cross_attention_freq: int = 2
  num_query_tokens: int = 32
  param_dtype: str = 'float32'
  init_std: float = 0.02  # std of fresh Dense kernels (BERT/LLaMA's 0.02; larger for tiny from-scratch towers)
  dropout: float = 0.0  # BERT dropout (attention probabilities and hidden states), training only; BERT-base: 0.1

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  def validate(self, where: str = 'qformer') -> None:
    if self.width % self.num_heads:
      raise ValueError(f'{where}.width={self.width} is not a multiple of {where}.num_heads={self.num_heads}')
    if self.cross_attention_freq < 1:
      raise ValueError(f'{where}.cross_attention_freq must be >= 1, got {self.cross_attention_freq}')
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f'{where}.dropout must be in [0, 1), got {self.dropout}')


class BertAttention(nn.Module):
  """Multi-head attention, output projection, then LayerNorm(input + output)."""
  config: QFormerConfig
  dtype: Dtype
  attention_impl: str | None = None
  cross: bool = False  # keys and values come from the image tokens (vision width)

  @nn.compact
  def __call__(self, x: Array, context: Array, mask: layers.AttentionMask | None, deterministic: bool) -> Array:
    cfg = self.config
    pdt = layers.as_dtype(cfg.param_dtype)
    heads = (cfg.num_heads, cfg.head_dim)
    context_axis = 'source_embed' if self.cross else 'embed'
    project = lambda name, axis, y: layers.dense(heads, (axis, 'heads', 'head_dim'), name=name,
                                                 dtype=self.dtype, param_dtype=pdt, init_std=cfg.init_std)(y)
    dropout = 0.0 if deterministic else cfg.dropout
    out = layers.attention(project('query', 'embed', x), project('key', context_axis, context),
                           project('value', context_axis, context), mask, self.attention_impl,
                           dropout, self.make_rng('dropout') if dropout else None)
    out = layers.dense(cfg.width, ('heads', 'head_dim', 'embed'), axis=(-2, -1), name='out',
                       dtype=self.dtype, param_dtype=pdt, init_std=cfg.init_std)(out)
    out = nn.Dropout(cfg.dropout)(out, deterministic)
    return layers.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, param_dtype=pdt, name='norm')(x + out)


class BertFeedForward(nn.Module):
  """Dense, exact GELU, dense, then LayerNorm(input + output)."""
  config: QFormerConfig
  dtype: Dtype

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    cfg = self.config
    pdt = layers.as_dtype(cfg.param_dtype)
    dense = lambda features, axes, name: layers.dense(features, axes, name=name, dtype=self.dtype, param_dtype=pdt,
                                                      init_std=cfg.init_std)
    h = nn.gelu(dense(cfg.mlp_dim, ('embed', 'mlp'), 'fc1')(x), approximate=False)
    out = nn.Dropout(cfg.dropout)(dense(cfg.width, ('mlp', 'embed'), 'fc2')(h), deterministic)
    return layers.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, param_dtype=pdt, name='norm')(x + out)


class QFormerLayer(nn.Module):
  config: QFormerConfig
  has_cross_attention: bool
  dtype: Dtype
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x: Array, image_tokens: Array, self_mask: layers.AttentionMask, deterministic: bool) -> Array:
    n_query = self.config.num_query_tokens
    x = BertAttention(self.config, self.dtype, self.attention_impl, name='self_attention')(x, x, self_mask,
                                                                                          deterministic)
    queries, text = x[:, :n_query], x[:, n_query:]
    if self.has_cross_attention:
      queries = BertAttention(self.config, self.dtype, self.attention_impl, cross=True,
                              name='cross_attention')(queries, image_tokens, None, deterministic)
    queries = BertFeedForward(self.config, self.dtype, name='query_ffn')(queries, deterministic)
    text = BertFeedForward(self.config, self.dtype, name='text_ffn')(text, deterministic)
    return jnp.concatenate([queries, text], axis=1)


class QFormer(nn.Module):
  """(image tokens [N, P, Dv], instruction ids [N, Lq], mask [N, Lq]) -> query outputs [N, 32, width].

  `deterministic=False` turns dropout on (training; needs a 'dropout' rng when `config.dropout` > 0).
  """
  config: QFormerConfig
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, image_tokens: Array, input_ids: Array, attention_mask: Array,
               deterministic: bool = True) -> Array:
    cfg = self.config
    pdt = layers.as_dtype(cfg.param_dtype)
    n, text_len = input_ids.shape
    if text_len > cfg.max_positions:
      raise ValueError(f'Q-Former text of {text_len} tokens exceeds qformer.max_positions={cfg.max_positions}')
    init = nn.initializers.normal(0.02)
    query_tokens = self.param('query_tokens', layers.param_init(init, (None, None, 'embed')),
                              (1, cfg.num_query_tokens, cfg.width), pdt)
    embed = lambda name, size, axis: nn.Embed(size, cfg.width, dtype=self.dtype, param_dtype=pdt, name=name,
                                              embedding_init=layers.param_init(init, (axis, 'embed')))
    text = embed('word_embeddings', cfg.vocab_size, 'vocab')(input_ids)
    text = text + embed('position_embeddings', cfg.max_positions, None)(jnp.arange(text_len))[None]
    queries = jnp.broadcast_to(query_tokens.astype(self.dtype), (n, cfg.num_query_tokens, cfg.width))
    x = layers.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, param_dtype=pdt,
                         name='embed_norm')(jnp.concatenate([queries, text], axis=1))
    x = nn.Dropout(cfg.dropout)(x, deterministic)
    # Queries are always visible; text positions follow their padding mask.
    key_mask = jnp.concatenate([jnp.ones((n, cfg.num_query_tokens), bool), attention_mask.astype(bool)], axis=1)
    self_mask = layers.AttentionMask(key_mask=key_mask)  # [N, 32 + Lq]
    for i in range(cfg.num_layers):
      x = QFormerLayer(cfg, i % cfg.cross_attention_freq == 0, self.dtype, self.attention_impl,
                       name=f'layers_{i}')(x, image_tokens, self_mask, deterministic)
    return x[:, :cfg.num_query_tokens]
