"""The instruction-aware Q-Former against Hugging Face's InstructBLIP Q-Former."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import convert
from stllm_jax.models.qformer import QFormer, QFormerConfig
from stllm_jax.models.stllm import STLLM


def qformer_inputs(rng, n=3, text_len=7):
  image_tokens = rng.standard_normal((n, 5, 48)).astype(np.float32)
  ids = rng.integers(1, 60, (n, text_len)).astype(np.int32)
  mask = np.ones((n, text_len), np.int32)
  mask[1, 4:] = 0  # right padding
  mask[2, 1:] = 0  # a one-token instruction
  return image_tokens, ids, mask


def hf_queries(model, image_tokens, ids, mask):
  n, k = len(ids), model.config.num_query_tokens
  with torch.no_grad():
    out = model.qformer(
        input_ids=torch.tensor(ids).long(),
        attention_mask=torch.cat([torch.ones(n, k, dtype=torch.long), torch.tensor(mask).long()], 1),
        query_embeds=model.query_tokens.expand(n, -1, -1), encoder_hidden_states=torch.tensor(image_tokens),
        encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long))
  return out.last_hidden_state[:, :k]


def our_queries(cfg, params, *inputs):
  return STLLM(cfg).apply({'params': params}, *inputs, method=lambda m, *a: m.qformer(*a))


@pytest.mark.parametrize('dtype, tolerance', [('float32', 1e-5), ('bfloat16', 3e-2)])
def test_qformer_with_instruction_matches_hugging_face(hf_instructblip, parity, rng, dtype, tolerance):
  cfg, params = convert(hf_instructblip, dtype=dtype)
  inputs = qformer_inputs(rng)
  ours = our_queries(cfg, params, *inputs)
  assert ours.shape == (3, 4, 32)
  assert parity('Q-Former + instruction (query outputs)', dtype, ours.astype(jnp.float32),
                hf_queries(hf_instructblip, *inputs)) < tolerance


def test_instruction_changes_queries_and_padding_does_not(converted, rng):
  cfg, params = converted
  image_tokens, ids, mask = qformer_inputs(rng)
  base = our_queries(cfg, params, image_tokens, ids, mask)
  other_text = our_queries(cfg, params, image_tokens, (ids % 50) + 3, mask)
  assert not np.allclose(base[0], other_text[0], atol=1e-4)  # the instruction is read
  garbage_in_padding = ids.copy()
  garbage_in_padding[1, 4:] = 7
  np.testing.assert_allclose(our_queries(cfg, params, image_tokens, garbage_in_padding, mask), base, atol=1e-6)


def test_cross_attention_layers_follow_frequency():
  cfg = QFormerConfig(width=16, num_layers=4, num_heads=2, mlp_dim=32, vocab_size=10, max_positions=8,
                      cross_attention_freq=2, num_query_tokens=2)
  variables = jax.eval_shape(QFormer(cfg).init, jax.random.key(0), jnp.zeros((1, 3, 24)),
                             jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))
  params = variables['params']
  assert ['cross_attention' in params[f'layers_{i}'] for i in range(4)] == [True, False, True, False]
  assert all({'query_ffn', 'text_ffn'} <= set(params[f'layers_{i}']) for i in range(4))
