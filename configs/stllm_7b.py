"""ST-LLM 7B: the paper's QA model (InstructBLIP-Vicuna-7B base, every spatio-temporal token into the LLM).

Architecture numbers are the defaults of `stllm_jax.models.stllm.STLLMConfig`; this file sets what the
experiment chooses: bfloat16 compute and rematerialised LLM layers (the paper's gradient checkpointing).
"""

import ml_collections

from stllm_jax.models import stllm


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = stllm.default_config()
  config.model.dtype = 'bfloat16'
  config.model.video_input = 'all'
  config.model.llm.remat_policy = 'full'
  return config
