"""The ST-LLM composition: whole-model parity, video modes, the forward contract, 7B parameter counts."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import convert, hf_llm_logits, hf_visual_tokens, random_batch, torch_images
from stllm_jax.convert import strict
from stllm_jax.data import transforms
from stllm_jax.models import stllm
from stllm_jax.models.stllm import STLLM


def test_one_frame_equals_instructblip_forward(hf_instructblip, converted, parity, rng):
  cfg, params = converted
  batch = random_batch(rng, stllm.model_config(cfg), batch_size=2, num_frames=1)
  k = cfg.qformer.num_query_tokens
  # InstructBLIP puts the projected queries where `input_ids` holds the image token: all K of them first.
  image_ids = np.full((2, k), hf_instructblip.config.image_token_index)
  with torch.no_grad():
    reference = hf_instructblip(
        pixel_values=torch_images(batch['frames'][:, 0]),
        qformer_input_ids=torch.tensor(batch['qformer_input_ids']).long(),
        qformer_attention_mask=torch.tensor(batch['qformer_attention_mask']).long(),
        input_ids=torch.tensor(np.concatenate([image_ids, batch['input_ids']], 1)).long(),
        attention_mask=torch.tensor(np.concatenate([np.ones((2, k)), batch['attention_mask']], 1)).long()).logits
  ours = jax.jit(STLLM(cfg).apply)({'params': params}, batch)
  assert ours.shape == (2, k + 6, cfg.llm.vocab_size) and ours.dtype == jnp.float32
  assert parity('ST-LLM 1 frame vs InstructBLIP forward (logits)', 'float32', ours, reference) < 1e-5


@pytest.mark.parametrize('dtype, tolerance', [('float32', 1e-5), ('bfloat16', 5e-2)])
def test_frames_in_time_order_equal_hugging_face_composite(hf_instructblip, parity, rng, dtype, tolerance):
  cfg, params = convert(hf_instructblip, dtype=dtype)
  batch = random_batch(rng, stllm.model_config(cfg), batch_size=2, num_frames=3)
  visual = hf_visual_tokens(hf_instructblip, batch)  # [B, T, K, D]
  reference = hf_llm_logits(hf_instructblip, visual.reshape(2, -1, visual.shape[-1]), batch)
  ours = jax.jit(STLLM(cfg).apply)({'params': params}, batch)
  assert ours.shape == (2, 3 * 4 + 6, cfg.llm.vocab_size)
  assert parity('ST-LLM 3 frames, video_input=all (logits)', dtype, ours, reference) < tolerance


def test_mean_pooling_baseline_equals_hugging_face_composite(hf_instructblip, parity, rng):
  cfg, params = convert(hf_instructblip, video_input='mean')
  batch = random_batch(rng, stllm.model_config(cfg), batch_size=2, num_frames=3)
  reference = hf_llm_logits(hf_instructblip, hf_visual_tokens(hf_instructblip, batch).mean(1), batch)
  ours = jax.jit(STLLM(cfg).apply)({'params': params}, batch)
  assert ours.shape == (2, 4 + 6, cfg.llm.vocab_size)
  assert parity('ST-LLM 3 frames, video_input=mean (logits)', 'float32', ours, reference) < 1e-5


def test_frame_order_matters_for_all_but_not_for_mean(hf_instructblip, rng):
  batch = random_batch(rng, stllm.model_config(convert(hf_instructblip)[0]), num_frames=3)
  reversed_batch = dict(batch, frames=batch['frames'][:, ::-1])
  for mode, order_matters in (('all', True), ('mean', False)):
    cfg, params = convert(hf_instructblip, video_input=mode)
    apply = jax.jit(STLLM(cfg).apply)
    forward = lambda b, apply=apply, params=params: np.asarray(apply({'params': params}, b))[:, -1]
    same = np.allclose(forward(batch), forward(reversed_batch), atol=1e-5)
    assert same != order_matters, mode


def test_batch_mistakes_are_named(converted, rng):
  cfg, params = converted
  batch = random_batch(rng, stllm.model_config(cfg))
  model = STLLM(cfg)
  with pytest.raises(KeyError, match=r"lacks \['qformer_attention_mask'\]"):
    model.apply({'params': params}, {k: v for k, v in batch.items() if k != 'qformer_attention_mask'})
  with pytest.raises(ValueError, match=r'frames.*\[B, T, H, W, 3\]'):
    model.apply({'params': params}, dict(batch, frames=batch['frames'][:, 0]))
  with pytest.raises(ValueError, match='input_ids.*attention_mask'):
    model.apply({'params': params}, dict(batch, attention_mask=batch['attention_mask'][:, :3]))
  with pytest.raises(ValueError, match='frames.*uint8 RGB or normalised float.*int32'):
    model.apply({'params': params}, dict(batch, frames=batch['frames'].astype(np.int32)))


def test_uint8_frames_are_normalised_on_the_device_to_the_hosts_bits(converted, rng):
  every_value = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)  # [256, 3]
  on_device = np.asarray(jax.jit(stllm.normalized_frames)(every_value))
  assert on_device.dtype == np.float32
  np.testing.assert_array_equal(on_device, transforms.normalize(every_value))
  floats = rng.standard_normal((2, 3)).astype(np.float32)
  assert stllm.normalized_frames(floats) is floats  # float frames are normalised already
  cfg, params = converted
  batch = random_batch(rng, stllm.model_config(cfg), num_frames=2)
  pixels = rng.integers(0, 256, batch['frames'].shape, dtype=np.uint8)
  apply = jax.jit(STLLM(cfg).apply)
  from_pixels = apply({'params': params}, dict(batch, frames=pixels))
  from_floats = apply({'params': params}, dict(batch, frames=transforms.normalize(pixels)))
  # The same frames reach the vision tower; XLA fuses the two programs differently after it (float rounding).
  np.testing.assert_allclose(from_pixels, from_floats, rtol=0, atol=1e-5)
  assert not np.allclose(from_pixels, apply({'params': params}, dict(batch, frames=pixels.astype(np.float32))),
                         atol=1e-2)  # uint8 values read as floats would be unnormalised frames


def test_config_typos_and_bad_values_are_named():
  cfg = stllm.default_config()
  cfg.llm.num_layer = 2
  with pytest.raises(ValueError, match='model.llm.num_layer.*did you mean model.llm.num_layers'):
    stllm.model_config(cfg)
  cfg = stllm.default_config()
  cfg.video_input = 'tubes'
  with pytest.raises(ValueError, match="video_input='tubes'"):
    stllm.model_config(cfg)
  cfg = stllm.default_config().to_dict()  # a plain dict: ConfigDict would refuse the str itself
  cfg['llm']['num_layers'] = '32'
  with pytest.raises(TypeError, match='model.llm.num_layers must be int'):
    stllm.model_config(cfg)


def test_7b_parameter_counts(report):
  """The paper's 7B model, counted from shapes alone (nothing is allocated)."""
  params = strict.abstract_leaves(stllm.abstract_variables(stllm.default_config()))
  count = lambda prefix: sum(math.prod(v.shape) for k, v in params.items() if k.startswith(prefix))
  counts = {name: count(prefix) for name, prefix in
            (('LLM (Vicuna-7B, vocab 32001)', 'llm/'), ('EVA-ViT-g (39 blocks)', 'vision/'),
             ('ln_vision', 'ln_vision/'), ('Q-Former (+ query tokens, text embeddings, text FFNs)', 'qformer/'),
             ('projection', 'projection/'))}
  counts['total'] = sum(counts.values())
  for name, n in counts.items():
    report('7B parameter counts (jax.eval_shape)', f'{name:<56} {n:>14,d}')
  assert counts['LLM (Vicuna-7B, vocab 32001)'] == 6_738_415_616 + 2 * 4096  # LLaMA-7B + one [PAD] row twice
  assert abs(counts['EVA-ViT-g (39 blocks)'] / 0.99e9 - 1) < 0.01
  assert abs(counts['Q-Former (+ query tokens, text embeddings, text FFNs)'] / 0.19e9 - 1) < 0.03
  assert counts['projection'] == 768 * 4096 + 4096
  assert counts['ln_vision'] == 2 * 1408


def test_global_local_at_initialisation_equals_the_local_frames_alone(rng):
  """f_m's up projection starts at zero, so the model first sees the 4 local frames exactly."""
  from stllm_jax import configlib  # pylint: disable=g-import-not-at-top
  config = configlib.load_config_file('configs/tiny.py').model
  config.video_input, config.num_local_frames = 'global_local', 4
  cfg = stllm.model_config(config)
  params = stllm.init_params(cfg, jax.random.key(0))
  assert not np.any(params['global_up']['kernel']) and not np.any(params['global_up']['bias'])
  batch = random_batch(rng, cfg, num_frames=8)
  local = stllm.local_frame_indices(8, 4)
  np.testing.assert_array_equal(local, [1, 3, 5, 7])
  np.testing.assert_array_equal(stllm.local_frame_indices(64, 16), np.arange(2, 64, 4))
  # exactly: the visual tokens from the same frame tokens
  frame_tokens = jax.random.normal(jax.random.key(1), (2, 8, 8, cfg.llm.width))
  arranged = STLLM(cfg).apply({'params': params}, frame_tokens, method='arrange_video')
  np.testing.assert_array_equal(np.asarray(arranged), np.asarray(frame_tokens[:, local].reshape(2, 32, -1)))
  # and the whole model (the vision tower sees 8 frames instead of 4: float rounding only)
  config.video_input = 'all'
  local_only = jax.jit(STLLM(stllm.model_config(config)).apply)(
      {'params': {k: v for k, v in params.items() if not k.startswith('global_')}},
      dict(batch, frames=batch['frames'][:, local]))
  forward = jax.jit(lambda p, b: STLLM(cfg).apply({'params': p}, b))
  global_local = forward(params, batch)
  assert global_local.shape == (2, 4 * 8 + 6, cfg.llm.vocab_size)
  np.testing.assert_allclose(np.asarray(global_local), np.asarray(local_only), rtol=1e-5, atol=1e-5)

  # once f_m is non-zero the global frames matter
  shifted = dict(params, global_up={'kernel': params['global_up']['kernel'] + 0.1, 'bias': params['global_up']['bias']})
  assert not np.allclose(forward(shifted, batch), global_local)
  with pytest.raises(ValueError, match='at least num_local_frames=4 frames, got 2'):
    forward(params, dict(batch, frames=batch['frames'][:, :2]))


def test_new_parts_start_as_the_released_code_starts_them(tiny_config):
  """down_proj: PyTorch's Linear weight, zero bias; up_proj: zeros; MVM head Linear: PyTorch's default
  (weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)))."""
  config = tiny_config()
  config.model.video_input = 'global_local'
  config.model.num_local_frames = 2
  params = stllm.init_params(config.model, jax.random.key(0))
  bound = 1 / math.sqrt(config.model.llm.width)  # fan_in 64: 0.125
  for kernel in (params['global_down']['kernel'], params['mvm_dense']['kernel'], params['mvm_dense']['bias']):
    values = np.asarray(kernel)
    assert np.abs(values).max() <= bound and abs(values.std() - bound / math.sqrt(3)) < 0.15 * bound
  assert not np.any(np.asarray(params['global_down']['bias']))
  assert not np.any(np.asarray(params['global_up']['kernel'])) and not np.any(np.asarray(params['global_up']['bias']))


def test_abstract_variables_are_traced_once_per_config_and_each_call_may_edit_its_own(tiny_config):
  traced = []
  listener = lambda event, duration, **kwargs: traced.append(event) if event.endswith('jaxpr_trace_duration') else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    config = tiny_config().model
    config.llm.num_layers += 1  # a config no other test has traced in this process
    first = stllm.abstract_variables(config)
    assert traced  # the model's init, traced under eval_shape
    traced.clear()
    second = stllm.abstract_variables(stllm.model_config(config))  # the same config as a dataclass
    assert not traced
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert jax.tree_util.tree_structure(first) == jax.tree_util.tree_structure(second)
  first['params'].pop('llm')
  assert 'llm' in second['params'] and 'llm' in stllm.abstract_variables(config)['params']
