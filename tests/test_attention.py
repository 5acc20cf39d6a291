"""Attention: jax.nn.dot_product_attention's XLA path against the explicit float32 form (the CPU default) for every
mask form the towers use, values and gradients; the arguments the cuDNN path builds (checked on CPU by running
them through XLA with cuDNN's semantics), and the one-line error for cuDNN where it cannot run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_batch, relative_error
from stllm_jax import generate
from stllm_jax.models import layers, llama, stllm
from stllm_jax.models.eva_vit import BTAdapterConfig, VisionConfig
from stllm_jax.models.layers import AttentionMask
from stllm_jax.models.qformer import QFormerConfig

B, T, H, KV, HD = 2, 6, 4, 2, 8


def qkv(key_len):
  """query [B, T, H, hd], key and value [B, S, KV, hd] (grouped-query)."""
  keys = jax.random.split(jax.random.key(0), 3)
  return (jax.random.normal(keys[0], (B, T, H, HD)), jax.random.normal(keys[1], (B, key_len, KV, HD)),
          jax.random.normal(keys[2], (B, key_len, KV, HD)))


PADDING_ANYWHERE = jnp.array([[1, 0, 1, 1, 0, 1], [1, 1, 1, 0, 0, 0]], jnp.int32)  # [B, S]
MASK_FORMS = {
    'none (ViT, BT-Adapter, cross-attention)': (T, lambda: None),
    'key padding anywhere (Q-Former self-attention)': (T, lambda: AttentionMask(key_mask=PADDING_ANYWHERE)),
    'causal + key lengths (LLM training)': (T, lambda: AttentionMask(key_lengths=jnp.array([6, 4], jnp.int32),
                                                                      is_causal=True)),
    'causal + key padding anywhere (LLM forward)': (T, lambda: AttentionMask(key_mask=PADDING_ANYWHERE,
                                                                              is_causal=True)),
    'dense [B, 1, T, S] (LLM with a KV cache)': (9, lambda: llama.cached_causal_mask(
        jnp.array([[0, 1, 1, 1, 1, 1, 1, 1, 0], [1] * 8 + [0]], jnp.int32), jnp.int32(2), T)),
}


def weighted_sum_and_grads(form, weights):
  """jitted (q, k, v) -> (sum(form(q, k, v) * weights), its gradients in q, k and v)."""
  return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(form(q, k, v) * weights), argnums=(0, 1, 2)))


@pytest.mark.parametrize('form', MASK_FORMS)
def test_xla_matches_the_explicit_float32_form_in_values_and_gradients(form):
  key_len, make_mask = MASK_FORMS[form]
  query, key, value = qkv(key_len)
  mask = make_mask()
  allowed = None if mask is None else mask.dense(T, key_len)
  reference = layers.explicit_attention(query, key, value, allowed)
  assert relative_error(layers.attention(query, key, value, mask, 'xla'), reference) < 1e-6
  weights = jax.random.normal(jax.random.key(1), reference.shape)
  loss = lambda implementation: jax.grad(
      lambda q, k, v: jnp.sum(layers.attention(q, k, v, mask, implementation) * weights), argnums=(0, 1, 2))
  for explicit, xla in zip(loss('explicit')(query, key, value), loss('xla')(query, key, value)):
    assert relative_error(explicit, xla) < 1e-6


@pytest.mark.parametrize('form', MASK_FORMS)
def test_the_default_on_cpus_is_the_explicit_form(form):
  """On XLA:CPU the explicit form trains faster than jax.nn's (BENCHMARK.md); None picks it there."""
  key_len, make_mask = MASK_FORMS[form]
  query, key, value = qkv(key_len)
  mask = make_mask()
  assert jax.default_backend() == 'cpu'
  jitted = jax.jit(layers.attention, static_argnums=4)
  np.testing.assert_array_equal(jitted(query, key, value, mask, None), jitted(query, key, value, mask, 'explicit'))
  jaxpr = str(jax.make_jaxpr(lambda q, k, v: layers.attention(q, k, v, mask, None))(query, key, value))
  assert 'dot_product_attention' not in jaxpr and 'custom_jvp_call' in jaxpr  # our softmax, not jax.nn's path


def test_the_explicit_form_multiplies_heads_first_operands():
  """q.k and p.v take [B, H, T, hd] operands: XLA:CPU's batched matmul kernels want the contracted dimension
  last, and the einsum over the projections' [B, T, H, hd] made XLA lay keys, values and the output out as
  [B, H, hd, S], one slow transpose each (7% of bench_small's step on a Zen 3 EPYC, BENCHMARK.md)."""
  query, key, value = (x[:, :, :KV] for x in qkv(T))  # [B, T, KV, hd]: no grouped-query repeat
  program = jax.jit(lambda q, k, v: layers.explicit_attention(q, k, v, None)).lower(query, key, value).compile()
  heads_last = f'f32[{B},{KV},{HD},{T}]'  # [B, H, hd, S]
  assert heads_last not in program.as_text()
  assert f'f32[{B},{KV},{T},{HD}]' in program.as_text()  # the heads-first operands


def test_the_mask_is_an_additive_bias_with_the_select_forms_values():
  """Masked logits are the logits plus float32's min (Hugging Face's eager form): the values and gradients of
  jnp.where(allowed, logits, min), and a backward without a select over the [B, H, T, S] gradients."""
  query, key, value = qkv(T)
  mask = MASK_FORMS['key padding anywhere (Q-Former self-attention)'][1]()
  allowed = mask.dense(T, T)

  def select_form(q, k, v):  # the masked softmax as jnp.where writes it
    k, v = jnp.repeat(k, H // KV, axis=2), jnp.repeat(v, H // KV, axis=2)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q * HD ** -0.5, k)
    probs = jax.nn.softmax(jnp.where(allowed, logits, jnp.finfo(jnp.float32).min))
    return jnp.einsum('bhqk,bkhd->bqhd', probs, v)

  weights = jax.random.normal(jax.random.key(4), (B, T, H, HD))
  ours = weighted_sum_and_grads(lambda q, k, v: layers.explicit_attention(q, k, v, allowed), weights)
  value_ours, grads_ours = ours(query, key, value)
  value_ref, grads_ref = weighted_sum_and_grads(select_form, weights)(query, key, value)
  assert relative_error(value_ours, value_ref) < 1e-6
  for got, expected in zip(grads_ours, grads_ref):
    assert relative_error(got, expected) < 1e-6
  program = ours.lower(query, key, value).compile().as_text()
  assert not [line for line in program.splitlines() if f'f32[{B},{H},{T},{T}]' in line and ' select(' in line]


def test_long_causal_self_attention_runs_in_two_query_halves():
  """The LLM's training attention (causal + key lengths, T == S >= CAUSAL_SPLIT_MIN_LEN): the first half's
  queries meet only the first half's keys ([T/2, T/2] logits, 3/4 of the matmul work), with the full form's
  values and gradients; any other mask, or a shorter sequence, takes the full form."""
  t = layers.CAUSAL_SPLIT_MIN_LEN + 6
  keys = jax.random.split(jax.random.key(3), 4)
  query = jax.random.normal(keys[0], (B, t, H, HD))
  key, value = (jax.random.normal(k, (B, t, KV, HD)) for k in keys[1:3])
  mask = AttentionMask(key_lengths=jnp.array([t, t - 9], jnp.int32), is_causal=True)
  weights = jax.random.normal(keys[3], (B, t, H, HD))
  split = weighted_sum_and_grads(lambda q, k, v: layers.attention(q, k, v, mask, None), weights)(query, key, value)
  full = weighted_sum_and_grads(lambda q, k, v: layers.explicit_attention(q, k, v, mask.dense(t, t)),
                                weights)(query, key, value)
  assert relative_error(split[0], full[0]) < 1e-6
  for ours, reference in zip(split[1], full[1]):
    assert relative_error(ours, reference) < 1e-5
  program = jax.jit(lambda q, k, v: layers.attention(q, k, v, mask, None)).lower(query, key, value).as_text()
  assert f'tensor<{B}x{H}x{t // 2}x{t // 2}xf32>' in program  # the first half's logits
  assert f'tensor<{B}x{H}x{t}x{t}xf32>' not in program
  assert layers.splits_causally(mask, t, t)
  assert not layers.splits_causally(AttentionMask(key_mask=jnp.ones((B, t)), is_causal=True), t, t)
  assert not layers.splits_causally(AttentionMask(key_lengths=mask.key_lengths), t, t)  # not causal
  assert not layers.splits_causally(mask, t - 1, t)  # a KV cache's queries
  short = layers.CAUSAL_SPLIT_MIN_LEN - 1
  assert not layers.splits_causally(mask, short, short)


@pytest.mark.parametrize('form', MASK_FORMS)
def test_cudnn_arguments_allow_what_the_mask_allows(form):
  """What the cuDNN path hands over, computed with cuDNN's semantics (causal flag, key lengths, a bias over the
  full score matrix) by XLA, equals the reference; and it is in the forms cuDNN takes."""
  key_len, make_mask = MASK_FORMS[form]
  query, key, value = qkv(key_len)
  mask = make_mask()
  if mask is None:
    mask = AttentionMask()
  key_c, value_c, dense, key_lengths = layers.cudnn_arguments(T, key, value, mask)
  assert dense is None or (dense.dtype == bool and dense.shape[-2:] == (T, key_len))
  assert key_lengths is None or (key_lengths.dtype == jnp.int32 and key_lengths.shape == (B,))
  if mask.key_mask is not None and not mask.is_causal:
    assert dense is None  # the Q-Former's padding becomes key lengths: no bias in memory
  def cudnn_semantics(query, key, value):
    key_c, value_c, dense, key_lengths = layers.cudnn_arguments(T, key, value, mask)
    return jax.nn.dot_product_attention(query, key_c, value_c, mask=dense, is_causal=mask.is_causal,
                                        key_value_seq_lengths=key_lengths, implementation='xla')

  reference = lambda query, key, value: layers.explicit_attention(query, key, value, mask.dense(T, key_len))
  assert relative_error(cudnn_semantics(query, key, value), reference(query, key, value)) < 1e-6
  cotangent = jax.random.normal(jax.random.key(3), query.shape)
  grads = lambda fn: jax.vjp(fn, query, key, value)[1](cotangent)  # the key reorder's gradient goes back in place
  for got, want in zip(grads(cudnn_semantics), grads(reference)):
    assert relative_error(got, want) < 1e-5


def test_cudnn_problem_names_what_cudnn_cannot_take():
  assert layers.cudnn_problem('gpu', jnp.bfloat16, 128, 128) is None
  assert layers.cudnn_problem('gpu', jnp.float16, 88, 128) is None  # EVA-ViT-g's head dim
  assert 'needs an NVIDIA GPU' in layers.cudnn_problem('cpu', jnp.bfloat16, 128, 128)
  assert 'bfloat16 or float16' in layers.cudnn_problem('gpu', jnp.float32, 128, 128)
  assert 'multiple of 8 and at most 128, got 12' in layers.cudnn_problem('gpu', jnp.bfloat16, 12, 128)
  assert 'got 256' in layers.cudnn_problem('gpu', jnp.bfloat16, 256, 128)
  assert layers.cudnn_problem('gpu', jnp.bfloat16, 256, 256) is None  # Hopper and later


def tiny_config(attention_impl):
  """Every tower with head dims cuDNN takes (8), the BT-Adapter, MVM; no dropout (cuDNN has none)."""
  return stllm.STLLMConfig(
      vision=VisionConfig(image_size=28, patch_size=14, width=32, depth=2, num_heads=4, mlp_dim=64,
                          bt_adapter=BTAdapterConfig(depth=1, max_frames=4, drop_path=0.0)),
      qformer=QFormerConfig(width=32, num_layers=2, num_heads=4, mlp_dim=64, vocab_size=50, max_positions=16,
                            num_query_tokens=4),
      llm=llama.LlamaConfig(vocab_size=64, width=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                            max_positions=64),
      mvm_head=True, attention_impl=attention_impl)


def test_cudnn_on_cpu_is_a_one_line_error():
  cfg = tiny_config('cudnn')
  batch = stllm.dummy_batch(cfg, num_frames=2, text_len=3, qformer_text_len=3)
  with pytest.raises(ValueError, match="model.attention_impl='cudnn': cuDNN flash attention needs an NVIDIA GPU; "
                                       "JAX's backend here is 'cpu'. Use 'xla'"):
    jax.eval_shape(lambda: stllm.STLLM(cfg).init(jax.random.key(0), batch))


@pytest.fixture
def emulated_cudnn(monkeypatch):
  """implementation='cudnn' as on a GPU: the platform check passes, and jax.nn.dot_product_attention records each
  cuDNN call, checks the forms cuDNN takes, and computes it with XLA (cuDNN's semantics for the same arguments)."""
  calls = []
  xla_attention = jax.nn.dot_product_attention

  def check(query):
    problem = layers.cudnn_problem('gpu', jnp.bfloat16, query.shape[-1], 128)  # dtype: see the unit test above
    assert problem is None, problem

  def recorded(query, key, value, *, mask, is_causal, key_value_seq_lengths, implementation):
    if implementation == 'cudnn':
      t, s = query.shape[1], key.shape[1]
      assert mask is None or (mask.dtype == bool and mask.shape[-2:] == (t, s)), mask.shape
      calls.append({'query': query.shape, 'key': key.shape, 'mask': None if mask is None else mask.shape,
                    'is_causal': is_causal, 'key_lengths': key_value_seq_lengths is not None})
    return xla_attention(query, key, value, mask=mask, is_causal=is_causal,
                         key_value_seq_lengths=key_value_seq_lengths, implementation='xla')

  monkeypatch.setattr(layers, 'check_cudnn', check)
  monkeypatch.setattr(jax.nn, 'dot_product_attention', recorded)
  return calls


def training_pass(cfg, params, batch):
  """The student's text logits and MVM sides (the train step's forward)."""
  keep = jnp.array([[0, 2, 5, 7], [1, 3, 4, 6]], jnp.int32)  # 3 of 8 visual tokens kept, 1 padding slot
  out = stllm.STLLM(cfg).apply({'params': params}, batch, keep, 3, True, deterministic=True, method='training_pass')
  return out.text_logits, out.student, out.teacher


def test_every_tower_on_the_cudnn_path_computes_what_xla_computes_in_training(emulated_cudnn, rng):
  params = stllm.init_params(tiny_config('xla'), jax.random.key(0))
  batch = random_batch(rng, tiny_config('xla'), batch_size=2, num_frames=2, text_len=6, qformer_text_len=5)
  forward = jax.jit(training_pass, static_argnums=0)
  xla = forward(tiny_config('xla'), params, batch)
  assert not emulated_cudnn
  for got, want in zip(forward(tiny_config('cudnn'), params, batch), xla):
    assert relative_error(got, want) < 1e-6
  # Training hands cuDNN no mask at all (so none of its bias constraints apply): causality and lengths only.
  assert all(call['mask'] is None for call in emulated_cudnn)
  llm_calls = [c for c in emulated_cudnn if c['query'][-1] == 8 and c['is_causal']]
  qformer_self = [c for c in emulated_cudnn if c['key_lengths'] and not c['is_causal']]
  assert llm_calls and all(c['key_lengths'] for c in llm_calls)  # student and teacher
  assert qformer_self and all(c['query'][1] == 4 + 5 for c in qformer_self)  # 4 queries + 5 text tokens
  assert {c['query'][1] for c in emulated_cudnn if not c['is_causal'] and not c['key_lengths']} >= {5, 2, 4}
  # ^ ViT and BT-Adapter spatial (5 tokens), temporal (2 frames), Q-Former cross-attention (4 queries)


def test_the_llm_forward_and_generation_on_the_cudnn_path_compute_what_xla_computes(emulated_cudnn):
  """Padding anywhere (a forward on any mask, generation's left-padded prefix) reaches cuDNN as a bias over the
  full score matrix: a forward, a prefill into the KV cache and a decode step."""
  params = stllm.init_params(tiny_config('xla'), jax.random.key(0))['llm']
  embeddings = jax.random.normal(jax.random.key(1), (2, 5, 32))  # [B, P, D]
  mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 0, 1, 1]], jnp.int32)  # left padding, a hole

  def forward_prefill_and_one_step(llm_params, impl):
    lm = llama.Llama(tiny_config(impl).llm, attention_impl=impl)
    hidden = lm.apply({'params': llm_params}, embeddings, mask)
    first, cache, slot_mask, positions = generate.prefill(lm, llm_params, embeddings, mask, 7)
    token = jnp.argmax(first, axis=-1).astype(jnp.int32)
    second, _ = generate.decode_step(lm, llm_params, token, slot_mask.at[:, 5].set(1), positions, cache)
    return hidden, first, second

  run = jax.jit(forward_prefill_and_one_step, static_argnums=1)
  for got, want in zip(run(params, 'cudnn'), run(params, 'xla')):
    assert relative_error(got, want) < 1e-6
  assert emulated_cudnn and all(call['mask'] is not None for call in emulated_cudnn)
