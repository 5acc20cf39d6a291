"""The built-in demo's wing: a tiny ST-LLM trained from nothing on synthetic videos, on a CPU, in minutes.

    python -m stllm_jax.demo [--config configs/demo.py] [--workdir runs/demo] [--config.demo.ablation=True]

    run.py               the demo: data, towers, training (through `train.train`), evaluation, the claims' tables
    tower_pretraining.py the stand-in for EVA-CLIP + InstructBLIP pretraining of the visual towers
    synthetic.py         moving-shape videos in time-reversed twins (`python -m stllm_jax.demo.synthetic --out DIR`)
    tiny_tokenizers.py   tiny local tokenizers with the real ones' special tokens (the synthetic set, tests)

Arrows run from here into the package (the trainer, the models, generation), never back: nothing outside this
wing imports it, except the data benchmark, which borrows the tiny tokenizers (tests and configs/demo.py aside).
"""
