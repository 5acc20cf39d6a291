"""Every config file builds, validates, and documents how to run it."""

import glob
import os

import pytest

from stllm_jax import configlib, step, train
from stllm_jax.data import pipeline, videochat2
from stllm_jax.models import stllm

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), '..', 'configs', '*.py')))


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_config_builds_validates_and_says_how_to_run_it(path):
  config = configlib.load_config_file(path)
  stllm.model_config(config.model)
  step.train_config(config.train)
  if not train.uses_random_data(config):
    pipeline.parse_config(config.data)
  module_doc = open(path).read().split('"""')[1]
  command = 'python -m stllm_jax.demo' if 'demo' in config else 'python -m stllm_jax.train --config configs/'
  assert command + ('' if 'demo' in config else os.path.basename(path)) in module_doc


QA_RECIPE = {'caption_videochatgpt', 'classification_k710', 'classification_ssv2', 'reasoning_next_qa',
             'reasoning_clevrer_qa', 'reasoning_clevrer_mc', 'vqa_webvid_qa'}  # config/instructblipbase_stllm_qa.yaml
CONVERSATION_RECIPE = {'caption_videochat', 'conversation_videochat1', 'caption_videochatgpt', 'caption_webvid',
                       'vqa_webvid_qa'}  # config/instructblipbase_stllm_conversation.yaml


@pytest.mark.parametrize('name, datasets, num_frames', [
    ('stllm_7b.py', QA_RECIPE, 16), ('stllm_7b_no_adapter.py', QA_RECIPE, 16), ('mean_pool_7b.py', QA_RECIPE, 16),
    ('stllm_7b_lora.py', QA_RECIPE, 16), ('stllm_7b_global_local.py', CONVERSATION_RECIPE, 64)])
def test_7b_configs_train_on_their_released_recipes_datasets_under_one_root(name, datasets, num_frames):
  cfg = pipeline.parse_config(configlib.load_config_file(f'configs/{name}').data)
  assert {spec.name for spec in cfg.datasets} == datasets
  assert cfg.mixing == 'by_size'
  for spec in cfg.datasets:
    assert spec.num_frames == num_frames and spec.weight == 1.0
    assert spec.annotation.startswith('data/videochat2/VideoChat2-IT/video/') and spec.annotation.endswith('.json')
    assert spec.media_root.startswith('data/videochat2/videos/')
  by_name = {spec.name: spec for spec in cfg.datasets}
  videochatgpt = by_name['caption_videochatgpt']  # the released registry's entry (stllm/datasets/datasets/...)
  assert videochatgpt.annotation == 'data/videochat2/VideoChat2-IT/video/conversation/videochatgpt/train_full_flat.json'
  assert videochatgpt.media_root == 'data/videochat2/videos/ANet/ANet_320p_fps30'


def test_an_unknown_videochat2_dataset_is_named():
  with pytest.raises(ValueError, match=r"no VideoChat2 layout for \['caption_vidochat'\]"):
    videochat2.dataset_entries('data', ['caption_vidochat'], num_frames=16)


def test_tiny_config_has_the_7b_structure():
  tiny = stllm.model_config(configlib.load_config_file('configs/tiny.py').model)
  big = stllm.model_config(configlib.load_config_file('configs/stllm_7b.py').model)
  assert tiny.video_input == big.video_input == 'all'
  assert tiny.llm.num_kv_heads < tiny.llm.num_heads  # exercises grouped-query attention
  assert tiny.vision.num_tokens == (56 // 14) ** 2 + 1
  assert big.vision.depth == 39 and big.llm.num_layers == 32 and big.qformer.num_query_tokens == 32
  assert big.ln_vision_eps == 1e-5 and big.vision.layer_norm_eps == 1e-6 and big.qformer.layer_norm_eps == 1e-12


def test_missing_config_file_is_explained():
  with pytest.raises(FileNotFoundError, match="configs/nope.py' does not exist"):
    configlib.load_config_file('configs/nope.py')
