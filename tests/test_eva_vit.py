"""EVA-ViT-g and ln_vision against Hugging Face's InstructBLIP vision model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import convert, torch_images
from stllm_jax.models.eva_vit import EVAViT, VisionConfig
from stllm_jax.models.stllm import STLLM


def vision_tokens(cfg, params, images, with_ln_vision=True):
  fn = (lambda m, x: m.ln_vision(m.vision(x))) if with_ln_vision else (lambda m, x: m.vision(x))
  return STLLM(cfg).apply({'params': params}, images, method=fn)


@pytest.mark.parametrize('scan', [True, False])
def test_vision_tower_matches_hugging_face(hf_instructblip, parity, rng, scan):
  cfg, params = convert(hf_instructblip, vision={'scan_layers': scan})
  images = rng.standard_normal((3, 28, 28, 3)).astype(np.float32)
  with torch.no_grad():
    embeddings = hf_instructblip.vision_model.embeddings(torch_images(images))
    blocks = hf_instructblip.vision_model.encoder(inputs_embeds=embeddings).last_hidden_state
    final = hf_instructblip.vision_model(pixel_values=torch_images(images)).last_hidden_state
  scan_name = 'scan' if scan else 'unrolled'
  assert parity(f'EVA-ViT blocks ({scan_name})', 'float32', vision_tokens(cfg, params, images, False), blocks) < 1e-5
  assert parity(f'EVA-ViT + ln_vision ({scan_name})', 'float32', vision_tokens(cfg, params, images), final) < 1e-5


def test_scan_unroll_below_one_is_named():
  with pytest.raises(ValueError, match=r'vision.scan_unroll=0: give at least 1'):
    VisionConfig(scan_unroll=0).validate()


def test_vision_tower_bfloat16_error(hf_instructblip, parity, rng):
  cfg, params = convert(hf_instructblip, dtype='bfloat16')
  images = rng.standard_normal((3, 28, 28, 3)).astype(np.float32)
  with torch.no_grad():
    final = hf_instructblip.vision_model(pixel_values=torch_images(images)).last_hidden_state
  ours = vision_tokens(cfg, params, images)
  assert ours.dtype == jnp.bfloat16
  assert parity('EVA-ViT + ln_vision', 'bfloat16', ours.astype(jnp.float32), final) < 3e-2


def test_k_bias_is_zero_and_q_v_biases_are_used(converted):
  cfg, params = converted
  attn = params['vision']['blocks']['layers']['attn']
  assert set(attn) == {'qkv', 'q_bias', 'v_bias', 'out'}
  assert 'bias' not in attn['qkv']
  # perturbing q_bias changes the output: the parameter is wired in
  images = np.ones((1, 28, 28, 3), np.float32)
  shifted = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 1.0 if 'q_bias' in jax.tree_util.keystr(path) else x, params)
  assert not np.allclose(vision_tokens(cfg, params, images), vision_tokens(cfg, shifted, images))


def test_wrong_image_size_is_a_clear_error():
  model = EVAViT(VisionConfig(image_size=28, patch_size=14, width=16, depth=1, num_heads=2, mlp_dim=32))
  with pytest.raises(ValueError, match=r'images \[N, 28, 28, 3\].*got shape \(1, 3, 28, 28\)'):
    model.init(jax.random.key(0), jnp.zeros((1, 3, 28, 28)))
