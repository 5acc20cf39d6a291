"""The BT-Adapter against an independent PyTorch tower with the released parameter names
(`stllm_jax/convert/bt_adapter_reference.py`, loaded through `mappings.bt_adapter_rules`), the ViT's last-block
outputs, training-mode dropout, and the released start point."""

import dataclasses
import functools
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import PartitionSpec

from conftest import (convert, hf_frame_tokens, hf_llm_logits, random_batch, randomize_, relative_error,
                      tiny_hf_instructblip_config)
from stllm_jax import configlib, sharding
from stllm_jax.convert import mappings, strict
from stllm_jax.convert.bt_adapter_reference import EvaViTWithBTAdapter
from stllm_jax.models import bt_adapter, layers, stllm
from stllm_jax.models.eva_vit import EVAViT
from stllm_jax.models.stllm import STLLM

# The reference tower: odd head count, a ViT deeper than the adapter (the adapter reads blocks 2, 3, 4).
TOWER = dict(image_size=42, patch_size=14, width=60, depth=5, num_heads=5, mlp_dim=100)
ADAPTER_DEPTH, MAX_FRAMES = 3, 16


def template(cfg, *prefixes):
  """Our flat param template, restricted to paths under `prefixes`."""
  leaves = strict.abstract_leaves(stllm.abstract_variables(cfg))
  return {path: leaf for path, leaf in leaves.items() if path.startswith(prefixes)}


@pytest.fixture(scope='module')
def world():
  """A tiny HF InstructBLIP (for ln_vision, the Q-Former, the projection and the LLM) whose vision width
  matches the reference tower, and the reference tower with every parameter random and non-zero."""
  config = tiny_hf_instructblip_config()
  config.vision_config.update(dict(hidden_size=TOWER['width'], intermediate_size=TOWER['mlp_dim'],
                                   num_hidden_layers=TOWER['depth'], num_attention_heads=TOWER['num_heads'],
                                   image_size=TOWER['image_size'], patch_size=TOWER['patch_size']))
  config.qformer_config.encoder_hidden_size = TOWER['width']
  torch.manual_seed(0)
  hf_model = randomize_(transformers.InstructBlipForConditionalGeneration(config), seed=2)
  tower = randomize_(EvaViTWithBTAdapter(**TOWER, adapter_depth=ADAPTER_DEPTH, max_frames=MAX_FRAMES), seed=3)
  assert all(torch.all(p != 0) for p in tower.parameters())
  return types.SimpleNamespace(hf=hf_model, tower=tower)


@pytest.fixture(scope='module')
def models(world):
  """scan_layers -> (config.model, params): HF's Q-Former and LLM, the reference tower's ViT and adapter."""
  out = {}
  for scan in (True, False):
    cfg, params = convert(world.hf, vision={'scan_layers': scan})
    cfg.vision.bt_adapter.update(depth=ADAPTER_DEPTH, max_frames=MAX_FRAMES)
    tower = strict.load_strict(world.tower.state_dict(), mappings.eva_vit_rules('') + mappings.bt_adapter_rules(''),
                               template(cfg, 'vision/', 'bt_adapter/'), 'the reference tower')
    out[scan] = cfg, {**params, **tower}
  return out


def torch_video(frames):
  """[B, T, H, W, 3] -> [B, T, 3, H, W]."""
  return torch.tensor(np.asarray(frames).transpose(0, 1, 4, 2, 3))


def reference_image_tokens(world, frames):
  """The reference tower, then ln_vision (HF's post_layernorm): [B*T, 1+P, W]."""
  return world.hf.vision_model.post_layernorm(world.tower(torch_video(frames)))


@pytest.mark.parametrize('num_frames', [1, 4, 16])
@pytest.mark.parametrize('scan', [True, False], ids=['scan', 'unrolled'])
def test_features_and_logits_match_the_reference(world, models, parity, num_frames, scan):
  cfg, params = models[scan]
  batch = random_batch(np.random.default_rng(num_frames), stllm.model_config(cfg), batch_size=2,
                       num_frames=num_frames)
  with torch.no_grad():
    image_tokens = reference_image_tokens(world, batch['frames'])
    visual = hf_frame_tokens(world.hf, image_tokens, batch)  # [B, T, K, D]
    logits = hf_llm_logits(world.hf, visual.reshape(2, -1, visual.shape[-1]), batch)
  model = STLLM(cfg)
  features = jax.jit(lambda p, f: model.apply({'params': p}, f, method=lambda m, f: m.ln_vision(m.vision_tokens(f))))(
      params, batch['frames'])
  layout = 'scan' if scan else 'unrolled'
  assert parity(f'BT-Adapter T={num_frames} ({layout}): features after ln_vision', 'float32', features,
                image_tokens) < 1e-5
  assert parity(f'BT-Adapter T={num_frames} ({layout}): logits', 'float32',
                jax.jit(model.apply)({'params': params}, batch), logits) < 1e-5


@pytest.mark.parametrize('num_frames', [1, 4, 16])
def test_adapter_gradients_match_torch_autograd(world, models, parity, report, num_frames):
  """d(loss)/d(adapter params) through the frozen ln_vision, Q-Former and projection."""
  cfg, params = models[True]
  batch = random_batch(np.random.default_rng(7), stllm.model_config(cfg), batch_size=2, num_frames=num_frames)
  k, d = cfg.qformer.num_query_tokens, cfg.llm.width
  weights = np.random.default_rng(8).standard_normal((2, num_frames, k, d)).astype(np.float32)

  def loss(adapter):
    tokens = STLLM(cfg).apply({'params': {**params, 'bt_adapter': adapter}}, batch['frames'],
                              batch['qformer_input_ids'], batch['qformer_attention_mask'], method='encode_frames')
    return jnp.sum(tokens * weights)

  ours = strict.flatten(jax.jit(jax.grad(loss))(params['bt_adapter']))
  named = {n: p for n, p in world.tower.named_parameters() if n.startswith('BTAdapter_')}
  tokens = hf_frame_tokens(world.hf, reference_image_tokens(world, batch['frames']), batch)
  torch_grads = torch.autograd.grad((tokens * torch.tensor(weights)).sum(), list(named.values()))
  reference = strict.flatten(strict.load_strict(dict(zip(named, torch_grads)), mappings.bt_adapter_rules(''),
                                                template(cfg, 'bt_adapter/'), 'the torch gradients')['bt_adapter'])
  assert set(ours) == set(reference)
  # frame-position rows past the video's frames get no gradient
  assert not np.any(ours['frame_position'][num_frames:]) and not np.any(reference['frame_position'][num_frames:])
  ours['frame_position'], reference['frame_position'] = (ours['frame_position'][:num_frames],
                                                         reference['frame_position'][:num_frames])
  errors = {}
  for path in sorted(reference):
    if np.any(reference[path]):
      errors[path] = relative_error(ours[path], reference[path])
    else:  # no gradient reaches it (one frame: the temporal q_bias, through a softmax over one key)
      np.testing.assert_array_equal(ours[path], 0)
  worst = max(errors, key=errors.get)
  report('BT-Adapter gradients: worst leaf', f'T={num_frames:<3} {worst:<46} {errors[worst]:.2e}')
  everything = lambda tree: np.concatenate([np.ravel(tree[p]) for p in sorted(tree)])
  assert parity(f'BT-Adapter T={num_frames}: gradients of all adapter params', 'float32', everything(ours),
                everything(reference)) < 1e-4
  assert errors[worst] < 1e-4, errors


def adapter_features(cfg):
  """params, frames -> the ViT's tokens (with the adapter if cfg has one), jitted."""
  tokens = jax.jit(functools.partial(STLLM(cfg).apply, method='vision_tokens'))
  return lambda params, frames: np.asarray(tokens({'params': params}, frames))


def test_frame_order_matters_to_the_adapter(models, rng):
  """Swapping two frames must do more than swap their outputs: the frame positions make the order
  matter. A tower that treats a video's frames as a set (no frame positions) swaps outputs exactly and
  fails the first check."""
  cfg, params = models[True]
  frames = rng.standard_normal((1, 4) + (TOWER['image_size'],) * 2 + (3,)).astype(np.float32)
  swapped = frames[:, [1, 0, 2, 3]]
  features = adapter_features(cfg)
  original, permuted = (features(params, f).reshape(1, 4, -1) for f in (frames, swapped))
  assert not np.allclose(permuted[:, [1, 0, 2, 3]], original, atol=1e-4)
  # and every frame's output depends on the other frames (no frame is encoded alone)
  alone = features(params, frames[:, :1]).reshape(1, 1, -1)
  assert not np.allclose(alone[:, 0], original[:, 0], atol=1e-4)
  # without the adapter, frames are encoded independently: a swap only swaps the outputs
  plain = dict(cfg.to_dict(), vision=dict(cfg.vision.to_dict(), bt_adapter={'depth': 0}))
  plain_params = {k: v for k, v in params.items() if k != 'bt_adapter'}
  features = adapter_features(plain)
  original, permuted = (features(plain_params, f).reshape(1, 4, -1) for f in (frames, swapped))
  np.testing.assert_allclose(permuted[:, [1, 0, 2, 3]], original, rtol=1e-5, atol=1e-5)


def test_too_many_frames_is_a_clear_error(models, rng):
  cfg, params = models[True]
  batch = random_batch(rng, stllm.model_config(cfg), num_frames=MAX_FRAMES + 1)
  message = rf'{MAX_FRAMES + 1} frames .*model\.vision\.bt_adapter\.max_frames={MAX_FRAMES}'
  with pytest.raises(ValueError, match=message):
    STLLM(cfg).apply({'params': params}, batch)


def test_sharded_forward_with_the_adapter_equals_single_device(models, rng):
  """Every adapter param has logical axes (`param_shardings` needs them) and the activation constraints
  hold on a data x fsdp x tensor mesh (5 heads do not split over tensor=2: replicated)."""
  cfg, params = models[True]
  batch = random_batch(rng, stllm.model_config(cfg), batch_size=4, num_frames=2)
  single = jax.jit(lambda p, b: STLLM(cfg).apply({'params': p}, b))(params, batch)
  mesh = sharding.make_mesh('data=2,fsdp=2,tensor=2')
  shardings = sharding.param_shardings(stllm.abstract_variables(cfg), mesh)
  assert shardings['bt_adapter']['frame_position'].spec == PartitionSpec(None, 'fsdp')
  assert shardings['bt_adapter']['temporal_0']['temporal_fc']['kernel'].spec == PartitionSpec(None, 'fsdp')
  placed = sharding.shard_params(params, shardings)
  with sharding.activate(mesh):
    sharded = jax.jit(lambda p, b: STLLM(cfg).apply({'params': p}, b))(placed, sharding.shard_batch(batch, mesh))
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=2e-5, atol=2e-5)


def test_adapter_config_is_validated():
  cfg = stllm.default_config()
  assert cfg.vision.bt_adapter.depth == 0  # off unless asked for
  cfg.vision.bt_adapter.depth = 40
  with pytest.raises(ValueError, match=r'model\.vision\.bt_adapter\.depth=40 must be in 0\.\.39'):
    stllm.model_config(cfg)
  cfg.vision.bt_adapter.update(depth=3, drop_path=1.0)
  with pytest.raises(ValueError, match=r'model\.vision\.bt_adapter\.drop_path'):
    stllm.model_config(cfg)
  cfg.vision.bt_adapter.drop_path = 0.1
  assert stllm.model_config(cfg).vision.bt_adapter.drop_path_rates() == (0.0, 0.05, 0.1)


@pytest.mark.parametrize('scan, unroll', [(True, 1), (True, 3), (False, 1)], ids=['scan', 'scan-no-loop', 'unrolled'])
def test_vit_returns_its_last_blocks_with_the_same_params(tiny_config, rng, scan, unroll):
  config = tiny_config().model
  config.vision.update(depth=3, scan_layers=scan, scan_unroll=unroll, remat_policy='full')
  vision_cfg = stllm.model_config(config).vision
  images = jnp.asarray(rng.standard_normal((2, 56, 56, 3)), jnp.float32)
  model = EVAViT(vision_cfg)
  variables = model.init(jax.random.key(0), images)
  # every param carries logical axis names (an unboxed leaf would fail here)
  shapes = lambda v: jax.tree_util.tree_map(lambda a: (a.value.shape, a.names), v,
                                            is_leaf=lambda a: isinstance(a, nn.LogicallyPartitioned))
  assert shapes(model.init(jax.random.key(0), images, last_blocks=2)) == shapes(variables)
  params = nn.unbox(variables)
  last, pos_embed = model.apply(params, images, last_blocks=2)  # [2, N, 17, D]
  np.testing.assert_array_equal(last[-1], model.apply(params, images))
  np.testing.assert_array_equal(pos_embed, params['params']['pos_embed'])
  # block 1's output is what a 2-block tower computes with the same first two blocks
  blocks = params['params']['blocks']
  two = {'layers': jax.tree_util.tree_map(lambda a: a[:2], blocks['layers'])} if scan else \
        {f'layers_{i}': blocks[f'layers_{i}'] for i in range(2)}
  shorter = EVAViT(dataclasses.replace(vision_cfg, depth=2))
  np.testing.assert_allclose(last[0], shorter.apply({'params': dict(params['params'], blocks=two)}, images),
                             rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------- training mode

@pytest.fixture(scope='module')
def stochastic_model(tiny_config, tiny_params):
  """The tiny model with a 2-layer adapter (from `init_from_vit`), Q-Former dropout 0.1, drop path 0.1."""
  config = tiny_config().model
  config.vision.bt_adapter.update(depth=2, max_frames=8)
  config.qformer.dropout = 0.1
  return config, bt_adapter.init_from_vit(tiny_params, config, jax.random.key(1))


def forwards(config):
  """The model's jitted forward: forward(params, batch) evaluates, forward(params, batch, key) trains with the
  dropout rng of that key."""
  model = STLLM(config)
  evaluate = jax.jit(lambda p, b: model.apply({'params': p}, b))
  train = jax.jit(lambda p, b, k: model.apply({'params': p}, b, deterministic=False, rngs={'dropout': k}))
  return lambda p, b, key=None: np.asarray(evaluate(p, b) if key is None else train(p, b, jax.random.key(key)))


def test_dropout_only_in_explicit_training_mode(stochastic_model, rng):
  config, params = stochastic_model
  batch = random_batch(rng, stllm.model_config(config), num_frames=3)
  forward = forwards(config)
  evaluation = forward(params, batch)
  np.testing.assert_array_equal(evaluation, np.asarray(jax.jit(
      lambda p, b: STLLM(config).apply({'params': p}, b, deterministic=True, rngs={'dropout': jax.random.key(5)}))(
          params, batch)))
  np.testing.assert_array_equal(forward(params, batch, key=1), forward(params, batch, key=1))
  assert not np.allclose(forward(params, batch, key=1), forward(params, batch, key=2))
  assert not np.allclose(forward(params, batch, key=1), evaluation)
  with pytest.raises(ValueError, match=r"training mode \(deterministic=False\).*needs a 'dropout' rng"):
    STLLM(config).apply({'params': params}, batch, deterministic=False)


@pytest.mark.parametrize('qformer_dropout, drop_path', [(0.1, 0.0), (0.0, 0.1)])
def test_each_kind_of_dropout_acts_alone(stochastic_model, rng, qformer_dropout, drop_path):
  config, params = stochastic_model
  config = configlib.to_dict(config)
  config['qformer']['dropout'], config['vision']['bt_adapter']['drop_path'] = qformer_dropout, drop_path
  batch = random_batch(rng, stllm.model_config(config), num_frames=3)
  forward = forwards(config)
  assert not np.allclose(forward(params, batch, key=1), forward(params, batch))


def test_training_mode_with_zero_rates_equals_evaluation(stochastic_model, rng):
  config, params = stochastic_model
  config = configlib.to_dict(config)
  config['qformer']['dropout'], config['vision']['bt_adapter']['drop_path'] = 0.0, 0.0
  batch = random_batch(rng, stllm.model_config(config), num_frames=3)
  model = STLLM(config)
  training = jax.jit(lambda p, b: model.apply({'params': p}, b, deterministic=False))(params, batch)  # no rng needed
  np.testing.assert_array_equal(np.asarray(training), forwards(config)(params, batch))


def test_explicit_attention_of_the_dropout_path_equals_the_fused_one(rng):
  """The dropout path computes attention itself; with (almost) nothing dropped it is the fused attention
  (grouped-query heads and a padding mask included)."""
  query = jnp.asarray(rng.standard_normal((2, 5, 4, 8)), jnp.float32)
  key, value = (jnp.asarray(rng.standard_normal((2, 7, 2, 8)), jnp.float32) for _ in range(2))
  mask = layers.AttentionMask(mask=jnp.asarray(rng.random((2, 1, 1, 7)) > 0.3).at[..., 0].set(True))
  fused = layers.attention(query, key, value, mask, None)
  explicit = layers.attention(query, key, value, mask, None, dropout_rate=1e-7, dropout_rng=jax.random.key(0))
  np.testing.assert_allclose(explicit, fused, rtol=1e-5, atol=1e-6)
  dropped = layers.attention(query, key, value, mask, None, dropout_rate=0.5, dropout_rng=jax.random.key(0))
  assert not np.allclose(dropped, fused, atol=1e-3)


# ------------------------------------------------------------------------------- the released start point

def unrolled(params):
  """Scanned params with the ViT's stack split into `layers_{i}` (the unrolled layout)."""
  stacked = params['vision']['blocks']['layers']
  depth = jax.tree_util.tree_leaves(stacked)[0].shape[0]
  blocks = {f'layers_{i}': jax.tree_util.tree_map(lambda a, i=i: a[i], stacked) for i in range(depth)}
  return {**params, 'vision': {**params['vision'], 'blocks': blocks}}


@pytest.mark.parametrize('scan', [True, False], ids=['scan', 'unrolled'])
def test_init_from_vit_is_the_released_start_point(tiny_config, tiny_params, scan):
  config = tiny_config().model  # a 2-block ViT; a 1-layer adapter starts from block 1
  config.vision.scan_layers = scan
  config.vision.bt_adapter.depth = 1
  params = tiny_params if scan else unrolled(tiny_params)
  before = jax.tree_util.tree_map(np.array, params)
  fresh = bt_adapter.init_from_vit(params, config, jax.random.key(1))
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, before)  # the input is not modified
  jax.tree_util.tree_map(np.testing.assert_array_equal, {k: v for k, v in fresh.items() if k != 'bt_adapter'}, params)
  # the tree the module itself creates: names, shapes, dtypes
  expected = {path: (leaf.shape, leaf.dtype) for path, leaf in template(config, 'bt_adapter/').items()}
  made = strict.flatten({'bt_adapter': fresh['bt_adapter']})
  assert {path: (a.shape, a.dtype) for path, a in made.items()} == expected
  adapter, blocks = fresh['bt_adapter'], params['vision']['blocks']
  block = jax.tree_util.tree_map(lambda a: a[1], blocks['layers']) if scan else blocks['layers_1']
  jax.tree_util.tree_map(np.testing.assert_array_equal, adapter['spatial_0'], block)
  temporal = adapter['temporal_0']
  for zero in (temporal['temporal_fc'], temporal['norm1']['bias'], temporal['attn']['q_bias'],
               temporal['attn']['v_bias'], adapter['cls_token']):
    jax.tree_util.tree_map(lambda a: np.testing.assert_array_equal(a, 0), zero)
  np.testing.assert_array_equal(temporal['norm1']['scale'], 1)
  bound = 64 ** -0.5  # PyTorch's default Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = width
  for array in (temporal['attn']['qkv']['kernel'], temporal['attn']['out']['kernel'], temporal['attn']['out']['bias']):
    assert np.all(np.abs(array) <= bound) and np.std(array) > bound / 3
  position = np.asarray(adapter['frame_position'])
  assert position.shape == (64, 64) and abs(position.mean()) < 0.05 and abs(position.std() - 1) < 0.05
  # the start point runs
  batch = random_batch(np.random.default_rng(0), stllm.model_config(config), num_frames=2)
  tokens = jax.jit(functools.partial(STLLM(config).apply, method='visual_tokens'))({'params': fresh}, batch)
  assert np.all(np.isfinite(tokens))
  config.vision.scan_layers = not scan
  with pytest.raises(ValueError, match=f'scan_layers={not scan} but the ViT params are'):
    bt_adapter.init_from_vit(params, config, jax.random.key(1))
