"""ST-LLM 7B with LoRA on the LLM instead of full fine-tuning (the paper's low-memory variant, Table 6).

The base LLM is frozen; LoRA adapters train with the projection, the BT-Adapter and the MVM head. The
released code's LoRA settings: alpha 32, on the query and value projections, dropout 0.05 (the LLaMA
config's defaults here). Its configs leave the rank unset (LoRA off); rank 64 is our choice.

Run: python -m stllm_jax.train --config configs/stllm_7b_lora.py --workdir runs/stllm_7b_lora
"""

import os

import ml_collections

from stllm_jax import configlib


def _base() -> ml_collections.ConfigDict:
  return configlib.load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'stllm_7b.py'))


def get_config() -> ml_collections.ConfigDict:
  config = _base()
  config.model.llm.update(lora_rank=64, lora_alpha=32.0, lora_targets=('query', 'value'), lora_dropout=0.05)
  # everything in the LLM except its LoRA adapters is frozen
  config.train.frozen = ('vision/.*', 'ln_vision/.*', 'qformer/.*', 'llm/(?!.*/lora/).*')
  config.train.lr = 1e-4  # our choice for adapters (the paper trains its full-fine-tuning runs at 2e-5)
  return config
