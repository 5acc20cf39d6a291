"""Dynamic masking: rates, exact kept counts padded to buckets, random per-sample positions in order, static
shapes."""

import dataclasses
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


def test_kept_count_is_the_released_formula_and_slots_a_bucket():
  cfg = MaskingConfig(keep_buckets=(0.3, 0.5, 0.7))
  assert masking.bucket_sizes(512, cfg) == [154, 256, 359, 512]
  assert masking.fixed_rate_plan(0.5, 512, cfg) == (0.5, 256, 256)  # 512 - 256 = 256 kept: exactly a bucket
  assert masking.fixed_rate_plan(0.45, 512, cfg) == (0.45, 282, 359)  # 512 - int(230.4) = 282 kept, 359 slots
  assert masking.fixed_rate_plan(0.7, 512, cfg) == (0.7, 154, 154)  # 512 - int(358.4) = 154
  assert masking.fixed_rate_plan(0.1, 512, cfg) == (0.1, 461, 512)  # above every bucket: all 512 slots


def test_rounding_to_the_bucket_keeps_the_whole_bucket():
  """`round_to_bucket` (the built-in demo): the step keeps all its slots, so only the bucket lengths occur."""
  cfg = MaskingConfig(mean=0.35, std=0.2, low=0.0, high=0.7, keep_buckets=(0.4, 0.6, 0.8, 1.0),
                      round_to_bucket=True)
  assert masking.fixed_rate_plan(0.45, 32, cfg) == (0.45, 20, 20)  # 32 - int(14.4) = 18 kept -> the 20 bucket
  assert masking.fixed_rate_plan(0.1, 32, cfg) == (0.1, 32, 32)  # 29 -> all 32
  counts = {masking.step_mask_plan(step, 0, 32, cfg).n_keep for step in range(2000)}
  assert counts == {13, 20, 26, 32}
  exact = dataclasses.replace(cfg, round_to_bucket=False)
  assert len({masking.step_mask_plan(step, 0, 32, exact).n_keep for step in range(2000)}) > 15


def test_realised_kept_counts_equal_the_released_formula_over_many_steps(report):
  """Over 20,000 steps the kept count is exactly Nv - int(rho * Nv), so the realised mask rate is unbiased
  (rounding up to the buckets, as before, gave a mean rate of about 0.476 at 512 tokens)."""
  cfg = MaskingConfig()
  plans = [masking.step_mask_plan(step, 0, 512, cfg) for step in range(20000)]
  assert all(p.n_keep == 512 - int(p.rho * 512) for p in plans)
  assert all(p.n_keep <= p.n_slots and p.n_slots in masking.bucket_sizes(512, cfg) for p in plans)
  realised = np.mean([1 - p.n_keep / 512 for p in plans])
  rounded_up = np.mean([1 - p.n_slots / 512 for p in plans])  # what the old bucket rounding kept
  assert abs(realised - np.mean([p.rho for p in plans])) < 0.002 and abs(realised - 0.5) < 0.005
  assert rounded_up < realised - 0.015
  report('masking: realised mean mask rate over 20,000 steps at 512 visual tokens',
         f'exact counts {realised:.4f} (mean rho {np.mean([p.rho for p in plans]):.4f}); '
         f'rounded up to the buckets (before) {rounded_up:.4f}')


def test_keep_indices_are_sorted_distinct_and_differ_between_samples():
  idx = np.asarray(masking.keep_indices(jax.random.key(0), 8, 512, 256))
  assert idx.shape == (8, 256)
  for row in idx:
    assert np.all(np.diff(row) > 0)  # ascending and distinct: original order kept
    assert row.min() >= 0 and row.max() < 512
  assert len({tuple(row) for row in idx}) == 8  # every sample its own positions
  # positions are spread over all frames (not tube masking): each of 16 frames of 32 tokens keeps some
  assert all(len(set(row // 32)) > 8 for row in idx)


def test_padded_keep_indices_hold_the_same_tokens_then_padding():
  key = jax.random.key(4)
  exact = np.asarray(masking.keep_indices(key, 4, 512, 282))
  padded = np.asarray(jax.jit(masking.keep_indices, static_argnums=(1, 2, 3))(key, 4, 512, 359, jnp.int32(282)))
  np.testing.assert_array_equal(padded[:, :282], exact)  # the same random subset, in order
  assert np.all(padded[:, 282:] == 0)


def test_gather_keeps_tokens_in_order():
  tokens = jnp.arange(2 * 6 * 3, dtype=jnp.float32).reshape(2, 6, 3)
  kept = masking.gather_tokens(tokens, jnp.array([[0, 2, 5], [1, 3, 4]]))
  np.testing.assert_array_equal(kept[0], tokens[0, jnp.array([0, 2, 5])])
  np.testing.assert_array_equal(kept[1], tokens[1, jnp.array([1, 3, 4])])


def test_step_plan_is_reproducible_and_off_when_disabled():
  cfg = MaskingConfig()
  assert masking.step_mask_plan(17, 3, 512, cfg) == masking.step_mask_plan(17, 3, 512, cfg)
  assert masking.step_mask_plan(17, 3, 512, cfg) != masking.step_mask_plan(18, 3, 512, cfg)
  assert masking.step_mask_plan(17, 3, 512, MaskingConfig(enabled=False)) == (0.0, 512, 512)


def test_two_hundred_random_steps_compile_at_most_one_program_per_bucket(report):
  cfg = MaskingConfig()

  @functools.partial(jax.jit, static_argnames='n_slots')
  def masked(tokens, key, n_keep, n_slots):
    keep = masking.keep_indices(key, tokens.shape[0], tokens.shape[1], n_slots, n_keep)
    return masking.gather_tokens(tokens, keep).sum()

  tokens = jnp.ones((2, 512, 4))
  slots, counts = set(), set()
  for step in range(200):
    plan = masking.step_mask_plan(step, 0, 512, cfg)
    slots.add(plan.n_slots)
    counts.add(plan.n_keep)
    masked(tokens, jax.random.key(step), np.int32(plan.n_keep), n_slots=plan.n_slots)
  assert masked._cache_size() == len(slots) <= len(masking.bucket_sizes(512, cfg)) < len(counts)
  report('masking: programs compiled over 200 steps at 512 visual tokens',
         f'{masked._cache_size()} (distinct kept counts {len(counts)}, buckets {len(masking.bucket_sizes(512, cfg))})')


@pytest.mark.parametrize('kwargs, message', [(dict(low=0.8, high=0.7), 'low <= high'),
                                             (dict(keep_buckets=(0.0, 1.0)), 'fractions in')])
def test_bad_masking_configs_are_explained(kwargs, message):
  with pytest.raises(ValueError, match=message):
    MaskingConfig(**kwargs).validate()
