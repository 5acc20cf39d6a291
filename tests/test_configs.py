"""Every config file builds, validates, and documents how to run it."""

import glob
import os

import pytest

from stllm_jax import configlib, step, train
from stllm_jax.data import pipeline
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
  assert f'python -m stllm_jax.train --config configs/{os.path.basename(path)}' in module_doc


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
