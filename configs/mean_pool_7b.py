"""The paper's baseline as the released code trains it (config/instructblipbase_avp.yaml): the same 7B model
with the BT-Adapter, but the LLM sees the mean over 16 frames (32 tokens), with no masking and no MVM
(nothing to mask in 32 tokens).

Run: python -m stllm_jax.train --config configs/mean_pool_7b.py --workdir runs/mean_pool_7b
"""

import os

import ml_collections

from stllm_jax import configlib


def _base() -> ml_collections.ConfigDict:
  return configlib.load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'stllm_7b.py'))


def get_config() -> ml_collections.ConfigDict:
  config = _base()
  config.model.update(video_input='mean', mvm_head=False)
  config.train.masking.enabled = False
  config.train.mvm_weight = 0.0
  return config
