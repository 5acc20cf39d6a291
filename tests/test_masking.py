"""Dynamic masking: rates, bucketed kept counts, random per-sample positions in order, static shapes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stllm_jax import masking
from stllm_jax.masking import MaskingConfig


def test_rates_stay_in_bounds_and_average_one_half():
  cfg = MaskingConfig()
  rng = np.random.default_rng(0)
  rates = np.array([masking.sample_mask_rate(rng, cfg) for _ in range(20000)])
  assert rates.min() >= 0.3 and rates.max() <= 0.7
  assert abs(rates.mean() - 0.5) < 0.005
  assert 0.08 < rates.std() < 0.1  # sigma 0.1, a little less after clipping
  released = MaskingConfig(low=0.1)
  assert min(masking.sample_mask_rate(rng, released) for _ in range(20000)) < 0.3


def test_kept_count_is_rounded_up_to_a_bucket():
  cfg = MaskingConfig(keep_buckets=(0.3, 0.5, 0.7))
  assert masking.bucket_sizes(512, cfg) == [154, 256, 359, 512]
  assert masking.keep_count(512, 0.5, cfg) == 256  # 512 - 256 = 256 kept: exactly a bucket
  assert masking.keep_count(512, 0.45, cfg) == 359  # 512 - 230 = 282 kept -> next bucket up
  assert masking.keep_count(512, 0.7, cfg) == 154  # 512 - 358 = 154
  for rho in np.linspace(0.3, 0.7, 41):
    kept = masking.keep_count(512, rho, cfg)
    assert kept >= 512 - int(rho * 512) and kept in masking.bucket_sizes(512, cfg)


def test_keep_indices_are_sorted_distinct_and_differ_between_samples():
  idx = np.asarray(masking.keep_indices(jax.random.key(0), 8, 512, 256))
  assert idx.shape == (8, 256)
  for row in idx:
    assert np.all(np.diff(row) > 0)  # ascending and distinct: original order kept
    assert row.min() >= 0 and row.max() < 512
  assert len({tuple(row) for row in idx}) == 8  # every sample its own positions
  # positions are spread over all frames (not tube masking): each of 16 frames of 32 tokens keeps some
  assert all(len(set(row // 32)) > 8 for row in idx)


def test_gather_keeps_tokens_in_order():
  tokens = jnp.arange(2 * 6 * 3, dtype=jnp.float32).reshape(2, 6, 3)
  kept = masking.gather_tokens(tokens, jnp.array([[0, 2, 5], [1, 3, 4]]))
  np.testing.assert_array_equal(kept[0], tokens[0, jnp.array([0, 2, 5])])
  np.testing.assert_array_equal(kept[1], tokens[1, jnp.array([1, 3, 4])])


def test_step_plan_is_reproducible_and_off_when_disabled():
  cfg = MaskingConfig()
  assert masking.step_mask_plan(17, 3, 512, cfg) == masking.step_mask_plan(17, 3, 512, cfg)
  assert masking.step_mask_plan(17, 3, 512, cfg) != masking.step_mask_plan(18, 3, 512, cfg)
  assert masking.step_mask_plan(17, 3, 512, MaskingConfig(enabled=False)) == (0.0, 512)


def test_fifty_random_steps_compile_at_most_one_program_per_bucket():
  cfg = MaskingConfig()

  @functools.partial(jax.jit, static_argnames='n_keep')
  def masked(tokens, key, n_keep):
    return masking.gather_tokens(tokens, masking.keep_indices(key, tokens.shape[0], tokens.shape[1], n_keep)).sum()

  tokens = jnp.ones((2, 512, 4))
  used = set()
  for step in range(50):
    _, n_keep = masking.step_mask_plan(step, 0, 512, cfg)
    used.add(n_keep)
    masked(tokens, jax.random.key(step), n_keep=n_keep)
  assert masked._cache_size() == len(used) <= len(masking.bucket_sizes(512, cfg))


@pytest.mark.parametrize('kwargs, message', [(dict(low=0.8, high=0.7), 'low <= high'),
                                             (dict(keep_buckets=(0.3, 0.5)), 'add a bucket >= 0.70'),
                                             (dict(keep_buckets=(0.0, 1.0)), 'fractions in')])
def test_bad_masking_configs_are_explained(kwargs, message):
  with pytest.raises(ValueError, match=message):
    MaskingConfig(**kwargs).validate()
