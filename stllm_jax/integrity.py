"""Exact fingerprints of saved arrays and JSON, so that a damaged checkpoint is refused instead of loaded.

Every checkpoint and weights directory stores, beside its arrays, a fingerprint of each array's bits
(`digests`) and of its own JSON (`json_sha256`); every load recomputes them and names what differs.

An array's fingerprint is two position-weighted sums of its bits as uint32 words, modulo 2^32, with odd
weights: flipping any bit changes both sums (2^b times an odd weight is never 0 mod 2^32), and any
other change goes unnoticed with probability about 2^-64. The sums run where the array lives (sharded
arrays are fingerprinted in place, across hosts), in one pass over memory: seconds for a 7B train state.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_GOLDEN = np.uint32(0x9E3779B9)  # 2^32 / golden ratio: spreads consecutive indices over all bits


def _words(x: jax.Array) -> jax.Array:
  """The bits of `x` as uint32, one word per element (8-byte elements folded into one word)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = x.dtype.itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size in (1, 2):
    return jax.lax.bitcast_convert_type(x, jnp.dtype(f'uint{8 * size}')).astype(jnp.uint32)
  if size == 8:
    halves = jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
    return halves[..., 0] ^ (halves[..., 1] * _GOLDEN)  # multiplying by an odd number is a bijection
  raise TypeError(f'cannot fingerprint arrays of dtype {x.dtype}')


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
  """Row-major element index, uint32 (wrapping), built from iotas so a sharded array is never reshaped."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride % 2**32)
    stride *= shape[axis]
  return index


def _digest(x: jax.Array) -> jax.Array:
  """uint32 [2]: sum(w * (2i + 1)) and sum(w * (i * golden | 1)) over the words w, mod 2^32."""
  words = _words(x)
  index = _flat_index(words.shape)
  first = jnp.sum(words * (index * np.uint32(2) + np.uint32(1)), dtype=jnp.uint32)
  second = jnp.sum(words * ((index * _GOLDEN) | np.uint32(1)), dtype=jnp.uint32)
  return jnp.stack([first, second])


# One program per leaf shape, dtype and sharding, shared by every tree of the process (params, train states, weights
# being converted): a model's trees have few distinct leaves, and a program over a whole tree compiles anew for each.
_digest_leaf = jax.jit(_digest)


def digests(tree: Any) -> dict[str, list[int]]:
  """{path: [a, b]} for every leaf of `tree` (jax arrays where they live, numpy arrays one at a time)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  # One leaf at a time: a host leaf (a conversion) is on the device alone, and a sharded leaf's program, which sums
  # across devices, never waits on another's (on simulated CPU devices, hundreds of such programs in flight at once
  # starve XLA's collective rendezvous).
  flat_values = [jax.device_get(_digest_leaf(leaf)) for _, leaf in flat]
  return {path_name(path): [int(v) for v in np.asarray(value)] for (path, _), value in zip(flat, flat_values)}


def path_name(path: tuple) -> str:
  """'params/llm/layers/attention/query/kernel' for a pytree key path."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def mismatches(expected: dict[str, list[int]], actual: dict[str, list[int]]) -> list[str]:
  """Paths whose fingerprints differ, or that only one side has."""
  return sorted(p for p in set(expected) | set(actual) if expected.get(p) != actual.get(p))


def json_sha256(value: Any) -> str:
  """sha256 of `value` as canonical JSON (sorted keys), the same before a save and after a load."""
  text = json.dumps(value, sort_keys=True, separators=(',', ':'), allow_nan=True)
  return hashlib.sha256(text.encode('utf-8')).hexdigest()
