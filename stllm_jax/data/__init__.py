"""Data: video decoding, frame transforms, conversation/tokens, the grain training pipeline, synthetic data.

    video.py         PyAV decoding and frame-index sampling (rand / middle / fps, start/end)
    transforms.py    RandomResizedCrop (training) / resize + centre crop (evaluation), CLIP normalisation
    conversation.py  the InstructBLIP-Vicuna template, tokenisation, answer mask, bucketed padding
    annotations.py   VideoChat2 JSON rows and their validation
    schedule.py      which row fills each slot of each batch (seeded, per host, resumable)
    samples.py       one training sample: row -> frames + token ids
    pipeline.py      config.data, the grain iterator with exact resume and skip statistics
    inference.py     one video -> frames for chat and evaluation
    synthetic.py     `python -m stllm_jax.data.synthetic --out DIR`: moving-shape videos with reversed twins
    benchmark.py     `python -m stllm_jax.data.benchmark`: decoded+preprocessed videos/s
    errors.py        SampleError reasons and DataError
"""
