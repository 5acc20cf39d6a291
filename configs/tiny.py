"""A tiny ST-LLM with the 7B model's structure (tests, laptops): every tower two layers, widths of 32-64."""

import ml_collections

from stllm_jax.models import stllm


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = stllm.default_config()
  config.model.vision.update(image_size=56, patch_size=14, width=64, depth=2, num_heads=4, mlp_dim=128)
  config.model.qformer.update(width=48, num_layers=2, num_heads=4, mlp_dim=96, vocab_size=128, max_positions=64,
                              num_query_tokens=8)
  config.model.llm.update(vocab_size=256, width=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128,
                          max_positions=512)
  return config
