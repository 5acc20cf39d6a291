"""The train step: MVM teacher, gradient accumulation, freezing, LoRA, non-finite steps."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np

from conftest import relative_error
from stllm_jax import step
from stllm_jax import params as params_lib
from stllm_jax.data.random_batches import RandomBatches
from stllm_jax.models import stllm
from stllm_jax.models.stllm import STLLM


def setup(config, params, **train_overrides):
  config.train.update(train_overrides)
  model_cfg, train_cfg = stllm.model_config(config.model), step.train_config(config.train)
  trainable, frozen = params_lib.split_params(params, train_cfg.frozen)
  schedule = step.make_schedule(train_cfg, 10)
  tx = step.make_optimizer(train_cfg, schedule)
  state = step.TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=tx.init(trainable),
                          rng=jax.random.key_data(jax.random.key(0)))
  fn = jax.jit(functools.partial(step.train_step, model=STLLM(model_cfg), cfg=train_cfg, tx=tx, schedule=schedule),
               static_argnames='n_slots')
  data = RandomBatches(config.data, model_cfg, train_cfg.batch_size)
  return model_cfg, train_cfg, state, frozen, fn, data


def model_batch(data):
  return {k: v for k, v in next(data).items() if k in step.MODEL_BATCH_KEYS}


def test_teacher_on_the_visual_prefix_equals_the_full_sequence(tiny_config, tiny_params):
  cfg = stllm.model_config(tiny_config().model)
  batch = next(RandomBatches(tiny_config().data, cfg, 2))
  model = STLLM(cfg)

  def hidden_states(params, batch):
    visual = model.apply({'params': params}, batch, method='visual_tokens')
    embeddings, mask = model.apply({'params': params}, visual, batch['input_ids'], batch['attention_mask'],
                                   method='embed_inputs')
    full = model.apply({'params': params}, embeddings, mask, method=lambda m, e, k: m.llm(e, k))
    prefix = model.apply({'params': params}, visual, jnp.ones(visual.shape[:2], jnp.int32),
                         method=lambda m, e, k: m.llm(e, k))
    return full[:, :visual.shape[1]], prefix

  full, prefix = jax.jit(hidden_states)(tiny_params, {k: batch[k] for k in stllm.BATCH_KEYS})
  assert relative_error(prefix, full) < 1e-6


def micro_loss(model, train_cfg, n_slots):
  return functools.partial(step.micro_batch_loss, model=model, cfg=train_cfg, n_slots=n_slots,
                           lm_norm=jnp.float32(10.0), mvm_norm=1.0)


def test_no_gradient_flows_through_the_teacher(tiny_config, tiny_params):
  """The step's gradient equals that of the same loss with the teacher replaced by a constant."""
  config = tiny_config()
  model_cfg, train_cfg, state, frozen, _, data = setup(config, tiny_params, grad_accum_steps=1)
  batch = model_batch(data)
  model = STLLM(model_cfg)
  key, n_keep = jax.random.key(3), 20

  def constant_teacher_loss(trainable, frozen, batch, key, teacher):
    mask_key, _ = jax.random.split(key)
    keep = step.masking.keep_indices(mask_key, batch['frames'].shape[0], teacher.shape[1], n_keep)
    out = model.apply({'params': params_lib.merge_params(trainable, frozen)}, batch, keep, n_keep, True,
                      method='training_pass')
    lm_sum, _ = step.losses.lm_loss_sum(out.text_logits, batch['input_ids'], batch['answer_mask'])
    return lm_sum / 10.0 + step.losses.mvm_loss(out.student, step.masking.gather_tokens(teacher, keep))

  def teacher_hidden(trainable, frozen, batch):
    apply = functools.partial(model.apply, {'params': params_lib.merge_params(trainable, frozen)})
    visual = apply(batch, method='visual_tokens')
    return apply(visual, jnp.ones(visual.shape[:2], jnp.int32), method=lambda m, e, k: m.llm(e, k))

  teacher = jax.jit(teacher_hidden)(state.params, frozen, batch)
  loss_fn = micro_loss(model, train_cfg, n_keep)
  (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(state.params, frozen, batch, key,
                                                                        jnp.int32(n_keep))
  ref_loss, ref_grads = jax.jit(jax.value_and_grad(constant_teacher_loss))(state.params, frozen, batch, key, teacher)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    ref = ref_grads
    for k in path:
      ref = ref[k.key]
    assert relative_error(g, ref) < 1e-4, jax.tree_util.keystr(path)


def test_padding_the_kept_tokens_to_a_bucket_changes_neither_loss_nor_gradients(tiny_config, tiny_params, report):
  """17 kept tokens in 17 slots (exact) against the same 17 in 24 slots (padded): equal loss and gradients."""
  config = tiny_config()
  model_cfg, train_cfg, state, frozen, _, data = setup(config, tiny_params, grad_accum_steps=1)
  batch, key = model_batch(data), jax.random.key(5)
  results = {}
  for n_slots in (17, 24):
    loss_fn = jax.jit(jax.value_and_grad(micro_loss(STLLM(model_cfg), train_cfg, n_slots), has_aux=True))
    results[n_slots] = loss_fn(state.params, frozen, batch, key, jnp.int32(17))
  ((exact_loss, exact_aux), exact_grads), ((padded_loss, padded_aux), padded_grads) = results[17], results[24]
  assert float(exact_aux['mvm']) > 0
  np.testing.assert_allclose(padded_loss, exact_loss, rtol=1e-6)
  np.testing.assert_allclose(padded_aux['mvm'], exact_aux['mvm'], rtol=1e-6)
  errors = [relative_error(p, e) for p, e in zip(jax.tree_util.tree_leaves(padded_grads),
                                                 jax.tree_util.tree_leaves(exact_grads))]
  assert max(errors) <= 1e-6, max(errors)
  report('masking: a step padded from 17 to 24 slots against the exact one (float32)',
         f'loss rel {abs(float(padded_loss - exact_loss)) / float(exact_loss):.1e}, '
         f'gradients max rel {max(errors):.1e} over {len(errors)} leaves')


def test_gradient_accumulation_equals_one_large_batch(tiny_config, tiny_params):
  results = []
  for accum in (1, 4):
    config = tiny_config()
    config.train.masking.enabled = False  # no random positions: both runs see identical inputs
    _, _, state, frozen, fn, data = setup(config, tiny_params, grad_accum_steps=accum, batch_size=8)
    new_state, metrics = fn(state, frozen, model_batch(data), np.int32(32), n_slots=32)
    results.append((metrics, new_state.params))
  (m1, p1), (m4, p4) = results
  np.testing.assert_allclose(m1['loss'], m4['loss'], rtol=1e-5)
  np.testing.assert_allclose(m1['grad_norm'], m4['grad_norm'], rtol=1e-4)
  assert relative_error(p4['llm']['blocks']['layers']['mlp']['up']['kernel'],
                        p1['llm']['blocks']['layers']['mlp']['up']['kernel']) < 1e-5


def test_micro_batches_take_every_nth_sample():
  batch = {'x': jnp.arange(8)}
  np.testing.assert_array_equal(step.split_micro_batches(batch, 2)['x'], [[0, 2, 4, 6], [1, 3, 5, 7]])


def test_frozen_params_stay_bit_identical_and_get_no_optimizer_state(tiny_config, tiny_params):
  config = tiny_config()
  _, train_cfg, state, frozen, fn, data = setup(config, tiny_params)
  assert set(frozen) == {'vision', 'ln_vision', 'qformer'}
  assert not any(k in state.params for k in frozen)
  assert not any(k in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
                 for k in ('vision', 'qformer'))
  before_frozen = jax.tree_util.tree_map(np.array, frozen)
  before = jax.tree_util.tree_map(np.array, state.params)
  for _ in range(3):
    state, metrics = fn(state, frozen, model_batch(data), np.int32(20), n_slots=20)
  assert bool(metrics['finite'])
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.tree_util.tree_map(np.array, frozen), before_frozen)
  changed = jax.tree_util.tree_map(lambda a, b: not np.array_equal(a, b), before, jax.tree_util.tree_map(np.array, state.params))
  assert all(jax.tree_util.tree_leaves(changed))  # every trainable leaf moved


def test_lora_trains_adapters_only_and_starts_as_the_base_model(tiny_config, tiny_params):
  config = tiny_config()
  config.model.llm.update(lora_rank=4, lora_targets=('query', 'value', 'up'))
  config.train.frozen = ('vision/.*', 'ln_vision/.*', 'qformer/.*', 'llm/(?!.*/lora/).*')
  lora_params = stllm.init_params(config.model, jax.random.key(1))
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(lora_params)[0]}
  assert any('lora' in k for k in flat)
  # fresh adapters (B = 0) compute what the base model computes
  flat_base = flax.traverse_util.flatten_dict(tiny_params, sep='/')
  with_lora = flax.traverse_util.unflatten_dict(
      {k: flat_base.get(k, v) for k, v in flax.traverse_util.flatten_dict(lora_params, sep='/').items()}, sep='/')
  base = tiny_params
  cfg = stllm.model_config(config.model)
  batch = {k: v for k, v in next(RandomBatches(config.data, cfg, 2)).items() if k in stllm.BATCH_KEYS}
  base_logits = jax.jit(lambda p, b: STLLM(tiny_config().model).apply({'params': p}, b))(base, batch)
  lora_logits = jax.jit(lambda p, b: STLLM(cfg).apply({'params': p}, b))(with_lora, batch)
  # Equal up to float rounding: the two programs fuse differently (the update x.A.B is exactly 0).
  assert relative_error(lora_logits, base_logits) < 1e-6

  _, _, state, frozen, fn, data = setup(config, with_lora)
  trainable_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]]
  assert all('lora' in p for p in trainable_paths if p.startswith("['llm']"))
  before = jax.tree_util.tree_map(np.array, frozen['llm'])
  for _ in range(2):
    state, _ = fn(state, frozen, model_batch(data), np.int32(20), n_slots=20)
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.tree_util.tree_map(np.array, frozen['llm']), before)
  lora_b = state.params['llm']['blocks']['layers']['attention']['query']['lora']['b']
  assert np.any(np.asarray(lora_b) != 0)


def test_non_finite_step_changes_nothing(tiny_config, tiny_params):
  config = tiny_config()
  _, _, state, frozen, fn, data = setup(config, tiny_params)
  batch = model_batch(data)
  batch['frames'] = batch['frames'] * np.nan
  before = jax.tree_util.tree_map(np.array, (state.params, state.opt_state))
  new_state, metrics = fn(state, frozen, batch, np.int32(20), n_slots=20)
  assert not bool(metrics['finite'])
  after = jax.tree_util.tree_map(np.array, (new_state.params, new_state.opt_state))
  jax.tree_util.tree_map(np.testing.assert_array_equal, after, before)
  assert int(new_state.step) == 1 and int(step.optimizer_count(new_state.opt_state)) == 0


def adapter_config(tiny_config, dropout=0.1):
  """The tiny model with the QA recipe's parts: a 1-layer BT-Adapter beside the ViT's last block, Q-Former
  dropout."""
  config = tiny_config()
  config.model.vision.bt_adapter.depth = 1
  config.model.qformer.dropout = dropout
  return config


def test_the_adapter_trains_through_the_frozen_towers_with_dropout_on(tiny_config):
  config = adapter_config(tiny_config)
  params = stllm.init_params(config.model, jax.random.key(0))
  model_cfg, train_cfg, state, frozen, fn, data = setup(config, params, grad_accum_steps=1)
  assert 'bt_adapter' in state.params and set(frozen) == {'vision', 'ln_vision', 'qformer'}
  batch = model_batch(data)
  loss_fn = micro_loss(STLLM(model_cfg), train_cfg, 32)
  loss_and_grads = jax.jit(jax.value_and_grad(lambda *a: loss_fn(*a)[0]))
  (losses, grads) = zip(*[loss_and_grads(state.params, frozen, batch, jax.random.key(k), jnp.int32(20))
                          for k in (1, 1, 2)])
  assert float(losses[0]) == float(losses[1]) != float(losses[2])  # dropout: the same key repeats, another differs
  adapter_grad = grads[0]['bt_adapter']
  assert float(optax_norm(adapter_grad['spatial_0'])) > 0 and float(optax_norm(adapter_grad['temporal_0'])) > 0

  before_frozen = jax.tree_util.tree_map(np.array, frozen)
  before = jax.tree_util.tree_map(np.array, state.params['bt_adapter'])
  state, metrics = fn(state, frozen, batch, np.int32(20), n_slots=32)
  assert bool(metrics['accepted'])
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.tree_util.tree_map(np.array, frozen), before_frozen)
  moved = flax.traverse_util.flatten_dict(jax.tree_util.tree_map(
      lambda a, b: not np.array_equal(a, b), before, jax.tree_util.tree_map(np.array, state.params['bt_adapter'])),
      sep='/')
  # Every leaf moves but those behind the zero-initialised temporal_fc (no gradient until it is non-zero).
  behind_temporal_fc = [k for k in moved if k.startswith('temporal_0/') and not k.startswith('temporal_0/temporal_fc')]
  assert behind_temporal_fc and not any(moved[k] for k in behind_temporal_fc)
  assert all(v for k, v in moved.items() if k not in behind_temporal_fc), moved


def test_inference_is_deterministic_whatever_the_dropout(tiny_config):
  config = adapter_config(tiny_config, dropout=0.5)
  params = stllm.init_params(config.model, jax.random.key(0))
  cfg = stllm.model_config(config.model)
  batch = {k: v for k, v in next(RandomBatches(config.data, cfg, 2)).items() if k in stllm.BATCH_KEYS}
  without = STLLM(stllm.model_config(adapter_config(tiny_config, dropout=0.0).model))
  logits = jax.jit(lambda p, b: STLLM(cfg).apply({'params': p}, b))(params, batch)
  reference = jax.jit(lambda p, b: without.apply({'params': p}, b))(params, batch)
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(reference))


def optax_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(tree)))


def test_lora_follows_the_released_settings_and_drops_out_in_training_only(tiny_config):
  from stllm_jax import configlib  # pylint: disable=g-import-not-at-top
  released = configlib.load_config_file('configs/stllm_7b_lora.py').model.llm
  assert (released.lora_alpha, tuple(released.lora_targets), released.lora_dropout) == (32.0, ('query', 'value'), 0.05)
  config = tiny_config()
  config.model.llm.update(lora_rank=4, lora_dropout=0.5)
  cfg = stllm.model_config(config.model)
  params = stllm.init_params(config.model, jax.random.key(1))
  query_lora = params['llm']['blocks']['layers']['attention']['query']['lora']
  bound = 1 / np.sqrt(config.model.llm.width)  # A: PyTorch's Linear default, as PEFT starts it
  assert np.abs(np.asarray(query_lora['a'])).max() <= bound and not np.any(np.asarray(query_lora['b']))
  query_lora['b'] = jnp.ones_like(query_lora['b'])  # a trained adapter: its input's dropout shows
  batch = {k: v for k, v in next(RandomBatches(config.data, cfg, 2)).items() if k in stllm.BATCH_KEYS}
  model = STLLM(cfg)
  train_pass = jax.jit(lambda p, key: model.apply({'params': p}, batch, None, 32, False, rngs={'dropout': key},
                                                  method='training_pass').text_logits)
  a, b, c = (np.asarray(train_pass(params, jax.random.key(k))) for k in (1, 1, 2))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  inference = jax.jit(lambda p: model.apply({'params': p}, batch))
  without = STLLM(stllm.model_config(dict(config.model.to_dict(), llm=dict(config.model.llm.to_dict(),
                                                                            lora_dropout=0.0))))
  np.testing.assert_array_equal(np.asarray(inference(params)),
                                np.asarray(jax.jit(lambda p: without.apply({'params': p}, batch))(params)))
