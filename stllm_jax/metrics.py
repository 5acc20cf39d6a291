"""Training metrics: a JSONL log and TensorBoard event files in the workdir (written by process 0 only),
and the progress bars of long jobs."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Mapping

import jax
from tqdm import tqdm


def progress_bar(iterable: Any = None, **kwargs) -> tqdm:
  """A tqdm bar on stderr that redraws every second on a terminal and every 30 s into a log file."""
  kwargs.setdefault('mininterval', 1.0 if sys.stderr.isatty() else 30.0)
  return tqdm(iterable, file=sys.stderr, **kwargs)


class MetricsWriter:
  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, values: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': step, **values}) + '\n')
    for name, value in values.items():
      if isinstance(value, (int, float)):
        self._tb.add_scalar(name, value, step)
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
