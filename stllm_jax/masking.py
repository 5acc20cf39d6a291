"""Dynamic video-token masking (paper section 3.2) with static shapes.

One mask rate per training step, rho ~ Normal(mean, std) clipped to [low, high]. Every sample keeps
exactly `Nv - int(rho * Nv)` of its Nv visual tokens (the released code's count), at its own random
positions over the flat T*K sequence; the dropped tokens are removed (no mask token), the kept ones keep
their order and the shortened sequence gets contiguous positions.

For static shapes, the kept tokens sit in `n_slots` slots, the smallest of a fixed set of bucket sizes
(fractions of Nv) that holds them: the first `n_keep` slots are the kept tokens, the rest padding that the
training pass moves behind the text, where causal attention keeps every real token from seeing it and no
loss reads it. A whole run compiles at most one train step per bucket (`n_slots` is static, `n_keep` a
traced scalar). The rate and the counts are chosen on the host; the positions are drawn on the device, in
the jitted step, from a PRNG key.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class MaskingConfig:
  enabled: bool = True
  mean: float = 0.5
  std: float = 0.1
  low: float = 0.3  # the paper's bounds; the released code used 0.1
  high: float = 0.7
  # The kept tokens are padded up to the smallest of these fractions of the visual tokens that holds them
  # (or to all of them): the static shapes of a run. Padding costs compute, not exactness.
  keep_buckets: tuple[float, ...] = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)
  # True: keep the whole bucket (n_keep = n_slots), so a run sees only the bucket lengths and the realised
  # rate is biased low (stllm_jax before exact counts; the built-in demo's tiny LLM needs it, configs/demo.py).
  round_to_bucket: bool = False

  def validate(self, where: str = 'train.masking') -> None:
    if not 0 <= self.low <= self.high < 1:
      raise ValueError(f'{where}: need 0 <= low <= high < 1, got low={self.low}, high={self.high}')
    if self.std < 0:
      raise ValueError(f'{where}.std must be >= 0, got {self.std}')
    buckets = sorted(self.keep_buckets)
    if not buckets or buckets[0] <= 0 or buckets[-1] > 1:
      raise ValueError(f'{where}.keep_buckets must be fractions in (0, 1], got {self.keep_buckets}')


def sample_mask_rate(rng: np.random.Generator, cfg: MaskingConfig) -> float:
  """rho ~ Normal(mean, std), clipped to [low, high]."""
  return float(np.clip(rng.normal(cfg.mean, cfg.std), cfg.low, cfg.high))


class MaskPlan(NamedTuple):
  """One step's masking: the rate, the visual tokens kept, and the slots (a bucket) they are padded to."""
  rho: float
  n_keep: int  # Nv - int(rho * Nv), exactly
  n_slots: int  # the smallest bucket size >= n_keep (static: the step's shape)


def keep_count(num_visual: int, rho: float) -> int:
  """Kept tokens for rate `rho`, as the released code counts them: Nv - int(rho * Nv)."""
  return num_visual - int(rho * num_visual)


def slot_count(num_visual: int, n_keep: int, cfg: MaskingConfig) -> int:
  """The smallest bucket size that holds `n_keep` tokens."""
  return next(size for size in bucket_sizes(num_visual, cfg) if size >= n_keep)


def bucket_sizes(num_visual: int, cfg: MaskingConfig) -> list[int]:
  """The distinct slot counts a run can use for `num_visual` tokens (ascending; Nv itself last)."""
  return sorted({min(num_visual, math.ceil(f * num_visual)) for f in cfg.keep_buckets} | {num_visual})


def keep_indices(key: jax.Array, batch_size: int, num_visual: int, n_slots: int,
                 n_keep: jax.Array | int | None = None) -> jax.Array:
  """int32 [B, n_slots]: for each sample its own random subset of `n_keep` of the Nv positions in ascending
  order, then `n_slots - n_keep` padding slots (index 0). `n_keep` may be traced; None = n_slots."""
  scores = jax.random.uniform(key, (batch_size, num_visual))
  _, chosen = jax.lax.top_k(scores, n_slots)  # n_slots distinct positions, the first n_keep a random subset
  if n_keep is None:
    return jnp.sort(chosen, axis=-1).astype(jnp.int32)
  is_kept = jnp.arange(n_slots) < n_keep
  ordered = jnp.sort(jnp.where(is_kept, chosen, num_visual + jnp.arange(n_slots)), axis=-1)  # padding last
  return jnp.where(is_kept, ordered, 0).astype(jnp.int32)


def gather_tokens(tokens: jax.Array, indices: jax.Array) -> jax.Array:
  """tokens [B, Nv, D], indices [B, n] -> [B, n, D] (the kept tokens, in order)."""
  return jnp.take_along_axis(tokens, indices[:, :, None], axis=1)


def step_mask_plan(step: int, seed: int, num_visual: int, cfg: MaskingConfig) -> MaskPlan:
  """The masking of a training step, a pure function of (seed, step) so a resumed run repeats it."""
  if not cfg.enabled:
    return MaskPlan(0.0, num_visual, num_visual)
  return fixed_rate_plan(sample_mask_rate(np.random.default_rng([seed, step, 0x6D61736B]), cfg), num_visual, cfg)


def fixed_rate_plan(rho: float, num_visual: int, cfg: MaskingConfig) -> MaskPlan:
  n_keep = keep_count(num_visual, rho)
  n_slots = slot_count(num_visual, n_keep, cfg)
  return MaskPlan(rho, n_slots if cfg.round_to_bucket else n_keep, n_slots)
