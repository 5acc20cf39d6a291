"""Shared building blocks: the dense layers' matmul with its chosen kernel-gradient layout, softmax with PyTorch's
derivative (attention has its own file, test_attention.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import relative_error
from stllm_jax.models import layers


@pytest.mark.parametrize('x_shape, kernel_shape, n_in', [
    ((2, 5, 8), (8, 12), 1),          # in < out: x is transposed for the kernel gradient
    ((2, 5, 12), (12, 8), 1),         # in > out: dy is
    ((3, 4, 6, 5), (6, 5, 7), 2),     # two contracted axes (an attention output projection), in < out
    ((3, 4, 6), (6, 2, 5), 1),        # two output axes (a query projection), in < out
    ((7, 20), (20, 3, 2), 1),         # in > out, two output axes
])
def test_contract_trailing_has_autodiffs_values_and_gradients(x_shape, kernel_shape, n_in):
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], x_shape)
  kernel = jax.random.normal(keys[1], kernel_shape)
  out_shape = x_shape[:len(x_shape) - n_in] + kernel_shape[n_in:]
  weights = jax.random.normal(keys[2], out_shape)
  ours = lambda x, k: jnp.sum(layers.contract_trailing(x, k, n_in) * weights)
  autodiff = lambda x, k: jnp.sum(layers.dot_trailing(x, k, n_in) * weights)
  assert layers.contract_trailing(x, kernel, n_in).shape == out_shape
  np.testing.assert_array_equal(layers.contract_trailing(x, kernel, n_in), layers.dot_trailing(x, kernel, n_in))
  for got, want in zip(jax.jit(jax.grad(ours, argnums=(0, 1)))(x, kernel),
                       jax.jit(jax.grad(autodiff, argnums=(0, 1)))(x, kernel)):
    assert got.shape == want.shape and got.dtype == want.dtype
    assert relative_error(got, want) < 1e-6


def test_contract_trailing_keeps_bfloat16():
  x = jnp.ones((2, 3, 4), jnp.bfloat16)
  kernel = jnp.ones((4, 6), jnp.bfloat16)
  grads = jax.grad(lambda x, k: jnp.sum(layers.contract_trailing(x, k, 1).astype(jnp.float32)), argnums=(0, 1))(
      x, kernel)
  assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16]
  np.testing.assert_array_equal(np.asarray(grads[1], np.float32), 6.0)  # every kernel entry sums 2 x 3 ones


def test_softmax_has_jax_nn_values_and_the_softmax_derivative():
  """The backward is y * (dy - sum(y * dy)): no division (autodiff of exp / sum has two per element)."""
  logits = jax.random.normal(jax.random.key(0), (3, 5, 40)) * 6
  logits = logits.at[0, 0, 10:].set(jnp.finfo(jnp.float32).min)  # a masked row, as attention masks them
  np.testing.assert_array_equal(layers.softmax(logits), jax.nn.softmax(logits, axis=-1))
  weights = jax.random.normal(jax.random.key(1), logits.shape)
  loss = lambda softmax: lambda x: jnp.sum(softmax(x) * weights)
  ours = jax.grad(loss(layers.softmax))(logits)
  probs = jax.nn.softmax(logits, axis=-1)
  assert relative_error(ours, probs * (weights - jnp.sum(probs * weights, axis=-1, keepdims=True))) < 1e-7
  assert relative_error(ours, jax.grad(loss(jax.nn.softmax))(logits)) < 1e-6
  divisions = lambda fn: str(jax.make_jaxpr(jax.grad(loss(fn)))(logits)).count(' div ')
  assert divisions(layers.softmax) == 1 < divisions(jax.nn.softmax)  # the forward's one
