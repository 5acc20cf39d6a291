"""Dynamic video-token masking (paper section 3.2) with static shapes.

One mask rate per training step, rho ~ Normal(mean, std) clipped to [low, high]. Every sample drops the
same number of its Nv visual tokens, at its own random positions over the flat T*K sequence; the dropped
tokens are removed (no mask token), the kept ones keep their order and the shortened sequence gets
contiguous positions.

For static shapes, the kept count `Nv - int(rho * Nv)` is rounded up to the smallest of a fixed set of
bucket sizes (fractions of Nv), so a whole run compiles at most one train step per bucket. The rate and
the bucket are chosen on the host (they fix shapes); the positions are drawn on the device, in the jitted
step, from a PRNG key.
"""

from __future__ import annotations

import dataclasses
import math
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
  # Kept fraction of the visual tokens, rounded up to one of these (the static shapes of a run).
  keep_buckets: tuple[float, ...] = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)

  def validate(self, where: str = 'train.masking') -> None:
    if not 0 <= self.low <= self.high < 1:
      raise ValueError(f'{where}: need 0 <= low <= high < 1, got low={self.low}, high={self.high}')
    if self.std < 0:
      raise ValueError(f'{where}.std must be >= 0, got {self.std}')
    buckets = sorted(self.keep_buckets)
    if not buckets or buckets[0] <= 0 or buckets[-1] > 1:
      raise ValueError(f'{where}.keep_buckets must be fractions in (0, 1], got {self.keep_buckets}')
    if self.enabled and buckets[-1] < 1 - self.low:
      raise ValueError(f'{where}.keep_buckets top out at {buckets[-1]}, but a mask rate of low={self.low} '
                       f'keeps {1 - self.low:.2f} of the tokens: add a bucket >= {1 - self.low:.2f}')


def sample_mask_rate(rng: np.random.Generator, cfg: MaskingConfig) -> float:
  """rho ~ Normal(mean, std), clipped to [low, high]."""
  return float(np.clip(rng.normal(cfg.mean, cfg.std), cfg.low, cfg.high))


def keep_count(num_visual: int, rho: float, cfg: MaskingConfig) -> int:
  """Kept tokens for rate `rho`: Nv - int(rho * Nv), rounded up to the smallest bucket that holds it."""
  needed = num_visual - int(rho * num_visual)
  sizes = bucket_sizes(num_visual, cfg)
  return next(size for size in sizes if size >= needed)


def bucket_sizes(num_visual: int, cfg: MaskingConfig) -> list[int]:
  """The distinct kept counts a run can use for `num_visual` tokens (ascending; Nv itself last)."""
  return sorted({min(num_visual, math.ceil(f * num_visual)) for f in cfg.keep_buckets} | {num_visual})


def keep_indices(key: jax.Array, batch_size: int, num_visual: int, n_keep: int) -> jax.Array:
  """int32 [B, n_keep]: for each sample its own random subset of the Nv positions, in ascending order."""
  scores = jax.random.uniform(key, (batch_size, num_visual))
  _, chosen = jax.lax.top_k(scores, n_keep)  # n_keep distinct random positions per sample
  return jnp.sort(chosen, axis=-1).astype(jnp.int32)


def gather_tokens(tokens: jax.Array, indices: jax.Array) -> jax.Array:
  """tokens [B, Nv, D], indices [B, n] -> [B, n, D] (the kept tokens, in order)."""
  return jnp.take_along_axis(tokens, indices[:, :, None], axis=1)


def step_mask_plan(step: int, seed: int, num_visual: int, cfg: MaskingConfig) -> tuple[float, int]:
  """(rho, n_keep) for a training step, a pure function of (seed, step) so a resumed run repeats it."""
  if not cfg.enabled:
    return 0.0, num_visual
  rho = sample_mask_rate(np.random.default_rng([seed, step, 0x6D61736B]), cfg)
  return rho, keep_count(num_visual, rho, cfg)

