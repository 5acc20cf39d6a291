"""Array fingerprints: every flipped bit is seen in every dtype, wherever the array lives (host, one device, sharded
over eight), and one program per kind of leaf serves every tree of the process."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stllm_jax import integrity

DTYPES = ('float32', 'bfloat16', 'float16', 'int32', 'uint8', 'bool', 'float64', 'int64')


def sample(dtype, shape=(8, 6), seed=0):
  values = np.random.default_rng(seed).normal(size=shape) * 100
  return np.asarray(values > 0 if dtype == 'bool' else values.astype(jnp.dtype(dtype)))


@pytest.mark.parametrize('dtype', DTYPES)
def test_every_flipped_bit_changes_both_sums(dtype):
  with jax.enable_x64(dtype in ('float64', 'int64')):
    x = sample(dtype)
    base = integrity.digests({'x': x})['x']
    bits = x.reshape(-1).view(np.uint8).copy()
    for byte in (0, 5, bits.size - 1):
      for bit in ((0,) if dtype == 'bool' else (0, 7)):  # a bool's one meaningful bit
        flipped = bits.copy()
        flipped[byte] ^= 1 << bit
        changed = integrity.digests({'x': flipped.view(x.dtype).reshape(x.shape)})['x']
        assert changed[0] != base[0] and changed[1] != base[1], (byte, bit)


def test_the_same_array_has_one_fingerprint_on_the_host_on_a_device_and_sharded():
  mesh = jax.make_mesh((8,), ('fsdp',), axis_types=(jax.sharding.AxisType.Auto,))
  x = sample('float32', (16, 12))
  sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('fsdp')))
  expected = integrity.digests({'x': x})
  assert integrity.digests({'x': jnp.asarray(x)}) == expected == integrity.digests({'x': sharded})
  assert integrity.digests({'x': x.T.copy()}) != expected  # the same values elsewhere: another fingerprint


def test_one_program_per_kind_of_leaf_serves_every_tree():
  tree = {'a': jnp.ones((5, 7)), 'b': jnp.zeros((3,), jnp.bfloat16)}
  integrity.digests(tree)
  shifted = tree['a'] + 1
  traced = []
  listener = lambda event, duration, **kwargs: traced.append(event) if event.endswith('jaxpr_trace_duration') else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    other = integrity.digests({'state': {'mu': tree, 'nu': tree}, 'extra': shifted})  # the same kinds of leaf
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert not traced
  assert other['state/mu/a'] == other['state/nu/a'] != other['extra']


def test_hundreds_of_sharded_leaves_are_fingerprinted_one_at_a_time():
  """A train state's worth of 8-way sharded leaves: each leaf's program sums across the devices, and on simulated
  CPU devices hundreds of them in flight at once starve XLA's collective rendezvous (the process aborts after 40 s)."""
  mesh = jax.make_mesh((8,), ('fsdp',), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('fsdp'))
  tree = {f'leaf{i}': jax.device_put(np.full((16, 4 + i % 3), i, np.float32), sharded) for i in range(300)}
  fingerprints = integrity.digests(tree)
  assert len(fingerprints) == 300 and fingerprints['leaf7'] == integrity.digests({'x': np.full((16, 5), 7.0)})['x']
