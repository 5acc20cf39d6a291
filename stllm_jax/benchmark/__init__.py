"""Benchmarks of ST-LLM training and generation, and the memory plan of a train step.

    python -m stllm_jax.benchmark train --config configs/bench_small.py [--steps N] [--mask on|off] [--against torch]
    python -m stllm_jax.benchmark generate --config configs/tiny.py [--frames T] [--new-tokens N] [--batch B] [--against torch]
    python -m stllm_jax.benchmark plan --config configs/stllm_7b.py --mesh fsdp=8 [--batch-size B] [--grad-accum N] [--remat P[,P...]|all]

Modules: cli (arguments, config, output), train_bench (timed train steps, A/B with torch_reference),
generate_bench (prefill and decode), plan (ahead-of-time memory plan), flops (analytic model FLOPs),
devices (peak table, memory statistics), report (statistics, JSON, tables), gpu_report (one GPU session),
data_bench (`python -m stllm_jax.benchmark.data_bench`: decoded + preprocessed training videos/s). Results:
BENCHMARK.md.
"""
