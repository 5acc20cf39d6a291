"""Which annotation row fills each slot of each batch: a pure function of (seed, batch, slot, host).

    batch k --block schedule--> dataset d and that dataset's chunk c
    chunk c of dataset d --> epoch e = c // m, batch b = c % m of it     (m = whole batches of d per epoch)
    slot j --> row = permutation(seed, d, e)[host :: hosts][b * B + j]   (B = batch size per host)

This is the released trainer's rule (stllm/train/stllm_trainer.py `get_train_dataloader`, MetaLoader and
IterLoader in stllm/datasets/datasets/dataloader_utils.py). Every dataset is reshuffled each of its epochs and
dealt to the hosts round-robin; a host cuts its share into whole batches and drops the last partial one, so
one epoch of a dataset of n rows is m = (n // hosts) // B batches (about n / global batch). Batches are dealt in
blocks: one block holds m batches of every dataset (`by_size`, weight 1), in an order shuffled anew for each
block, so a block is one epoch of every dataset. Every host computes the same order (hosts differ only in which
rows they read), so all hosts draw batch k from the same dataset and T is constant over the global batch.

A dataset's weight scales its batches per block (`by_size`: round(weight x m); weight 2 reads the dataset
twice per block, 0 never); `by_weight` shares a block of about one pass over the data in proportion to the
weights alone. The released trainer has no weights (every weight is 1 there).
The last `rows % hosts` rows of an epoch's permutation are left out so every host sees the same number per
epoch. A slot whose sample fails is refilled from a random row of the same dataset and epoch (attempt a >= 1).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import numpy as np

MIXING = ('by_size', 'by_weight')
_STREAM_SALT, _BLOCK_SALT, _RETRY_SALT, _SAMPLE_SALT = 1, 2, 3, 4


def epoch_batches(size: int, batch_size: int, process_count: int) -> int:
  """Whole batches of one epoch of a dataset of `size` rows on each host (the last partial batch is dropped)."""
  return (size // process_count) // batch_size


def block_counts(sizes: Sequence[int], weights: Sequence[float], mixing: str, batch_size: int,
                 process_count: int) -> np.ndarray:
  """Batches of each dataset in one block: int64 [D] (>= 1 if weight > 0; see the module docstring)."""
  if mixing not in MIXING:
    raise ValueError(f'data.mixing={mixing!r}; choose one of {MIXING}')
  weights = np.asarray(weights, np.float64)
  per_epoch = np.asarray([epoch_batches(s, batch_size, process_count) for s in sizes], np.float64)
  used = weights > 0
  if mixing == 'by_size':
    counts = np.floor(weights * per_epoch + 0.5).astype(np.int64)
  else:
    counts = _apportion(weights, total=int(per_epoch[used].sum()))
  counts[(counts == 0) & used] = 1
  return counts


def _apportion(weights: np.ndarray, total: int) -> np.ndarray:
  """`total` split in proportion to `weights` (largest remainders)."""
  share = weights / weights.sum() * max(total, 1)
  counts = np.floor(share).astype(np.int64)
  remainder = int(round(share.sum())) - int(counts.sum())
  for d in np.argsort(-(share - counts), kind='stable')[:max(remainder, 0)]:
    counts[d] += 1
  return counts


@dataclasses.dataclass(frozen=True)
class Schedule:
  sizes: tuple[int, ...]  # rows of each dataset
  counts: tuple[int, ...]  # batches of each dataset per block
  batch_size: int  # per host
  seed: int
  process_index: int
  process_count: int

  @property
  def block_size(self) -> int:
    return int(sum(self.counts))

  def rows_per_host(self, dataset: int) -> int:
    return self.sizes[dataset] // self.process_count

  def epoch_batches(self, dataset: int) -> int:
    """Whole batches of one epoch of `dataset` on each host."""
    return epoch_batches(self.sizes[dataset], self.batch_size, self.process_count)

  def block_order(self, block: int) -> np.ndarray:
    """Dataset of each batch of a block: int64 [block_size]."""
    return _block_order(self.counts, self.seed, block)

  def locate(self, batch: int) -> tuple[int, int]:
    """(dataset d, chunk c): batch `batch` is the c-th batch drawn from dataset d."""
    block, offset = divmod(batch, self.block_size)
    order = self.block_order(block)
    dataset = int(order[offset])
    earlier = int(np.count_nonzero(order[:offset] == dataset))
    return dataset, block * self.counts[dataset] + earlier

  def epoch_rows(self, dataset: int, epoch: int) -> np.ndarray:
    """This host's rows of `dataset` in epoch `epoch`, in visiting order: int64 [rows_per_host]."""
    return _epoch_rows(self.sizes[dataset], self.seed, dataset, epoch, self.process_index, self.process_count)

  def row(self, batch: int, slot: int, attempt: int = 0) -> tuple[int, int, int]:
    """(dataset, annotation row index, epoch) for a slot; attempt >= 1 draws a random replacement row."""
    dataset, chunk = self.locate(batch)
    epoch, batch_in_epoch = divmod(chunk, self.epoch_batches(dataset))
    within = batch_in_epoch * self.batch_size + slot
    if attempt > 0:
      rng = np.random.default_rng([self.seed, _RETRY_SALT, self.process_index, batch, slot, attempt])
      within = int(rng.integers(self.rows_per_host(dataset)))
    return dataset, int(self.epoch_rows(dataset, epoch)[within]), epoch

  def sample_rng(self, batch: int, slot: int, attempt: int) -> np.random.Generator:
    """The generator for one sample's random choices (QA pair, frames, crop)."""
    return np.random.default_rng([self.seed, _SAMPLE_SALT, self.process_index, batch, slot, attempt])


@functools.lru_cache(maxsize=8)
def _block_order(counts: tuple[int, ...], seed: int, block: int) -> np.ndarray:
  ids = np.repeat(np.arange(len(counts)), counts)
  return np.random.default_rng([seed, _BLOCK_SALT, block]).permutation(ids)


@functools.lru_cache(maxsize=16)
def _epoch_rows(size: int, seed: int, dataset: int, epoch: int, process_index: int, process_count: int) -> np.ndarray:
  order = np.random.default_rng([seed, _STREAM_SALT, dataset, epoch]).permutation(size)
  per_host = size // process_count
  return order[:per_host * process_count][process_index::process_count]
