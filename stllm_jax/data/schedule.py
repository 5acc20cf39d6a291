"""Which annotation row fills each slot of each batch: a pure function of (seed, batch, slot, host).

    batch k --block schedule--> dataset d and that dataset's chunk c
    slot j of batch k --> position p = c * B + j in dataset d's stream on this host
    p --> epoch e = p // n, row = permutation(seed, d, e)[host :: hosts][p % n]   (n = rows per host)

Batches are dealt in blocks. One block holds, for every dataset, a number of batches proportional to its
weight (`by_size`: weight x number of rows, as the original's loader that visits every dataset's batches
once per epoch; `by_weight`: weight alone); every dataset with a positive weight gets at least one batch
per block, and the order inside a block is shuffled by the seed. A block has about as many batches as one
pass over all the data. Every host computes the same schedule (hosts differ only in which rows they read),
so all hosts draw batch k from the same dataset and T is constant over the global batch.

Each epoch reshuffles a dataset's rows and deals them to hosts round-robin; the last `rows % hosts` rows of
an epoch's permutation are left out so every host sees the same number per epoch.
A slot whose sample fails is refilled from a random row of the same dataset and epoch (attempt a >= 1).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import numpy as np

MIXING = ('by_size', 'by_weight')
_STREAM_SALT, _BLOCK_SALT, _RETRY_SALT, _SAMPLE_SALT = 1, 2, 3, 4


def block_counts(sizes: Sequence[int], weights: Sequence[float], mixing: str, batch_size: int,
                 process_count: int) -> np.ndarray:
  """Batches of each dataset in one block: int64 [D] (largest-remainder apportionment, >= 1 if weight > 0)."""
  sizes = np.asarray(sizes, np.float64)
  weights = np.asarray(weights, np.float64)
  if mixing not in MIXING:
    raise ValueError(f'data.mixing={mixing!r}; choose one of {MIXING}')
  used = weights > 0  # a block is about one pass over the datasets that are read at all
  total = int(sum(math.ceil(s / (batch_size * process_count)) for s in sizes[used]))
  share = weights * sizes if mixing == 'by_size' else weights.copy()
  share = share / share.sum() * max(total, 1)
  counts = np.floor(share).astype(np.int64)
  remainder = int(round(share.sum())) - int(counts.sum())
  for d in np.argsort(-(share - counts), kind='stable')[:max(remainder, 0)]:
    counts[d] += 1
  counts[(counts == 0) & (weights > 0)] = 1
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
    n = self.rows_per_host(dataset)
    position = chunk * self.batch_size + slot
    epoch, within = divmod(position, n)
    if attempt > 0:
      rng = np.random.default_rng([self.seed, _RETRY_SALT, self.process_index, batch, slot, attempt])
      within = int(rng.integers(n))
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
