"""A tiny ST-LLM with the 7B model's structure, trained on random batches (tests, laptops; about a minute).

Run: python -m stllm_jax.train --config configs/tiny.py --workdir runs/tiny
"""

import ml_collections

from stllm_jax import defaults


def get_config() -> ml_collections.ConfigDict:
  config = defaults.base_config()
  model = config.model
  model.vision.update(image_size=56, patch_size=14, width=64, depth=2, num_heads=4, mlp_dim=128)
  model.qformer.update(width=48, num_layers=2, num_heads=4, mlp_dim=96, vocab_size=128, max_positions=64,
                       num_query_tokens=8)
  model.llm.update(vocab_size=256, width=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128,
                   max_positions=512)
  model.mvm_head = True
  config.train.update(steps=30, batch_size=8, grad_accum_steps=2, lr=1e-3, log_every=5, checkpoint_every=10)
  config.train.masking.keep_buckets = (0.4, 0.55, 0.7)  # few buckets: few compiled programs
  config.data = defaults.random_data(num_frames=4, text_buckets=(16, 24), qformer_text_len=8, num_samples=240)
  return config
