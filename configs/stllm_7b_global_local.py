"""ST-LLM 7B with global-local input, the conversation model (VideoChatGPT-Bench, zero-shot QA), as the
released conversation recipe trains it (config/instructblipbase_stllm_conversation.yaml): 64 frames encoded,
their mean V0 through f_m added to 16 local frames; masking + MVM over the local tokens; plain InstructBLIP
towers (no BT-Adapter, the Q-Former without dropout); the recipe's 5 VideoChat2 instruction datasets under the
data root of configs/stllm_7b.py (README "Data").

Run: python -m stllm_jax.train --config configs/stllm_7b_global_local.py --workdir runs/stllm_7b_global_local
"""

import os
import types

import ml_collections

from stllm_jax import configlib
from stllm_jax.data import videochat2

# The released conversation recipe's datasets (config/instructblipbase_stllm_conversation.yaml), 64 frames each.
CONVERSATION_DATASETS = ('caption_videochat', 'conversation_videochat1', 'caption_videochatgpt', 'caption_webvid',
                         'vqa_webvid_qa')


def _base() -> types.ModuleType:
  return configlib.load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'stllm_7b.py'))


def get_config() -> ml_collections.ConfigDict:
  base = _base()
  config = base.get_config()
  config.model.update(video_input='global_local', num_local_frames=16, global_mlp_dim=1024)
  config.model.vision.bt_adapter.depth = 0
  config.model.qformer.dropout = 0.0
  config.data.datasets = videochat2.dataset_entries(base.DATA, CONVERSATION_DATASETS, num_frames=64)
  return config
