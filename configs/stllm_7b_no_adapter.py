"""ST-LLM 7B as the paper's text describes it: InstructBLIP-Vicuna-7B (frozen EVA-ViT-g and Q-Former, no
BT-Adapter, the Q-Former without dropout), 16 frames, every spatio-temporal token into the LLM, dynamic
masking + MVM, full fine-tuning of the LLM. The released QA checkpoint (configs/stllm_7b.py) adds the
adapter; this config is the model without it, e.g. to measure what the adapter brings.

Run: python -m stllm_jax.train --config configs/stllm_7b_no_adapter.py --workdir runs/stllm_7b_no_adapter
"""

import os

import ml_collections

from stllm_jax import configlib


def _base() -> ml_collections.ConfigDict:
  return configlib.load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'stllm_7b.py'))


def get_config() -> ml_collections.ConfigDict:
  config = _base()
  config.model.vision.bt_adapter.depth = 0
  config.model.qformer.dropout = 0.0
  return config
