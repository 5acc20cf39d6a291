"""Building blocks shared by the three towers.

Every parameter is created through `param_init(init, axes)` so it carries logical axis names;
`stllm_jax.sharding` maps those names onto the mesh. Activations are annotated with
`constrain(x, axes)`, which is a no-op unless a mesh and the rule table are active.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}

REMAT_POLICIES = {
    'none': None,  # no rematerialisation: every activation is kept for the backward pass
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_with_no_batch_dims': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def as_dtype(name: str | Dtype) -> Dtype:
  """'bfloat16' -> jnp.bfloat16; dtypes pass through."""
  if isinstance(name, str):
    if name not in DTYPES:
      raise ValueError(f'unknown dtype {name!r}; choose one of {sorted(DTYPES)}')
    return DTYPES[name]
  return name


def param_init(init: Callable, axes: Sequence[str | None]) -> Callable:
  """An initializer whose parameter carries the logical axis names `axes`."""
  return nn.with_logical_partitioning(init, tuple(axes))


def constrain(x: Array, axes: Sequence[str | None]) -> Array:
  """Sharding constraint on an activation by logical axis names (no-op without active rules)."""
  return nn.with_logical_constraint(x, tuple(axes))


class Dense(nn.Module):
  """y = x . kernel + bias, contracting `axis` of x with the leading kernel dims.

  The kernel has logical axes `axes` (input axes, then output axes). Attention projections keep heads as
  their own axis (a query kernel is [embed, heads, head_dim], an output kernel [heads, head_dim, embed])
  so heads shard without reshapes. (flax's DenseGeneral initialises a flattened kernel, which breaks
  under an active mesh; this one creates the kernel in its real shape.)
  """
  features: int | tuple[int, ...]
  axes: tuple[str | None, ...]
  axis: int | tuple[int, ...] = -1
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = nn.initializers.normal(0.02)
  lora_rank: int = 0  # > 0 adds a low-rank update (see LoRA)
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = self.features if isinstance(self.features, tuple) else (self.features,)
    axis = self.axis if isinstance(self.axis, tuple) else (self.axis,)
    axis = tuple(a % x.ndim for a in axis)
    kernel_shape = tuple(x.shape[a] for a in axis) + features
    if len(self.axes) != len(kernel_shape):
      raise ValueError(f'{self.name}: {len(self.axes)} axis names {self.axes} for a kernel of shape {kernel_shape}')
    kernel = self.param('kernel', param_init(self.kernel_init, self.axes), kernel_shape, self.param_dtype)
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                            ((axis, tuple(range(len(axis)))), ((), ())))
    if self.use_bias:
      bias = self.param('bias', param_init(self.bias_init, self.axes[len(axis):]), features, self.param_dtype)
      y = y + bias.astype(self.dtype)
    if self.lora_rank:
      y = y + LoRA(self.lora_rank, self.lora_alpha, features, self.axes, len(axis), self.dtype, self.param_dtype,
                   self.lora_dropout, name='lora')(x, axis)
    return y


def torch_linear_init(fan_in: int) -> Callable:
  """PyTorch's nn.Linear default for its weight and its bias alike: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
  (kaiming_uniform with a = sqrt(5) for the weight)."""
  bound = 1.0 / fan_in ** 0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class LoRA(nn.Module):
  """Low-rank update (alpha / r) * (dropout(x) . A) . B of a frozen Dense, as PEFT computes it: A [in..., r]
  PyTorch's Linear default, B [r, out...] zero; dropout on the input only in training (when the caller
  gives a 'dropout' rng, as the training pass does).

  B starts at zero, so a model with fresh LoRA weights computes exactly what its base does.
  """
  rank: int
  alpha: float
  features: tuple[int, ...]
  axes: tuple[str | None, ...]  # the base kernel's axes
  n_in: int  # number of contracted input axes
  dtype: Dtype
  param_dtype: Dtype
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: Array, axis: tuple[int, ...]) -> Array:
    in_shape = tuple(x.shape[a] for a in axis)
    a_init = torch_linear_init(math.prod(in_shape))
    a = self.param('a', param_init(a_init, (*self.axes[:self.n_in], None)), (*in_shape, self.rank), self.param_dtype)
    if self.dropout > 0 and self.has_rng('dropout'):
      x = nn.Dropout(self.dropout, deterministic=False)(x)
    b = self.param('b', param_init(nn.initializers.zeros, (None, *self.axes[self.n_in:])),
                   (self.rank, *self.features), self.param_dtype)
    h = jax.lax.dot_general(x.astype(self.dtype), a.astype(self.dtype), ((axis, tuple(range(self.n_in))), ((), ())))
    y = jax.lax.dot_general(h, b.astype(self.dtype), (((h.ndim - 1,), (0,)), ((), ())))
    return y * (self.alpha / self.rank)


def dense(features, axes: Sequence[str | None], *, name: str | None = None, dtype: Dtype, param_dtype: Dtype,
          axis: int | tuple[int, ...] = -1, use_bias: bool = True, lora_rank: int = 0,
          lora_alpha: float = 16.0, lora_dropout: float = 0.0, init_std: float = 0.02) -> Dense:
  """A `Dense` (keyword shorthand used by the towers); kernels start as normal(init_std)."""
  return Dense(features, tuple(axes), axis, use_bias, dtype, param_dtype, nn.initializers.normal(init_std),
               lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, name=name)


class LayerNorm(nn.Module):
  """LayerNorm as torch computes it: float32, two passes (mean, then variance of the centred input).

  Flax's own LayerNorm defaults to E[x^2] - E[x]^2, which loses digits against PyTorch.
  """
  epsilon: float
  dtype: Dtype = jnp.float32  # output dtype
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = x.shape[-1]
    scale = self.param('scale', param_init(nn.initializers.ones, ('norm',)), (features,), self.param_dtype)
    bias = self.param('bias', param_init(nn.initializers.zeros, ('norm',)), (features,), self.param_dtype)
    x = x.astype(jnp.float32)
    centred = x - jnp.mean(x, axis=-1, keepdims=True)
    variance = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(variance + self.epsilon)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class RMSNorm(nn.Module):
  """LLaMA's RMSNorm: normalise in float32, cast to the compute dtype, then scale."""
  epsilon: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param('scale', param_init(nn.initializers.ones, ('norm',)), (x.shape[-1],), self.param_dtype)
    x = x.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
    return y.astype(self.dtype) * scale.astype(self.dtype)


def attention(query: Array, key: Array, value: Array, mask: Array | None, implementation: str | None,
              dropout_rate: float = 0.0, dropout_rng: Array | None = None) -> Array:
  """Softmax attention with logits and softmax in float32.

  query [B, Lq, H, hd]; key, value [B, Lk, Hkv, hd] with H a multiple of Hkv (grouped-query);
  mask bool, broadcastable to [B, H, Lq, Lk], True where attention is allowed. Returns [B, Lq, H, hd].
  `dropout_rate` > 0 (training only, with `dropout_rng`) drops attention probabilities as BERT does; the
  fused kernel has no dropout, so that case is computed explicitly (same float32 logits and softmax).
  """
  if dropout_rate == 0.0:
    return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation=implementation)
  if dropout_rng is None:
    raise ValueError(f'attention dropout {dropout_rate} needs a dropout rng')
  return _attention_with_dropout(query, key, value, mask, dropout_rate, dropout_rng)


def _attention_with_dropout(query: Array, key: Array, value: Array, mask: Array | None, rate: float,
                            rng: Array) -> Array:
  """softmax(q k^T / sqrt(hd)) with each probability dropped with probability `rate` (kept ones / (1 - rate))."""
  groups = query.shape[2] // key.shape[2]
  key, value = jnp.repeat(key, groups, axis=2), jnp.repeat(value, groups, axis=2)  # [B, Lk, H, hd]
  scale = query.shape[-1] ** -0.5
  logits = jnp.einsum('bqhd,bkhd->bhqk', query.astype(jnp.float32), key.astype(jnp.float32)) * scale
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)  # [B, H, Lq, Lk]
  keep = jax.random.bernoulli(rng, 1.0 - rate, probs.shape)
  probs = jnp.where(keep, probs / (1.0 - rate), 0.0)
  return jnp.einsum('bhqk,bkhd->bqhd', probs.astype(value.dtype), value)


class LayerStack(nn.Module):
  """`num_layers` copies of `block`, unrolled or scanned, optionally rematerialised.

  A block is a module `block(config=..., dtype=..., attention_impl=..., name=...)` called as
  `x, _ = block(x, *args)`: the `(carry, None)` return is what `nn.scan` needs. Scanned params are
  stacked along a leading `layers` axis under `layers/`; unrolled ones live under `layers_{i}/`.
  """
  block: type[nn.Module]
  config: Any
  num_layers: int
  scan: bool
  remat_policy: str
  dtype: Dtype
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x: Array, *args, per_layer: Any = None, keep_last: int = 0) -> Array | tuple[Array, Any]:
    """`x` through every block; `args` go to each block unchanged.

    `per_layer` (a pytree whose leaves have a leading `num_layers` axis, e.g. a KV cache) gives block i
    its slice i as a last argument; then the blocks' second outputs come back stacked: returns (x, ys).
    `keep_last` = k > 0 returns the outputs of the last k blocks instead, stacked [k, *x.shape] (the
    last of them is the usual output); the params are the same either way.
    """
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f'unknown remat_policy {self.remat_policy!r}; choose one of {sorted(REMAT_POLICIES)}')
    if not 0 <= keep_last <= self.num_layers:
      raise ValueError(f'keep_last={keep_last} outside 0..{self.num_layers} (the number of layers)')
    if keep_last and per_layer is not None:
      raise ValueError('keep_last and per_layer cannot be combined')
    block = self.block
    if self.remat_policy != 'none':
      block = nn.remat(block, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=not self.scan)
    kwargs = dict(config=self.config, dtype=self.dtype, attention_impl=self.attention_impl)
    scan = functools.partial(nn.scan, variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
                             length=self.num_layers, metadata_params={nn.PARTITION_NAME: 'layers'})
    first_kept = self.num_layers - keep_last
    if keep_last and self.scan:
      # The carry holds a [k, ...] buffer; layer i >= first_kept writes its output into slot i - first_kept.
      def body(layer, carry, index, *args):
        x, kept = carry
        x, _ = layer(x, *args)
        slot = jnp.clip(index - first_kept, 0, keep_last - 1)
        written = jnp.where(index >= first_kept, x, kept[slot])
        return (x, jax.lax.dynamic_update_index_in_dim(kept, written, slot, 0)), None
      buffer = jnp.zeros((keep_last, *x.shape), x.dtype)  # [k, *x.shape]
      stack = scan(body, in_axes=(0,) + (nn.broadcast,) * len(args))
      (_, kept), _ = stack(block(name='layers', **kwargs), (x, buffer), jnp.arange(self.num_layers), *args)
      return kept
    if keep_last:
      kept = []
      for i in range(self.num_layers):
        x, _ = block(name=f'layers_{i}', **kwargs)(x, *args)
        if i >= first_kept:
          kept.append(x)
      return jnp.stack(kept)  # [k, *x.shape]
    if per_layer is None:
      if self.scan:
        x, _ = scan(block, in_axes=nn.broadcast)(name='layers', **kwargs)(x, *args)
        return x
      for i in range(self.num_layers):
        x, _ = block(name=f'layers_{i}', **kwargs)(x, *args)
      return x
    if self.scan:
      stack = scan(block, in_axes=(nn.broadcast,) * len(args) + (0,))
      return stack(name='layers', **kwargs)(x, *args, per_layer)
    outputs = []
    for i in range(self.num_layers):
      x, y = block(name=f'layers_{i}', **kwargs)(x, *args, jax.tree_util.tree_map(lambda a, i=i: a[i], per_layer))
      outputs.append(y)
    return x, jax.tree_util.tree_map(lambda *ys: jnp.stack(ys), *outputs)
