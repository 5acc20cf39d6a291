"""Summary statistics, JSON output and the markdown table a benchmark prints."""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Sequence

import numpy as np

GIB = 1024 ** 3


def spread(seconds: Sequence[float]) -> dict[str, float]:
  """median, p10, p90, min and count of a list of step times (seconds)."""
  if not seconds:
    return {'median_s': float('nan'), 'p10_s': float('nan'), 'p90_s': float('nan'), 'min_s': float('nan'), 'n': 0}
  x = np.asarray(seconds, np.float64)
  return {'median_s': float(np.median(x)), 'p10_s': float(np.percentile(x, 10)),
          'p90_s': float(np.percentile(x, 90)), 'min_s': float(x.min()), 'n': int(x.size)}


def ms(seconds: float | None) -> str:
  return 'n/a' if seconds is None or seconds != seconds else f'{seconds * 1e3:.1f} ms'


def gib(num_bytes: float | None) -> str:
  return 'n/a' if num_bytes is None else f'{num_bytes / GIB:.3f} GiB'


def rate(value: float | None, unit: str) -> str:
  return 'n/a' if value is None or value != value else f'{value:,.1f} {unit}'


def markdown_table(rows: Iterable[tuple[str, str]], header: tuple[str, str] = ('quantity', 'value')) -> str:
  lines = [f'| {header[0]} | {header[1]} |', '|---|---|']
  lines += [f'| {name} | {value} |' for name, value in rows]
  return '\n'.join(lines)


def markdown_columns(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
  """A markdown table with a column per header entry."""
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(str(v) for v in row) + ' |' for row in rows]
  return '\n'.join(lines)


def write_json(result: dict[str, Any], path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(result, f, indent=2, sort_keys=True, default=_jsonable)
  return path


def _jsonable(value: Any) -> Any:
  if isinstance(value, (np.integer,)):
    return int(value)
  if isinstance(value, (np.floating,)):
    return float(value)
  if isinstance(value, tuple):
    return list(value)
  return str(value)
