"""Random model batches of the right shapes: for smoke runs, benchmarks and sharding tests (no decoding).

Every sample is a pure function of (seed, step, its index in the global batch): resuming at a step gives the same
batches, and process p of n takes samples [p * B/n, (p + 1) * B/n) of each global batch of B, so the global
batches are the same whatever the number of processes. Text lengths vary from step to step over the configured
buckets, as real data would.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from stllm_jax import configlib


@dataclasses.dataclass(frozen=True)
class RandomDataConfig:
  source: str = 'random'
  num_frames: int = 4
  text_buckets: tuple[int, ...] = (32, 64)
  qformer_text_len: int = 16
  num_samples: int = 1024  # the "epoch" size, for runs that set train.epochs instead of train.steps
  seed: int = 0


class RandomBatches:
  """Iterator of host batches (numpy) of `batch_size / process_count` samples; `get_state`/`set_state`.

  Image size and vocabulary sizes come from the model config.
  """

  def __init__(self, config: Any, model_cfg: Any, batch_size: int, process_index: int = 0, process_count: int = 1):
    self.cfg = configlib.from_dict(RandomDataConfig, config, 'data')
    self.image_size = model_cfg.vision.image_size
    self.llm_vocab_size, self.qformer_vocab_size = model_cfg.llm.vocab_size, model_cfg.qformer.vocab_size
    if batch_size % process_count:
      raise ValueError(f'batch size {batch_size} is not a multiple of the {process_count} processes')
    self.local_batch = batch_size // process_count
    self.process_index = process_index
    self.batches_per_epoch = -(-self.cfg.num_samples // batch_size)
    self.step = 0

  def get_state(self) -> dict:
    return {'step': self.step}

  def set_state(self, state: dict) -> None:
    self.step = int(state['step'])

  def metrics(self) -> dict[str, int]:
    return {}  # nothing is ever skipped

  def close(self) -> None:
    """No worker processes or files to release (`pipeline.BatchIterator`)."""

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    cfg = self.cfg
    text_len = int(np.random.default_rng([cfg.seed, self.step]).choice(cfg.text_buckets))
    first = self.process_index * self.local_batch
    samples = [self._sample(np.random.default_rng([cfg.seed, self.step, index]), text_len)
               for index in range(first, first + self.local_batch)]
    self.step += 1
    return {k: np.stack([sample[k] for sample in samples]) for k in samples[0]}

  def _sample(self, rng: np.random.Generator, text_len: int) -> dict[str, np.ndarray]:
    cfg = self.cfg
    answer_start = int(rng.integers(1, text_len))  # prompt before, answer from here to the end of the text
    length = int(rng.integers(answer_start + 1, text_len + 1))  # real tokens; the rest is right padding
    positions = np.arange(text_len)
    attention_mask = (positions < length).astype(np.int32)
    q_length = int(rng.integers(1, cfg.qformer_text_len + 1))
    return dict(
        frames=rng.standard_normal((cfg.num_frames, self.image_size, self.image_size, 3), np.float32),
        qformer_input_ids=rng.integers(1, self.qformer_vocab_size, cfg.qformer_text_len, dtype=np.int32),
        qformer_attention_mask=(np.arange(cfg.qformer_text_len) < q_length).astype(np.int32),
        input_ids=(rng.integers(1, self.llm_vocab_size, text_len) * attention_mask).astype(np.int32),
        attention_mask=attention_mask,
        answer_mask=((positions >= answer_start) & (attention_mask == 1)).astype(np.int32))
