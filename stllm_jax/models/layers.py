"""Building blocks shared by the three towers.

Every parameter is created through `param_init(init, axes)` so it carries logical axis names;
`stllm_jax.sharding` maps those names onto the mesh. Activations are annotated with
`constrain(x, axes)`, which is a no-op unless a mesh and the rule table are active.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}

# Activations the LLaMA block names with jax.ad_checkpoint.checkpoint_name, for the named policies below:
QKV_PROJ_NAMES = ('query_proj', 'key_proj', 'value_proj')  # queries, keys (RoPE applied) and values [B, L, H, hd]
# (The MLP's down projection has no name: the backward never reads its output, the stack keeps each block's input.)
PROJECTION_NAMES = QKV_PROJ_NAMES + (
    'out_proj',  # the attention's output projection [B, L, D]
    'mlp_gate', 'mlp_up')  # the SwiGLU's two input projections, before SiLU and product [B, L, F]

# What a rematerialised block keeps for the backward pass; the rest is recomputed there. The named policies
# save what the LLaMA block tags; in the other towers (no tags) they save nothing, as 'full' does.
REMAT_POLICIES = {
    'none': None,  # no rematerialisation: every activation is kept for the backward pass
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_with_no_batch_dims': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # q, k, v: the backward recomputes norms, attention, the output projection and the MLP
    'save_qkv_proj': jax.checkpoint_policies.save_only_these_names(*QKV_PROJ_NAMES),
    # every projection's output: the backward recomputes norms, attention and SiLU * up only
    'minimal': jax.checkpoint_policies.save_only_these_names(*PROJECTION_NAMES),
}


def as_dtype(name: str | Dtype) -> Dtype:
  """'bfloat16' -> jnp.bfloat16; dtypes pass through."""
  if isinstance(name, str):
    if name not in DTYPES:
      raise ValueError(f'unknown dtype {name!r}; choose one of {sorted(DTYPES)}')
    return DTYPES[name]
  return name


def fresh_containers(boxed: Any) -> Any:
  """The same leaves (boxed or not; both immutable) in new dicts and lists: a copy of a cached param tree that its
  caller may edit."""
  return jax.tree_util.tree_map(lambda leaf: leaf, boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


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
    if axis == tuple(range(x.ndim - len(axis), x.ndim)):
      matmul = contract_trailing if jax.default_backend() == 'cpu' else dot_trailing
      y = matmul(x.astype(self.dtype), kernel.astype(self.dtype), len(axis))
    else:
      y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                              ((axis, tuple(range(len(axis)))), ((), ())))
    if self.use_bias:
      bias = self.param('bias', param_init(self.bias_init, self.axes[len(axis):]), features, self.param_dtype)
      y = y + bias.astype(self.dtype)
    if self.lora_rank:
      y = y + LoRA(self.lora_rank, self.lora_alpha, features, self.axes, len(axis), self.dtype, self.param_dtype,
                   self.lora_dropout, name='lora')(x, axis)
    return y


def dot_trailing(x: Array, kernel: Array, n_in: int) -> Array:
  """x [..., *in] . kernel [*in, *out] -> [..., *out] with autodiff's gradient (what contract_trailing equals)."""
  return jax.lax.dot_general(x, kernel, ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def contract_trailing(x: Array, kernel: Array, n_in: int) -> Array:
  """x [..., *in] . kernel [*in, *out] -> [..., *out]: a dense layer's matmul, contracting x's last `n_in` axes.

  Its gradient is autodiff's, but it says which operand of the kernel gradient (x^T . dy, contracting every
  token) is transposed: the smaller of x and dy. Left to itself, XLA:CPU writes a transposed copy of whichever
  operand its matmul library needs, often the larger one (in a SwiGLU's gate and up projections the
  [tokens, mlp] gradient instead of the [tokens, embed] input): 9% of the bench_small train step (BENCHMARK.md,
  "The same A/B by vector instruction set"). The values are the same up to float rounding. Dense uses it on CPU
  only: GPU and TPU compilers choose their own operand layouts (not measured with it).
  """
  return dot_trailing(x, kernel, n_in)


def _contract_forward(x: Array, kernel: Array, n_in: int) -> tuple[Array, tuple[Array, Array]]:
  return dot_trailing(x, kernel, n_in), (x, kernel)


def _contract_backward(n_in: int, residuals: tuple[Array, Array], dy: Array) -> tuple[Array, Array]:
  x, kernel = residuals
  n_out, n_batch = kernel.ndim - n_in, x.ndim - n_in
  tokens = tuple(range(n_batch))
  dx = jax.lax.dot_general(dy, kernel, ((tuple(range(n_batch, dy.ndim)), tuple(range(n_in, kernel.ndim))), ((), ())))
  if math.prod(kernel.shape[:n_in]) <= math.prod(kernel.shape[n_in:]):
    x_t = jnp.transpose(x, tuple(range(n_batch, x.ndim)) + tokens)  # [*in, tokens...]
    dk = jax.lax.dot_general(x_t, dy, ((tuple(range(n_in, x.ndim)), tokens), ((), ())))  # [*in, *out]
  else:
    dy_t = jnp.transpose(dy, tuple(range(n_batch, dy.ndim)) + tokens)  # [*out, tokens...]
    dk_t = jax.lax.dot_general(dy_t, x, ((tuple(range(n_out, dy.ndim)), tokens), ((), ())))  # [*out, *in]
    dk = jnp.transpose(dk_t, tuple(range(n_out, n_out + n_in)) + tuple(range(n_out)))
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


contract_trailing.defvjp(_contract_forward, _contract_backward)


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


@jax.custom_jvp
def softmax(logits: Array) -> Array:
  """Softmax over the last axis, the values of `jax.nn.softmax`, with the derivative PyTorch's backward uses,
  y * (dx - sum(y * dx)), instead of autodiff's through exp, sum and divide (what jax.nn.softmax gives unless
  jax_softmax_custom_jvp is set): one reduction and no [.., S]-wide broadcast of 1 / sum^2 in the backward."""
  unnormalised = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
  return unnormalised / jnp.sum(unnormalised, axis=-1, keepdims=True)


@softmax.defjvp
def _softmax_jvp(primals: tuple[Array], tangents: tuple[Array]) -> tuple[Array, Array]:
  (logits,), (logits_dot,) = primals, tangents
  probs = softmax(logits)
  return probs, probs * (logits_dot - jnp.sum(probs * logits_dot, axis=-1, keepdims=True))


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


@flax.struct.dataclass
class AttentionMask:
  """Which keys each query sees, in the forms the attention implementations take: query i of sample b sees key
  j where every form given allows it. (A pytree: it passes through scanned layer stacks like an array.)"""
  mask: Array | None = None  # bool, broadcastable to [B, H, T, S], True where allowed (any pattern)
  key_mask: Array | None = None  # [B, S], nonzero where key j is a real token (padding anywhere)
  key_lengths: Array | None = None  # int32 [B]: keys j < key_lengths[b] are real (padding only at the end)
  is_causal: bool = flax.struct.field(pytree_node=False, default=False)  # j <= i (T == S)

  @property
  def allows_all(self) -> bool:
    return self.mask is None and self.key_mask is None and self.key_lengths is None and not self.is_causal

  def dense(self, query_len: int, key_len: int) -> Array:
    """Every form as one bool mask, broadcastable to [B, H, T, S]."""
    allowed = jnp.ones((1, 1, query_len, key_len), bool) if self.mask is None else self.mask.astype(bool)
    if self.is_causal:
      allowed = allowed & jnp.tril(jnp.ones((query_len, key_len), bool))[None, None]
    if self.key_mask is not None:
      allowed = allowed & _keys(self.key_mask)
    if self.key_lengths is not None:
      allowed = allowed & (jnp.arange(key_len)[None, :] < self.key_lengths[:, None])[:, None, None, :]
    return allowed


def _keys(key_mask: Array) -> Array:
  """[B, S] -> bool [B, 1, 1, S]."""
  return key_mask.astype(bool)[:, None, None, :]


def attention(query: Array, key: Array, value: Array, mask: AttentionMask | None, implementation: str | None,
              dropout_rate: float = 0.0, dropout_rng: Array | None = None) -> Array:
  """Softmax attention with logits and softmax in float32.

  query [B, T, H, hd]; key, value [B, S, Hkv, hd] with H a multiple of Hkv (grouped-query); `mask` None = every
  key. Returns [B, T, H, hd]. `implementation`: None (the backend's best: 'explicit' on CPUs, JAX's choice
  elsewhere), 'explicit' (`explicit_attention`, every step written out; long causal self-attention in two
  query halves, `causal_halves_attention`, when `splits_causally`), or `jax.nn.dot_product_attention`'s
  'xla' or 'cudnn' (cuDNN flash attention: NVIDIA GPUs, bfloat16 / float16, the head dims `cudnn_problem`
  accepts; `cudnn_arguments` gives it the mask in the forms it takes). On XLA:CPU the explicit form trains
  faster than jax.nn's (`python -m stllm_jax.benchmark attention`; BENCHMARK.md, "Attention and RoPE on CPUs").
  `dropout_rate` > 0 (training only, with `dropout_rng`) drops attention probabilities as BERT does; no fused
  kernel has dropout, so that case is computed by `explicit_attention` too (same float32 logits and softmax).
  """
  mask = AttentionMask() if mask is None else mask
  if dropout_rate > 0.0 and dropout_rng is None:
    raise ValueError(f'attention dropout {dropout_rate} needs a dropout rng')
  if implementation is None and jax.default_backend() == 'cpu':
    implementation = 'explicit'
  if implementation == 'explicit' or dropout_rate > 0.0:
    if dropout_rate == 0.0 and splits_causally(mask, query.shape[1], key.shape[1]):
      return causal_halves_attention(query, key, value, mask)
    allowed = None if mask.allows_all else mask.dense(query.shape[1], key.shape[1])
    return explicit_attention(query, key, value, allowed, dropout_rate, dropout_rng)
  if implementation == 'cudnn':
    check_cudnn(query)
    key, value, dense, key_lengths = cudnn_arguments(query.shape[1], key, value, mask)
  else:
    dense = mask.mask if mask.key_mask is None else _and(mask.mask, _keys(mask.key_mask))
    key_lengths = mask.key_lengths
  return jax.nn.dot_product_attention(query, key, value, mask=dense, is_causal=mask.is_causal,
                                      key_value_seq_lengths=key_lengths, implementation=implementation)


CAUSAL_SPLIT_MIN_LEN = 64  # below it the halves' smaller matmuls cost more than the work they skip (measured)


def splits_causally(mask: AttentionMask, query_len: int, key_len: int) -> bool:
  """Whether `causal_halves_attention` computes this attention: causal self-attention whose mask is causality
  and key lengths only, long enough to gain. (Each query then sees key 0 unless its sample has no keys at all.)"""
  return (mask.is_causal and mask.mask is None and mask.key_mask is None and query_len == key_len
          and query_len >= CAUSAL_SPLIT_MIN_LEN)


def causal_halves_attention(query: Array, key: Array, value: Array, mask: AttentionMask) -> Array:
  """`explicit_attention` of causal self-attention in two query halves: the first half's queries see none of the
  second half's keys, so its matmuls are [T/2, T/2], not [T/2, T]: 3/4 of the work. The keys it leaves out have
  probability exactly 0 in the full form, so the values are the same up to float rounding (the matmuls' sums
  split differently). [B, T, H, hd] in and out; `splits_causally` says when it applies."""
  half = query.shape[1] // 2
  allowed = mask.dense(query.shape[1], key.shape[1])  # [B or 1, 1, T, S]
  first = explicit_attention(query[:, :half], key[:, :half], value[:, :half], allowed[:, :, :half, :half])
  second = explicit_attention(query[:, half:], key, value, allowed[:, :, half:])
  return jnp.concatenate([first, second], axis=1)


def _and(mask: Array | None, other: Array) -> Array:
  return other if mask is None else mask.astype(bool) & other


def cudnn_arguments(query_len: int, key: Array, value: Array, mask: AttentionMask
                    ) -> tuple[Array, Array, Array | None, Array | None]:
  """(key, value, dense mask, key lengths) for cuDNN, allowing what `mask` allows (its causality stays a flag).

  cuDNN applies causality and key lengths itself (no mask in memory); it takes any other mask only as an
  additive bias spanning the whole [T, S] score matrix. So a key_mask of non-causal attention (the Q-Former's
  text padding) becomes key lengths after a stable reorder that puts each row's real keys first (attention does
  not depend on the order of its keys); any other mask is broadcast to [B or 1, H or 1, T, S] (a bias: under
  differentiation cuDNN then needs even T and S; the model's training passes give none).
  """
  if mask.key_mask is not None and mask.mask is None and mask.key_lengths is None and not mask.is_causal:
    real = mask.key_mask.astype(bool)  # [B, S]
    order = jnp.argsort(~real, axis=1, stable=True)  # [B, S]: real keys first, each group in its order
    take = lambda x: jnp.take_along_axis(x, order[:, :, None, None], axis=1)
    return take(key), take(value), None, jnp.sum(real, axis=1, dtype=jnp.int32)
  dense = mask.mask if mask.key_mask is None else _and(mask.mask, _keys(mask.key_mask))
  if dense is not None:
    dense = jnp.broadcast_to(dense.astype(bool), (*dense.shape[:2], query_len, key.shape[1]))
  return key, value, dense, mask.key_lengths


def cudnn_problem(platform: str, dtype: Dtype, head_dim: int, max_head_dim: int) -> str | None:
  """Why cuDNN flash attention cannot take these inputs, or None when it can."""
  if platform != 'gpu':
    return f"cuDNN flash attention needs an NVIDIA GPU; JAX's backend here is {platform!r}"
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f'cuDNN flash attention takes bfloat16 or float16, the model computes in {jnp.dtype(dtype).name}'
  if head_dim % 8 or head_dim > max_head_dim:
    return f'cuDNN flash attention needs a head dim that is a multiple of 8 and at most {max_head_dim}, got {head_dim}'
  return None


def check_cudnn(query: Array) -> None:
  """Raises a one-line error when cuDNN flash attention cannot run `query`'s attention on this machine."""
  device = jax.devices()[0]
  hopper_or_later = tuple(int(v) for v in getattr(device, 'compute_capability', '0.0').split('.')) >= (9, 0)
  problem = cudnn_problem(jax.default_backend(), query.dtype, query.shape[-1], 256 if hopper_or_later else 128)
  if problem:
    raise ValueError(f"model.attention_impl='cudnn': {problem}. Use 'xla' (or 'auto') instead.")


def explicit_attention(query: Array, key: Array, value: Array, allowed: Array | None, dropout_rate: float = 0.0,
                       rng: Array | None = None) -> Array:
  """softmax(q k^T / sqrt(hd)) v written out in float32 (the reference the fused paths are tested against);
  with `dropout_rate` > 0 each probability is dropped with that probability (kept ones / (1 - rate)).
  `allowed`: bool broadcastable to [B, H, T, S] or None."""
  groups = query.shape[2] // key.shape[2]
  key, value = jnp.repeat(key, groups, axis=2), jnp.repeat(value, groups, axis=2)  # [B, S, H, hd]
  # scaled before the product: [B, T, H, hd] elements, not [B, H, T, S]
  query = query.astype(jnp.float32) * query.shape[-1] ** -0.5
  # heads first, [B, H, T or S, hd]: XLA:CPU's batched matmul kernels take the contracted dimension last;
  # from [B, T, H, hd] XLA lays keys, values and the output out as [B, H, hd, S] instead (BENCHMARK.md)
  query, key, value = (jnp.swapaxes(x, 1, 2) for x in (query, key, value))
  logits = jnp.einsum('bhqd,bhkd->bhqk', query, key.astype(jnp.float32))
  if allowed is not None:
    # an additive bias, as Hugging Face's eager attention: float32's min absorbs any logit, so the values are
    # jnp.where's, and its backward is the identity where a select's wrote every [B, H, T, S] gradient again
    logits = logits + jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)
  probs = softmax(logits)  # [B, H, T, S]
  if dropout_rate > 0.0:
    keep = jax.random.bernoulli(rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
  return jnp.swapaxes(jnp.einsum('bhqk,bhkd->bhqd', probs.astype(value.dtype), value), 1, 2)


def check_scan_unroll(unroll: int, where: str) -> None:
  """A tower config's `scan_unroll` (LayerStack's `unroll`) is at least 1; `where` names the config."""
  if unroll < 1:
    raise ValueError(f'{where}.scan_unroll={unroll}: give at least 1 (layers per iteration of the loop)')


class LayerStack(nn.Module):
  """`num_layers` copies of `block`, unrolled or scanned, optionally rematerialised.

  A block is a module `block(config=..., dtype=..., attention_impl=..., name=...)` called as
  `x, _ = block(x, *args)`: the `(carry, None)` return is what `nn.scan` needs. Scanned params are
  stacked along a leading `layers` axis under `layers/`; unrolled ones live under `layers_{i}/`.
  `unroll` (scanned stacks): layers per iteration of the compiled loop (`lax.scan`'s unroll; `num_layers` or
  more: no loop). The params and their initialisation stay the scanned ones; only the program changes.
  """
  block: type[nn.Module]
  config: Any
  num_layers: int
  scan: bool
  remat_policy: str
  dtype: Dtype
  attention_impl: str | None = None
  unroll: int = 1

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
                             length=self.num_layers, unroll=self.unroll,
                             metadata_params={nn.PARTITION_NAME: 'layers'})
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
