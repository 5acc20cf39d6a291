"""A small ST-LLM for benchmarks on CPUs: every tower a few layers, a few hundred wide, 8 frames of 112x112.

Large enough that compute, not Python dispatch, dominates a train step on 2 CPU cores (batch 8, measured on
a 2-core AMD EPYC: 0.9 s at rho 0.5 without MVM, 1.0 s with it, 1.3-2.8 s unmasked; ~200-260 GFLOP per step);
layers are unrolled and there is no accumulation, so XLA's cost analysis covers the step itself.
Random batches (no data, no weights). Results: BENCHMARK.md.

Run:
    python -m stllm_jax.benchmark train --config configs/bench_small.py --steps 12                  # masking + MVM
    python -m stllm_jax.benchmark train --config configs/bench_small.py --steps 12 --mask-rate 0.5   # fixed rho = 0.5
    python -m stllm_jax.benchmark train --config configs/bench_small.py --steps 12 --mask off
    python -m stllm_jax.benchmark train --config configs/bench_small.py --steps 10 --mask both --mask-rate 0.5  # A/B
    python -m stllm_jax.benchmark train --config configs/bench_small.py --steps 12 --mask-rate 0.5 --against torch  # A/B, MVM off
    python -m stllm_jax.benchmark generate --config configs/bench_small.py --frames 8 --new-tokens 32 --against torch
It trains like any config, too: python -m stllm_jax.train --config configs/bench_small.py --workdir runs/bench_small
"""

import ml_collections

from stllm_jax import defaults


def get_config() -> ml_collections.ConfigDict:
  config = defaults.base_config()
  model = config.model
  model.vision.update(image_size=112, patch_size=14, width=384, depth=4, num_heads=6, mlp_dim=1536,
                      scan_layers=False)
  model.qformer.update(width=256, num_layers=2, num_heads=4, mlp_dim=1024, vocab_size=1024, max_positions=64,
                       num_query_tokens=32)
  model.llm.update(vocab_size=4096, width=512, num_layers=4, num_heads=8, num_kv_heads=8, mlp_dim=1376,
                   max_positions=512, scan_layers=False)
  model.mvm_head = True
  config.train.update(steps=20, batch_size=8, grad_accum_steps=1, lr=1e-4, log_every=5)
  config.data = defaults.random_data(num_frames=8, text_buckets=(64,), qformer_text_len=16, num_samples=4096)
  config.host_malloc = 'kept'  # 410 MiB of temporaries a step, faulted in again each step otherwise (BENCHMARK.md)
  return config
