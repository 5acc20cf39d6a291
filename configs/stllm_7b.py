"""ST-LLM 7B, the paper's QA model (the MVBench one): 16 frames, every spatio-temporal token into the LLM,
dynamic masking + MVM, full fine-tuning of the LLM, 2 epochs at batch 128, lr 2e-5.

Run (one 8-GPU node, or see launch/ for SLURM and TPU pods):
    python -m stllm_jax.train --config configs/stllm_7b.py --workdir runs/stllm_7b
Needs the converted InstructBLIP-Vicuna-7B weights in checkpoints/instructblip_vicuna7b (README "Weights")
and the VideoChat2 instruction data in data/videochat2 (README "Data"). Architecture numbers are the
defaults of stllm_jax.models.stllm.STLLMConfig; this file holds the experiment's choices.
"""

import ml_collections

from stllm_jax import defaults
from stllm_jax.data import pipeline

WEIGHTS = 'checkpoints/instructblip_vicuna7b'
DATA = 'data/videochat2'


def get_config() -> ml_collections.ConfigDict:
  config = defaults.base_config()
  config.model.dtype = 'bfloat16'
  config.model.video_input = 'all'
  config.model.mvm_head = True
  config.model.llm.remat_policy = 'full'  # the paper's gradient checkpointing on the LLM
  config.train.update(epochs=2.0, batch_size=128, grad_accum_steps=16, lr=2e-5, warmup_fraction=0.03,
                      weight_decay=0.0, mvm_weight=1.0, log_every=10, checkpoint_every=500)
  config.init.checkpoint = WEIGHTS
  config.data.datasets.videochat2 = pipeline.dataset_entry(f'{DATA}/train.json', f'{DATA}/videos', num_frames=16)
  config.data.llm_tokenizer = f'{WEIGHTS}/tokenizers/llm'
  config.data.qformer_tokenizer = f'{WEIGHTS}/tokenizers/qformer'
  return config
