"""ST-LLM 7B, the paper's QA model (the MVBench one), as the released QA recipe trains it
(config/instructblipbase_stllm_qa.yaml): InstructBLIP-Vicuna-7B with the 3-layer BT-Adapter beside the
frozen EVA-ViT-g (started from its last three blocks, trained through the frozen ln_vision and Q-Former,
whose BERT dropout the released code leaves on in training), 16 frames, every spatio-temporal token into
the LLM, dynamic masking + MVM, full fine-tuning of the LLM, 2 epochs at batch 128, lr 2e-5.

Run (one 8-GPU node, or see launch/ for SLURM and TPU pods):
    python -m stllm_jax.train --config configs/stllm_7b.py --workdir runs/stllm_7b
Needs the converted InstructBLIP-Vicuna-7B weights in checkpoints/instructblip_vicuna7b (README "Weights")
and the recipe's 7 VideoChat2 instruction datasets under data/videochat2 (README "Data"; the layout is
stllm_jax/data/videochat2.py). Architecture numbers are the defaults of stllm_jax.models.stllm.STLLMConfig;
this file holds the experiment's choices.
configs/stllm_7b_no_adapter.py is the same recipe without the adapter (the model the paper's text describes).
"""

import ml_collections

from stllm_jax import defaults
from stllm_jax.data import videochat2

WEIGHTS = 'checkpoints/instructblip_vicuna7b'
DATA = 'data/videochat2'  # the data root of the 7B configs (configs/stllm_7b_global_local.py reads it too)
# The released QA recipe's datasets (config/instructblipbase_stllm_qa.yaml), 16 frames each.
QA_DATASETS = ('caption_videochatgpt', 'classification_k710', 'classification_ssv2', 'reasoning_next_qa',
               'reasoning_clevrer_qa', 'reasoning_clevrer_mc', 'vqa_webvid_qa')


def get_config() -> ml_collections.ConfigDict:
  config = defaults.base_config()
  config.model.dtype = 'bfloat16'
  config.model.video_input = 'all'
  config.model.mvm_head = True
  config.model.vision.bt_adapter.depth = 3  # BTAdapter_T/S.0-2 beside ViT blocks 36-38
  config.model.qformer.dropout = 0.1  # BERT's dropout, on in training only (the released Q-Former's train mode)
  config.model.llm.remat_policy = 'full'  # the paper's gradient checkpointing on the LLM
  config.train.update(epochs=2.0, batch_size=128, grad_accum_steps=16, lr=2e-5, warmup_fraction=0.03,
                      weight_decay=0.0, mvm_weight=1.0, log_every=10, checkpoint_every=500)
  config.init.checkpoint = WEIGHTS
  config.data.datasets = videochat2.dataset_entries(DATA, QA_DATASETS, num_frames=16)
  config.data.llm_tokenizer = f'{WEIGHTS}/tokenizers/llm'
  config.data.qformer_tokenizer = f'{WEIGHTS}/tokenizers/qformer'
  return config
