"""LLaMA against Hugging Face's LlamaForCausalLM (GQA, padding, RoPE theta, tied embeddings, scan, remat); the named
remat policies."""

import contextlib
import dataclasses
import io
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.ad_checkpoint import print_saved_residuals
from jax.extend import core as jax_core

from conftest import randomize_, relative_error
from stllm_jax.convert import hf
from stllm_jax.models import layers, llama
from stllm_jax.models.llama import Llama


def hf_llama(num_kv_heads=2, rope_theta=10000.0, tie=False, seed=3):
  config = transformers.LlamaConfig(
      vocab_size=90, hidden_size=64, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=num_kv_heads,
      intermediate_size=112, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=tie,
      rope_parameters=dict(rope_type='default', rope_theta=rope_theta))
  torch.manual_seed(seed)
  return randomize_(transformers.LlamaForCausalLM(config), seed)


def ids_and_mask(rng, batch=3, length=11):
  ids = rng.integers(0, 90, (batch, length)).astype(np.int32)
  mask = np.ones((batch, length), np.int32)
  mask[1, 7:] = 0
  mask[2, 2:] = 0
  return ids, mask


def logits(cfg, params, ids, mask):
  llm_cfg = llama.LlamaConfig(**cfg.to_dict())
  return Llama(llm_cfg).apply(
      {'params': params}, ids, mask, method='forward_ids')


@pytest.mark.parametrize('kv_heads, theta, tie', [(2, 10000.0, False), (8, 10000.0, False), (4, 500000.0, True)])
def test_llama_matches_hugging_face(parity, rng, kv_heads, theta, tie):
  model = hf_llama(kv_heads, theta, tie)
  cfg, params = hf.load_hf_llama(model.state_dict(), model.config)
  assert (cfg.num_kv_heads, cfg.rope_theta, cfg.tie_word_embeddings) == (kv_heads, theta, tie)
  ids, mask = ids_and_mask(rng)
  with torch.no_grad():
    reference = model(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long()).logits
  name = f'LLaMA (heads 8, kv {kv_heads}, theta {theta:g}{", tied" if tie else ""})'
  assert parity(name, 'float32', logits(cfg, params, ids, mask), reference) < 1e-5


def test_llama_bfloat16_error(parity, rng):
  model = hf_llama()
  cfg, params = hf.load_hf_llama(model.state_dict(), model.config)
  ids, mask = ids_and_mask(rng)
  with torch.no_grad():
    reference = model(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long()).logits
  ours = Llama(llama.LlamaConfig(**cfg.to_dict()), jnp.bfloat16).apply({'params': params}, ids, mask,
                                                                       method='forward_ids')
  assert parity('LLaMA (heads 8, kv 2)', 'bfloat16', ours, reference) < 3e-2


def test_padding_does_not_leak_into_real_tokens(rng):
  model = hf_llama()
  cfg, params = hf.load_hf_llama(model.state_dict(), model.config)
  ids, mask = ids_and_mask(rng)
  other = ids.copy()
  other[1, 7:] = (other[1, 7:] + 1) % 90  # change only padded positions
  a, b = logits(cfg, params, ids, mask), logits(cfg, params, other, mask)
  np.testing.assert_array_equal(a[1, :7], b[1, :7])


@pytest.mark.parametrize('remat', ['none', 'full', 'dots'])
def test_scan_and_remat_do_not_change_outputs_or_gradients(rng, remat):
  model = hf_llama()
  _, reference_params = hf.load_hf_llama(model.state_dict(), model.config)
  unrolled_base = hf.llm_config_from_hf(model.config)
  unrolled_base.update(scan_layers=False, remat_policy=remat)
  cfg_u, params_u = hf.load_hf_llama(model.state_dict(), model.config, base=unrolled_base)
  ids, mask = ids_and_mask(rng)

  def loss_and_grad(cfg, params):
    fn = lambda p: jnp.mean(logits(cfg, p, ids, mask) ** 2)
    return jax.jit(jax.value_and_grad(fn))(params)

  cfg_s = hf.llm_config_from_hf(model.config)
  cfg_s.remat_policy = remat
  loss_s, grad_s = loss_and_grad(cfg_s, reference_params)
  loss_u, grad_u = loss_and_grad(cfg_u, params_u)
  np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
  stacked = np.stack([grad_u['blocks'][f'layers_{i}']['mlp']['up']['kernel'] for i in range(3)])
  assert relative_error(grad_s['blocks']['layers']['mlp']['up']['kernel'], stacked) < 1e-5


@pytest.mark.parametrize('unroll', [2, 3, 8])
def test_scan_unroll_keeps_the_params_and_what_they_compute(rng, unroll):
  """Scanned layers unrolled into the loop's body (2 of the 3 layers per iteration; all 3, or more: no loop) keep
  the scanned params and their initialisation (the same random bits; their conversion to normals compiles
  differently, so values may differ in the last bit), and compute the same logits and gradients."""
  ids, mask = ids_and_mask(rng)
  looped = llama.LlamaConfig(vocab_size=90, width=32, num_layers=3, num_heads=4, num_kv_heads=2, mlp_dim=48,
                             max_positions=16)
  unrolled = dataclasses.replace(looped, scan_unroll=unroll)
  init = lambda cfg: nn.unbox(Llama(cfg).init(jax.random.key(0), ids, mask, method='forward_ids')['params'])
  params = init(looped)
  same = lambda a, b: np.testing.assert_allclose(a, b, rtol=3e-7, atol=1e-9)
  jax.tree_util.tree_map(same, init(unrolled), params)

  def loss(cfg):
    return lambda p: jnp.mean(Llama(cfg).apply({'params': p}, ids, mask, method='forward_ids') ** 2)

  loss_l, grad_l = jax.jit(jax.value_and_grad(loss(looped)))(params)
  loss_u, grad_u = jax.jit(jax.value_and_grad(loss(unrolled)))(params)
  np.testing.assert_allclose(loss_u, loss_l, rtol=1e-6)
  for block, kernel in (('mlp', 'up'), ('attention', 'query')):
    get = lambda grads: grads['blocks']['layers'][block][kernel]['kernel']
    assert relative_error(get(grad_u), get(grad_l)) < 1e-5
  program = jax.jit(jax.grad(loss(unrolled))).lower(params).as_text()
  assert ('while' in program) == (unroll < 3)  # 3 layers in one iteration: XLA gets no loop to run


def test_scan_unroll_below_one_is_named():
  with pytest.raises(ValueError, match=r'llm.scan_unroll=0: give at least 1'):
    llama.LlamaConfig(scan_unroll=0).validate()


def test_too_long_sequence_is_refused(rng):
  cfg = llama.LlamaConfig(vocab_size=16, width=16, num_layers=1, num_heads=2, num_kv_heads=2, mlp_dim=32,
                          max_positions=8)
  ids = jnp.zeros((1, 9), jnp.int32)
  with pytest.raises(ValueError, match='9 tokens, more than llm.max_positions=8'):
    Llama(cfg).init(jax.random.key(0), ids, ids + 1, method='forward_ids')


def primitive_count(jaxpr, name: str) -> int:
  """How many equations of primitive `name` a jaxpr holds, sub-jaxprs (jit, remat, scan) included."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == name
    count += sum(primitive_count(sub, name) for sub in jax_core.jaxprs_in_params(eqn.params))
  return count


def test_rope_sin_and_cos_are_computed_once_per_forward_not_per_layer(rng):
  """The angles' sin and cos are shared by every layer's queries and keys (3 layers here: 6 of each before)."""
  ids, mask = ids_and_mask(rng)
  cfg = llama.LlamaConfig(vocab_size=90, width=32, num_layers=3, num_heads=4, num_kv_heads=2, mlp_dim=48,
                          max_positions=16, scan_layers=False)
  model = Llama(cfg)
  params = model.init(jax.random.key(0), ids, mask, method='forward_ids')['params']
  loss = lambda p: jnp.mean(model.apply({'params': p}, ids, mask, method='forward_ids') ** 2)
  for fn in (loss, jax.grad(loss)):
    jaxpr = jax.make_jaxpr(fn)(params).jaxpr
    assert (primitive_count(jaxpr, 'sin'), primitive_count(jaxpr, 'cos')) == (1, 1)


def test_bad_head_counts_are_named():
  with pytest.raises(ValueError, match='num_heads=6 is not a multiple of llm.num_kv_heads=4'):
    llama.LlamaConfig(width=48, num_heads=6, num_kv_heads=4).validate()


def saved_residuals(fn, *args) -> list[tuple[int, str]]:
  """(bytes, what) of each value the backward pass of `fn` keeps, read from jax's print_saved_residuals
  ('f32[2,8,4,8] named 'query_proj' from ...')."""
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    print_saved_residuals(fn, *args)
  rows = []
  for line in printed.getvalue().splitlines():
    dtype, shape, what = re.match(r'(\w+)\[([\d,]*)\] (.*)', line).groups()
    bits = int(re.sub(r'\D', '', dtype) or 8)  # f32 -> 32, bf16 -> 16, bool -> 8
    rows.append((math.prod(int(d) for d in shape.split(',') if d) * bits // 8, what))
  return rows


def test_named_remat_policies_save_what_they_name_and_change_no_gradient(rng):
  """Each policy of layers.REMAT_POLICIES against 'none' on an unrolled tiny LLaMA (names are visible there):
  the same loss and gradients; what the backward keeps differs, and the named policies keep their names."""
  ids, mask = ids_and_mask(rng)
  base = llama.LlamaConfig(vocab_size=90, width=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48,
                           max_positions=16, scan_layers=False)
  params = Llama(base).init(jax.random.key(0), ids, mask, method='forward_ids')['params']
  results = {}
  for policy in layers.REMAT_POLICIES:
    model = Llama(dataclasses.replace(base, remat_policy=policy))
    loss = lambda p, model=model: jnp.mean(model.apply({'params': p}, ids, mask, method='forward_ids') ** 2)
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    residuals = saved_residuals(loss, params)
    names = {re.match(r"named '(\w+)'", what).group(1) for _, what in residuals if what.startswith('named')}
    results[policy] = (value, grads, sum(size for size, _ in residuals), names)
  value_none, grads_none, bytes_none, _ = results['none']
  for policy, (value, grads, _, _) in results.items():
    np.testing.assert_allclose(value, value_none, rtol=1e-6, err_msg=policy)
    for got, want in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_none)):
      assert relative_error(got, want) < 1e-6, policy
  assert results['save_qkv_proj'][3] == set(layers.QKV_PROJ_NAMES)
  assert results['minimal'][3] == set(layers.PROJECTION_NAMES)
  assert results['full'][3] == results['dots'][3] == set()
  kept = {policy: result[2] for policy, result in results.items()}
  assert kept['none'] > kept['dots'] > kept['minimal'] > kept['save_qkv_proj'] > kept['full'], kept
