"""Strict loading: every source tensor used once, every parameter filled, shapes checked, problems named."""

import numpy as np
import pytest
import torch

from stllm_jax.convert import hf, strict


@pytest.fixture(scope='module')
def state_dict(hf_instructblip):
  return {k: v.clone() for k, v in hf_instructblip.state_dict().items()}


def load(state_dict, hf_instructblip):
  return hf.load_hf_instructblip(state_dict, hf_instructblip.config)


def test_complete_checkpoint_loads_and_every_tensor_is_used(state_dict, hf_instructblip):
  _, params = load(state_dict, hf_instructblip)
  n_source = sum(v.numel() for v in state_dict.values())
  # Hugging Face stores a zero k bias per ViT block that EVA does not have.
  hidden, blocks = 48, 3
  assert strict.num_elements(params) == n_source - blocks * hidden


def test_missing_tensor_is_named(state_dict, hf_instructblip):
  broken = {k: v for k, v in state_dict.items() if k != 'language_model.model.layers.1.mlp.up_proj.weight'}
  with pytest.raises(strict.CheckpointMismatch, match=r'missing.*\n.*llm/blocks/layers_1/mlp/up/kernel \[64, 96\]') as err:
    load(broken, hf_instructblip)
  assert err.value.missing == ['language_model.model.layers.1.mlp.up_proj.weight -> llm/blocks/layers_1/mlp/up/kernel [64, 96]']
  assert not err.value.unused and not err.value.misshaped


def test_extra_tensor_is_named(state_dict, hf_instructblip):
  broken = dict(state_dict, **{'visual_encoder.BTAdapter_0.weight': torch.zeros(3)})
  with pytest.raises(strict.CheckpointMismatch, match=r'unused.*\n.*visual_encoder\.BTAdapter_0\.weight') as err:
    load(broken, hf_instructblip)
  assert err.value.unused == ['visual_encoder.BTAdapter_0.weight'] and not err.value.missing


def test_tensor_for_a_parameter_the_model_lacks_is_named(state_dict, hf_instructblip):
  broken = dict(state_dict, **{'vision_model.encoder.layers.7.mlp.fc1.bias': torch.zeros(96)})
  with pytest.raises(strict.CheckpointMismatch, match=r'vision/blocks/layers_7/fc1/bias, which the model does not have'):
    load(broken, hf_instructblip)


def test_wrong_shape_is_named_with_both_shapes(state_dict, hf_instructblip):
  broken = dict(state_dict, **{'language_projection.weight': torch.zeros(64, 31)})
  with pytest.raises(strict.CheckpointMismatch,
                     match=r'mis-shaped.*\n.*language_projection\.weight \[31, 64\] -> projection/kernel expects \[32, 64\]'):
    load(broken, hf_instructblip)


def test_transposed_weight_is_refused_even_with_equal_size(state_dict, hf_instructblip):
  # the q projection of the LLM is square; a [in, out] kernel of another square layer shape would pass, so use
  # the MLP: up_proj [96, 64] stored transposed as [64, 96] has the right number of elements
  weight = state_dict['language_model.model.layers.0.mlp.up_proj.weight']
  broken = dict(state_dict, **{'language_model.model.layers.0.mlp.up_proj.weight': weight.T.contiguous()})
  with pytest.raises(strict.CheckpointMismatch, match=r'up_proj\.weight \[96, 64\] -> llm/blocks/layers_0/mlp/up/kernel expects \[64, 96\]'):
    load(broken, hf_instructblip)


def test_nonzero_k_bias_is_dropped(state_dict, hf_instructblip):
  bias = state_dict['vision_model.encoder.layers.2.self_attn.qkv.bias'].clone()
  bias[48 + 5] = 0.5
  _, params = load(dict(state_dict, **{'vision_model.encoder.layers.2.self_attn.qkv.bias': bias}), hf_instructblip)
  attn = params['vision']['blocks']['layers']['attn']
  np.testing.assert_array_equal(attn['q_bias'][2].reshape(-1), bias[:48].numpy())
  np.testing.assert_array_equal(attn['v_bias'][2].reshape(-1), bias[96:].numpy())


def test_all_problems_are_listed_at_once(state_dict, hf_instructblip):
  broken = {k: v for k, v in state_dict.items() if k != 'query_tokens'}
  broken['unexpected.tensor'] = torch.zeros(1)
  broken['language_projection.bias'] = torch.zeros(65)
  with pytest.raises(strict.CheckpointMismatch) as err:
    load(broken, hf_instructblip)
  assert err.value.missing == ['query_tokens -> qformer/query_tokens [1, 4, 32]']
  assert err.value.unused == ['unexpected.tensor']
  assert len(err.value.misshaped) == 1


def test_bfloat16_sources_convert_exactly():
  source = torch.randn(4, 6).to(torch.bfloat16)
  converted = strict.to_numpy(source)
  np.testing.assert_array_equal(converted.astype(np.float32), source.float().numpy())


@pytest.mark.parametrize('source, target, ok', [
    ((64, 96), (64, 8, 12), True), ((64, 96), (96, 64), False), ((96,), (8, 12), True),
    ((1, 5, 48), (1, 5, 48), True), ((48, 3 * 48), (48, 3, 4, 12), True), ((6, 4), (4, 6), False)])
def test_refine_shape(source, target, ok):
  assert strict.refine_shape(source, target) == ok


def test_lazy_sources_are_loaded_one_at_a_time(state_dict, hf_instructblip):
  loaded = []

  def lazy(name, tensor):
    def load_one():
      loaded.append(name)
      return tensor
    return load_one

  _, params = hf.load_hf_instructblip({k: lazy(k, v) for k, v in state_dict.items()}, hf_instructblip.config)
  assert sorted(loaded) == sorted(state_dict)
