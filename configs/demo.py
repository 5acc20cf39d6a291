"""The built-in demo: a tiny ST-LLM trained from scratch on synthetic moving shapes, on a CPU, in minutes.

Run:
    python -m stllm_jax.demo                                 # one model, this config (~8 min on 2 cores)
    python -m stllm_jax.demo --config.demo.ablation=True     # + no-masking and mean-pooling models
    python -m stllm_jax.chat --checkpoint runs/demo --video data/demo/videos/test_0000_a.mp4 \
        --prompt "In which direction does the circle move?"

It writes the synthetic set to data/demo (videos in time-reversed twins; stllm_jax/demo/synthetic.py) if missing,
pretrains the visual towers on single frames (tower_pretraining.py: the stand-in for EVA-CLIP + InstructBLIP),
trains ST-LLM on them as the paper does (towers frozen; projection + LLM trained with dynamic masking + MVM at
8 frames; a wider mask rate than the paper's, see below), asks the held-out videos about direction, shape and
colour at 4-16 frames, and prints the tables of the paper's two claims (stllm_jax/demo/run.py).
"""

import ml_collections

from stllm_jax import configlib, defaults
from stllm_jax.demo import synthetic
from stllm_jax.demo.run import DemoConfig

TRAIN_FRAMES = 8


def get_config() -> ml_collections.ConfigDict:
  config = defaults.base_config()
  config.demo = configlib.to_config_dict(DemoConfig())
  model = config.model
  # 64x64 frames in a 4x4 grid of patches; 4 query tokens per frame (8 frames -> 32 visual tokens).
  model.vision.update(image_size=64, patch_size=16, width=96, depth=2, num_heads=4, mlp_dim=192, init_std=0.1,
                      embed_init_std=0.3)
  model.qformer.update(width=96, num_layers=2, num_heads=4, mlp_dim=192, vocab_size=config.demo.qformer_vocab_size,
                       max_positions=32, num_query_tokens=4, init_std=0.1)
  model.llm.update(vocab_size=config.demo.llm_vocab_size, width=128, num_layers=3, num_heads=4, num_kv_heads=4,
                   mlp_dim=256, max_positions=256)
  # Each tower's layers in one loop iteration, so no loop: at these sizes the loop's bookkeeping (the stacked
  # activations zeroed, then written layer by layer) was a tenth of the step (BENCHMARK.md). Params and their
  # initialisation stay the scanned ones; the references follow the layer counts.
  model.vision.scan_unroll = model.vision.get_ref('depth')
  model.llm.scan_unroll = model.llm.get_ref('num_layers')
  model.mvm_head = True
  # As the paper: the ViT, ln_vision and the Q-Former are pretrained (here by stllm_jax/demo/tower_pretraining.py, the
  # demo's stand-in for EVA-CLIP + InstructBLIP) and frozen; the projection and the LLM learn, MVM at weight 1.
  # 2,400 steps: this LLM learns direction in a late drop of the loss (from ~0.17 to ~0.01), which 1,600 steps
  # reached in some runs and not in others, as float rounding decided (seed 0 at 1,600: direction 23.4% at 8 frames
  # with one attention formulation, 65.6% with another; at 2,400: 98.4%; seeds 1 and 2 at 2,400: README).
  config.train.update(steps=2400, mvm_weight=1.0, batch_size=16, grad_accum_steps=1, lr=1e-3, warmup_fraction=0.03,
                      log_every=50, checkpoint_every=800)
  # Dynamic masking with a wider rate than the paper's N(0.5, 0.1) in [0.3, 0.7], so that training sees every
  # length from 30% to 100% of the visual tokens: this LLM starts from nothing and reads direction only at the
  # token counts it was trained on (measured with the paper's rate: direction 100% at 4 frames of its own
  # training videos, 56% at the 8 it was trained with). And the kept count rounded up to the 4 buckets, so
  # training sees 4 lengths (13, 20, 26, 32 tokens at 8 frames) instead of the released code's exact counts (23
  # lengths): with exact counts this LLM did not learn direction in 1,600 steps (measured, direction at 8 frames:
  # 20% at this rate, 34% at mean 0.1, 72% at mean 0.2; rounded: 91%). README, "Differences from the released code".
  config.train.masking.update(mean=0.35, std=0.2, low=0.0, high=0.7, keep_buckets=(0.4, 0.6, 0.8, 1.0),
                              round_to_bucket=True)
  config.data = synthetic.data_config(config.demo.data_dir, num_frames=TRAIN_FRAMES,
                                      image_size=model.vision.image_size, batch_size=config.train.batch_size,
                                      num_workers=1)
  # No random resized crop: the frozen towers were pretrained on whole frames, and a zoomed crop moves the shape
  # off what they learned (measured: direction at chance with crops of 50-100% of the area, 100% without).
  config.data.update(text_buckets=(24, 48), qformer_buckets=(16,), qformer_max_length=16, crop_scale=(1.0, 1.0))
  # The 800 training videos decoded once (16 frames of 64x64: 150 MiB) and then read from memory for the other 47
  # epochs: decoding was most of the data worker's time, which shares the two cores of a laptop with the step.
  config.data.video_cache_mib = 256
  return config
