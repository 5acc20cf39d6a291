"""LM loss on answer tokens and the MVM loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stllm_jax import losses


def test_lm_loss_counts_only_answer_tokens():
  logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]]))
  ids = jnp.array([[0, 1, 2]])
  total, count = losses.lm_loss_sum(logits, ids, jnp.array([[0, 1, 1]]))
  np.testing.assert_allclose(total, -np.log(0.8) - np.log(0.6), rtol=1e-6)
  assert count == 2
  total, count = losses.lm_loss_sum(logits, ids, jnp.zeros((1, 3), jnp.int32))
  assert total == 0 and count == 0


def test_mvm_cosine_and_mse_on_hand_made_vectors():
  student = jnp.array([[[1.0, 0.0], [0.0, 2.0]]])
  teacher = jnp.array([[[3.0, 0.0], [2.0, 0.0]]])
  # cos = 1 and 0 -> (2 - 2) and (2 - 0) -> mean 1
  np.testing.assert_allclose(losses.mvm_loss(student, teacher, 'cosine'), 1.0, rtol=1e-6)
  np.testing.assert_allclose(losses.mvm_loss(student, teacher, 'mse'), (4 + 0 + 4 + 4) / 4, rtol=1e-6)
  assert losses.mvm_loss(teacher, teacher, 'cosine') == pytest.approx(0.0, abs=1e-7)
  assert losses.mvm_loss(teacher, teacher, 'mse') == 0.0
  with pytest.raises(ValueError, match="unknown MVM loss 'l1'"):
    losses.mvm_loss(student, teacher, 'l1')


def test_no_gradient_flows_into_the_teacher():
  student = jax.random.normal(jax.random.key(0), (2, 5, 8))
  teacher = jax.random.normal(jax.random.key(1), (2, 5, 8))
  for kind in losses.MVM_LOSSES:
    grad_teacher = jax.grad(lambda t: losses.mvm_loss(student, t, kind))(teacher)
    assert np.all(np.asarray(grad_teacher) == 0)
    assert np.any(np.asarray(jax.grad(lambda s: losses.mvm_loss(s, teacher, kind))(student)) != 0)
