"""Training objectives: LM cross-entropy on answer tokens, and masked video modelling (MVM, paper Eq. 4).

Both return (sum, count) pairs where a batch may be split into micro-batches, so the caller normalises
once over the whole batch (exactly as one large batch would).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

MVM_LOSSES = ('cosine', 'mse')


def lm_loss_sum(text_logits: jax.Array, input_ids: jax.Array, answer_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Next-token cross-entropy summed over supervised tokens, and their count.

  text_logits [B, L, V] float32: position i predicts input_ids[:, i] (the caller has shifted: the logits at
  the last visual token predict the first text token). answer_mask [B, L]: 1 on the answer and its `</s>`.
  """
  per_token = optax.softmax_cross_entropy_with_integer_labels(text_logits.astype(jnp.float32), input_ids)
  weights = answer_mask.astype(jnp.float32)
  return jnp.sum(per_token * weights), jnp.sum(weights)


def mvm_loss(student: jax.Array, teacher: jax.Array, kind: str = 'cosine',
             token_mask: jax.Array | None = None) -> jax.Array:
  """Mean over kept tokens of the student/teacher distance; student, teacher [B, n, D].

  'cosine': 2 - 2 cos(student, teacher), i.e. the squared distance of the L2-normalised vectors (the
  released code). 'mse': mean squared error over tokens and features (the paper's Eq. 4).
  token_mask bool [n] (or [B, n]): the real tokens (padding slots are left out of the mean).
  The teacher is wrapped in stop_gradient here as well: no gradient ever flows into it.
  """
  teacher = jax.lax.stop_gradient(teacher.astype(jnp.float32))
  student = student.astype(jnp.float32)
  if kind == 'cosine':
    normalise = lambda x: x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))
    per_token = 2.0 - 2.0 * jnp.sum(normalise(student) * normalise(teacher), axis=-1)  # [B, n]
  elif kind == 'mse':
    per_token = jnp.mean(jnp.square(student - teacher), axis=-1)  # [B, n]
  else:
    raise ValueError(f'unknown MVM loss {kind!r}; choose one of {MVM_LOSSES}')
  if token_mask is None:
    return jnp.mean(per_token)
  weights = jnp.broadcast_to(token_mask, per_token.shape).astype(jnp.float32)
  return jnp.sum(per_token * weights) / jnp.maximum(jnp.sum(weights), 1.0)
