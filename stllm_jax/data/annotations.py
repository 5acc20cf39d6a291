"""VideoChat2 instruction annotations: loading a dataset's JSON and validating one row.

A dataset is one JSON list; each row is

    {"video": "rel/path.mp4", "QA": [{"i": "instruction or empty", "q": "question", "a": "answer"}, ...],
     "start": 1.5, "end": 9.0}          # start/end seconds: optional

The whole file is checked only for being a JSON list (a bad file stops the run at once, naming it);
rows are validated when they are used, so one malformed row is a `bad_annotation` / `empty_qa` skip
instead of a crash. `i` may be missing (no instruction).

A row's `video` names a file under the dataset's media root and nothing else: `media_path` resolves it
(symlinks too) and refuses an absolute path, `..` or a link that leads out of the root, so an annotation
file cannot make the pipeline open (and train on) an arbitrary file.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import numbers
import os
from typing import Any

from stllm_jax.data.errors import DataError, SampleError


@dataclasses.dataclass(frozen=True)
class QA:
  instruction: str
  question: str
  answer: str


@dataclasses.dataclass(frozen=True)
class Row:
  video: str  # relative to the dataset's media_root
  qa: tuple[QA, ...]
  start: float | None = None
  end: float | None = None


@functools.cache
def load_annotations(path: str) -> list:
  """The rows of one annotation file (cached per process). Raises DataError for a missing or non-list file."""
  if not os.path.isfile(path):
    raise DataError(f'annotation file {path!r} does not exist (check data.datasets.*.annotation)')
  try:
    with open(path, encoding='utf-8') as f:
      rows = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataError(f'annotation file {path!r} is not valid JSON: {e}') from e
  if not isinstance(rows, list):
    raise DataError(f'annotation file {path!r} must hold a JSON list of rows, got {type(rows).__name__}')
  return rows


def _string(value: Any, what: str) -> str:
  if not isinstance(value, str):
    raise SampleError('bad_annotation', f'{what} must be a string, got {type(value).__name__}')
  return value


def _seconds(value: Any, what: str) -> float | None:
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise SampleError('bad_annotation', f'{what} must be a number of seconds, got {value!r}')
  return float(value)


def parse_qa(item: Any, where: str) -> QA:
  if not isinstance(item, dict):
    raise SampleError('bad_annotation', f'{where} must be an object with "q" and "a", got {type(item).__name__}')
  for key in ('q', 'a'):
    if key not in item:
      raise SampleError('bad_annotation', f'{where} lacks "{key}"')
  instruction = item.get('i') or ''
  return QA(_string(instruction, f'{where}.i'), _string(item['q'], f'{where}.q'), _string(item['a'], f'{where}.a'))


def parse_row(raw: Any, where: str = 'row') -> Row:
  """A validated Row, or SampleError('bad_annotation' | 'empty_qa')."""
  if not isinstance(raw, dict):
    raise SampleError('bad_annotation', f'{where} must be an object, got {type(raw).__name__}')
  for key in ('video', 'QA'):
    if key not in raw:
      raise SampleError('bad_annotation', f'{where} lacks "{key}" (keys: {sorted(raw)})')
  video = _string(raw['video'], f'{where}.video')
  if not video:
    raise SampleError('bad_annotation', f'{where}.video is empty')
  qa_list = raw['QA']
  if not isinstance(qa_list, list):
    raise SampleError('bad_annotation', f'{where}.QA must be a list, got {type(qa_list).__name__}')
  if not qa_list:
    raise SampleError('empty_qa', f'{where} ({video}) has an empty QA list')
  qa = tuple(parse_qa(item, f'{where}.QA[{n}]') for n, item in enumerate(qa_list))
  start, end = _seconds(raw.get('start'), f'{where}.start'), _seconds(raw.get('end'), f'{where}.end')
  if start is not None and end is not None and end <= start:
    raise SampleError('bad_annotation', f'{where} has end {end} <= start {start}')
  return Row(video, qa, start, end)


def media_path(media_root: str, relative: str, allowed_dirs: tuple[str, ...] = ()) -> str:
  """`media_root/relative` with every symlink resolved, or SampleError('outside_media_root') when that path
  lies neither inside the resolved media root (the root itself may be a symlink) nor inside one of
  `allowed_dirs` (`data.allowed_media_dirs`: where symlinks under the root may lead, e.g. another disk)."""
  if os.path.isabs(relative):
    raise SampleError('outside_media_root', f'{relative!r} is an absolute path; a video path is relative to '
                                            f'the media root {media_root}')
  root = os.path.realpath(media_root)
  resolved = os.path.realpath(os.path.join(root, relative))
  inside = lambda directory: os.path.commonpath([directory, resolved]) == directory
  if not any(inside(directory) for directory in (root, *map(os.path.realpath, allowed_dirs))):
    raise SampleError('outside_media_root', f'{relative!r} resolves to {resolved}, outside the media root {root} '
                                            '(symlinks may lead only into data.allowed_media_dirs)')
  return resolved


def describe(raw: Any) -> str:
  """A short name of a row for error reports (its video path when it has one)."""
  if isinstance(raw, dict) and isinstance(raw.get('video'), str):
    return raw['video']
  return repr(raw)[:80]
