"""Data: video decoding, frame transforms, conversation/tokens, the grain training pipeline.

    video.py         PyAV decoding and frame-index sampling (rand / middle / fps, start/end)
    transforms.py    RandomResizedCrop (training) / resize + centre crop (evaluation), CLIP normalisation
    conversation.py  the InstructBLIP-Vicuna template, tokenisation, answer mask, bucketed padding
    annotations.py   VideoChat2 JSON rows and their validation
    schedule.py      which row fills each slot of each batch (seeded, per host, resumable)
    samples.py       one training sample: row -> frames + token ids
    pipeline.py      config.data, the grain iterator with exact resume and skip statistics
    inference.py     one video -> frames for chat and evaluation
    videochat2.py    where the released recipes' datasets lie under one data root
    slow_llama.py    the released slow LLaMA tokenizer
    random_batches.py random model batches of the right shapes (smoke runs, benchmarks)
    errors.py        SampleError reasons and DataError
(The synthetic set and the tiny tokenizers belong to the demo: stllm_jax/demo/.)
"""
