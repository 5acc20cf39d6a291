"""The train step: MVM teacher, gradient accumulation, freezing, LoRA, non-finite steps."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np

from conftest import relative_error
from stllm_jax import step
from stllm_jax.data.random_batches import RandomBatches
from stllm_jax.models import stllm
from stllm_jax.models.stllm import STLLM


def setup(config, params, **train_overrides):
  config.train.update(train_overrides)
  model_cfg, train_cfg = stllm.model_config(config.model), step.train_config(config.train)
  trainable, frozen = step.split_params(params, train_cfg.frozen)
  schedule = step.make_schedule(train_cfg, 10)
  tx = step.make_optimizer(train_cfg, schedule)
  state = step.TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=tx.init(trainable),
                          rng=jax.random.key_data(jax.random.key(0)))
  fn = jax.jit(functools.partial(step.train_step, model=STLLM(model_cfg), cfg=train_cfg, tx=tx, schedule=schedule),
               static_argnames='n_keep')
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


def test_no_gradient_flows_through_the_teacher(tiny_config, tiny_params):
  """The step's gradient equals that of the same loss with the teacher replaced by a constant."""
  config = tiny_config()
  model_cfg, train_cfg, state, frozen, _, data = setup(config, tiny_params, grad_accum_steps=1)
  batch = model_batch(data)
  model = STLLM(model_cfg)
  key, n_keep = jax.random.key(3), 20
  loss_fn = functools.partial(step.micro_batch_loss, model=model, cfg=train_cfg, n_keep=n_keep,
                              lm_norm=jnp.float32(10.0), mvm_norm=1.0)

  def constant_teacher_loss(trainable, frozen, batch, key, teacher):
    apply = functools.partial(model.apply, {'params': step.merge_params(trainable, frozen)})
    visual = apply(batch, method='visual_tokens')
    keep = step.masking.keep_indices(key, visual.shape[0], visual.shape[1], n_keep)
    embeddings, mask = apply(step.masking.gather_tokens(visual, keep), batch['input_ids'], batch['attention_mask'],
                             method='embed_inputs')
    hidden = apply(embeddings, mask, method=lambda m, e, k: m.llm(e, k))
    text_hidden = hidden[:, n_keep - 1:n_keep - 1 + batch['input_ids'].shape[1]]
    lm_sum, _ = step.losses.lm_loss_sum(apply(text_hidden, method=lambda m, h: m.llm.logits(h)),
                                        batch['input_ids'], batch['answer_mask'])
    student = apply(hidden[:, :n_keep], method='mvm_head')
    return lm_sum / 10.0 + step.losses.mvm_loss(student, step.masking.gather_tokens(teacher, keep))

  def teacher_hidden(trainable, frozen, batch):
    apply = functools.partial(model.apply, {'params': step.merge_params(trainable, frozen)})
    visual = apply(batch, method='visual_tokens')
    return apply(visual, jnp.ones(visual.shape[:2], jnp.int32), method=lambda m, e, k: m.llm(e, k))

  teacher = jax.jit(teacher_hidden)(state.params, frozen, batch)
  (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(state.params, frozen, batch, key)
  ref_loss, ref_grads = jax.jit(jax.value_and_grad(constant_teacher_loss))(state.params, frozen, batch, key, teacher)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    ref = ref_grads
    for k in path:
      ref = ref[k.key]
    assert relative_error(g, ref) < 1e-4, jax.tree_util.keystr(path)


def test_gradient_accumulation_equals_one_large_batch(tiny_config, tiny_params):
  results = []
  for accum in (1, 4):
    config = tiny_config()
    config.train.masking.enabled = False  # no random positions: both runs see identical inputs
    _, _, state, frozen, fn, data = setup(config, tiny_params, grad_accum_steps=accum, batch_size=8)
    new_state, metrics = fn(state, frozen, model_batch(data), n_keep=32)
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
    state, metrics = fn(state, frozen, model_batch(data), n_keep=20)
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
  np.testing.assert_array_equal(np.asarray(lora_logits), np.asarray(base_logits))

  _, _, state, frozen, fn, data = setup(config, with_lora)
  trainable_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]]
  assert all('lora' in p for p in trainable_paths if p.startswith("['llm']"))
  before = jax.tree_util.tree_map(np.array, frozen['llm'])
  for _ in range(2):
    state, _ = fn(state, frozen, model_batch(data), n_keep=20)
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.tree_util.tree_map(np.array, frozen['llm']), before)
  lora_b = state.params['llm']['blocks']['layers']['attention']['query']['lora']['b']
  assert np.any(np.asarray(lora_b) != 0)


def test_non_finite_step_changes_nothing(tiny_config, tiny_params):
  config = tiny_config()
  _, _, state, frozen, fn, data = setup(config, tiny_params)
  batch = model_batch(data)
  batch['frames'] = batch['frames'] * np.nan
  before = jax.tree_util.tree_map(np.array, (state.params, state.opt_state))
  new_state, metrics = fn(state, frozen, batch, n_keep=20)
  assert not bool(metrics['finite'])
  after = jax.tree_util.tree_map(np.array, (new_state.params, new_state.opt_state))
  jax.tree_util.tree_map(np.testing.assert_array_equal, after, before)
  assert int(new_state.step) == 1 and int(step.optimizer_count(new_state.opt_state)) == 0
