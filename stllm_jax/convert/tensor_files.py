"""Reading and writing named tensors in PyTorch's file formats, one tensor (or one file) at a time.

Read:
  safetensors   parsed here (an 8-byte header length, a JSON header, raw little-endian data) and memory-mapped;
                each tensor is copied out on request and its pages are released at once (`madvise`), so a
                whole file never counts towards the process's resident memory.
  .bin / .pth   `torch.load(mmap=True, weights_only=True)`, one file at a time; a `model` entry (LAVIS)
                is unwrapped. A file that also pickles Python objects (an optimizer, a config object) is
                refused unless the caller trusts it (`trusted`: full unpickling, which can run code).
  directories   Hugging Face layouts: `model.safetensors`, `pytorch_model.bin`, or sharded with
                `*.index.json`.
Write: `write_safetensors` streams tensors into a file whose header is computed from shapes and dtypes
first, so a shard is never held in memory as a whole. Files are readable by the `safetensors` library.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import re
import struct
from typing import Any, Callable, Iterator, Sequence

import ml_dtypes
import numpy as np

from stllm_jax.errors import UserError

SAFETENSORS_DTYPES = {
    'F64': np.dtype(np.float64), 'F32': np.dtype(np.float32), 'F16': np.dtype(np.float16),
    'BF16': np.dtype(ml_dtypes.bfloat16), 'I64': np.dtype(np.int64), 'I32': np.dtype(np.int32),
    'I16': np.dtype(np.int16), 'I8': np.dtype(np.int8), 'U8': np.dtype(np.uint8), 'BOOL': np.dtype(np.bool_),
}
SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
SAFETENSORS_INDEX = 'model.safetensors.index.json'
BIN_INDEX = 'pytorch_model.bin.index.json'
SAFETENSORS_SINGLE = 'model.safetensors'
BIN_SINGLE = 'pytorch_model.bin'


def format_bytes(n: float) -> str:
  """1536 -> '1.5 KiB'."""
  for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
    if abs(n) < 1024 or unit == 'TiB':
      return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
    n /= 1024
  raise AssertionError('unreachable')


def format_count(n: float) -> str:
  """6_738_415_616 -> '6.74 B'."""
  for unit, factor in (('B', 1e9), ('M', 1e6), ('K', 1e3)):
    if abs(n) >= factor:
      return f'{n / factor:.2f} {unit}'
  return f'{n:.0f}'


# ------------------------------------------------------------------------------------------- safetensors

@dataclasses.dataclass(frozen=True)
class SafetensorsEntry:
  dtype: np.dtype
  shape: tuple[int, ...]
  start: int  # byte offsets in the file
  end: int


def read_safetensors_header(path: str) -> tuple[dict[str, SafetensorsEntry], dict[str, str]]:
  """({name: entry}, metadata) of a safetensors file, reading only its header."""
  with open(path, 'rb') as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise UserError(f'{path} is not a safetensors file (it is shorter than 8 bytes)')
    (header_len,) = struct.unpack('<Q', raw)
    if header_len > os.path.getsize(path) - 8:
      raise UserError(f'{path} is not a safetensors file (its header length is past the end of the file)')
    try:
      header = json.loads(f.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
      raise UserError(f'{path} is not a safetensors file (its header is not JSON: {err})') from None
  base = 8 + header_len
  metadata = header.pop('__metadata__', None) or {}
  entries = {}
  for name, info in header.items():
    if info['dtype'] not in SAFETENSORS_DTYPES:
      raise UserError(f'{path}: tensor {name} has dtype {info["dtype"]}, which stllm_jax does not read')
    start, end = info['data_offsets']
    entries[name] = SafetensorsEntry(SAFETENSORS_DTYPES[info['dtype']], tuple(info['shape']), base + start, base + end)
  return entries, metadata


class SafetensorsReader:
  """One memory-mapped safetensors file; `read(name)` returns a private copy and drops the mapped pages."""

  def __init__(self, path: str):
    self.path = path
    self.entries, self.metadata = read_safetensors_header(path)
    self._file = open(path, 'rb')
    size = os.path.getsize(path)
    self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None

  def read(self, name: str) -> np.ndarray:
    entry = self.entries[name]
    count = math.prod(entry.shape)
    if entry.end - entry.start != count * entry.dtype.itemsize:
      raise UserError(f'{self.path}: tensor {name} has {entry.end - entry.start} bytes, but its shape '
                      f'{list(entry.shape)} and dtype need {count * entry.dtype.itemsize}')
    view = np.frombuffer(self._map, entry.dtype, count, entry.start) if count else np.zeros(0, entry.dtype)
    array = view.reshape(entry.shape).copy()
    del view
    self._release(entry.start, entry.end)
    return array

  def _release(self, start: int, end: int) -> None:
    """Unmaps the pages of [start, end) from this process (the page cache keeps them for a re-read)."""
    if self._map is None or not hasattr(mmap, 'MADV_DONTNEED'):
      return
    page = mmap.PAGESIZE
    first = start - start % page
    length = end - first
    if length > 0:
      self._map.madvise(mmap.MADV_DONTNEED, first, min(length, len(self._map) - first))

  def close(self) -> None:
    if self._map is not None:
      self._map.close()
    self._file.close()


def write_safetensors(path: str, specs: Sequence[tuple[str, tuple[int, ...], np.dtype]],
                      produce: Callable[[str], np.ndarray], metadata: dict[str, str] | None = None,
                      on_tensor: Callable[[int], None] | None = None) -> int:
  """Writes the tensors `specs` (name, shape, dtype), in order, asking `produce(name)` for each one only
  when it is written; returns the bytes written. `on_tensor(nbytes)` is called after each tensor."""
  header, offset = {}, 0
  for name, shape, dtype in specs:
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    header[name] = {'dtype': SAFETENSORS_NAMES[dtype], 'shape': list(shape), 'data_offsets': [offset, offset + nbytes]}
    offset += nbytes
  if metadata:
    header['__metadata__'] = dict(metadata)
  encoded = json.dumps(header, separators=(',', ':')).encode()
  encoded += b' ' * (-len(encoded) % 8)  # data starts 8-byte aligned
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(encoded)))
    f.write(encoded)
    for name, shape, dtype in specs:
      array = np.ascontiguousarray(produce(name), dtype=np.dtype(dtype))
      if tuple(array.shape) != tuple(shape):
        raise ValueError(f'{name}: produced shape {list(array.shape)}, expected {list(shape)}')
      f.write(array.astype(array.dtype.newbyteorder('<'), copy=False).tobytes())
      if on_tensor:
        on_tensor(array.nbytes)
  return 8 + len(encoded) + offset


# ------------------------------------------------------------------------------------------------- torch

def _torch_load(path: str, trusted: bool = False) -> tuple[Any, bool]:
  """(what the file holds, whether its tensors are memory-mapped from the file)."""
  import pickle  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  weights_only = not trusted
  try:
    try:
      return torch.load(path, map_location='cpu', weights_only=weights_only, mmap=True), True
    except RuntimeError as err:
      if 'mmap' not in str(err):
        raise
      return torch.load(path, map_location='cpu', weights_only=weights_only), False  # legacy format: no mmap
  except pickle.UnpicklingError as err:
    found = re.search(r'Unsupported global: GLOBAL (\S+)', str(err))
    what = f' (e.g. {found.group(1)})' if found else ''
    raise UserError(f'{path} pickles Python objects besides tensors{what}, so it is not loaded. If you trust the '
                    'file (unpickling it can run code), pass --trust-pickle.') from None
  except (RuntimeError, EOFError, OSError) as err:
    raise UserError(f'{path} is not a readable PyTorch checkpoint: {err}') from None


def torch_state_dict(path: str, key: str | None = None, trusted: bool = False) -> tuple[dict[str, Any], bool]:
  """({name: torch tensor}, memory-mapped?) of a .bin/.pth file, unwrapping `state[key]` when it is there."""
  state, mapped = _torch_load(path, trusted)
  if key and isinstance(state, dict) and isinstance(state.get(key), dict):
    state = state[key]
  if not isinstance(state, dict):
    raise UserError(f'{path} holds a {type(state).__name__}, not a state dict of named tensors')
  not_tensors = [k for k, v in state.items() if not hasattr(v, 'shape')]
  if not_tensors:
    raise UserError(f'{path} is not a plain state dict: {len(not_tensors)} entries are not tensors '
                    f'(e.g. {not_tensors[:3]})')
  return state, mapped


_MADV_DONTNEED = 4  # Linux


def _release_mapped(tensor: Any) -> None:
  """Drops the pages of a tensor memory-mapped from a file (they are re-read from the file if touched again)."""
  import ctypes  # pylint: disable=g-import-not-at-top
  nbytes = tensor.untyped_storage().nbytes()
  if not nbytes or not hasattr(os, 'sched_getaffinity'):  # Linux only
    return
  start = tensor.untyped_storage().data_ptr()
  first = start - start % mmap.PAGESIZE
  ctypes.CDLL(None).madvise(ctypes.c_void_p(first), ctypes.c_size_t(start + nbytes - first), _MADV_DONTNEED)


def _copied(tensor: Any, mapped: bool) -> np.ndarray:
  """A private numpy copy of a torch tensor; a memory-mapped source's pages are released after the copy."""
  from stllm_jax.convert import strict  # pylint: disable=g-import-not-at-top
  array = np.array(strict.to_numpy(tensor))
  if mapped:
    _release_mapped(tensor)
  return array


# ------------------------------------------------------------------------------------------ tensor sets

@dataclasses.dataclass
class TensorFile:
  """One file of named tensors; `prefix` is put before each of its names."""
  path: str
  prefix: str = ''
  key: str | None = None  # torch files: unwrap state[key] if present (LAVIS keeps weights under 'model')
  index_names: tuple[str, ...] | None = None  # from a sharded directory's index (without the prefix)
  trusted: bool = False  # torch files: unpickle Python objects too (only for files the user trusts)

  @property
  def is_safetensors(self) -> bool:
    return self.path.endswith('.safetensors')

  def names(self) -> list[str]:
    if self.index_names is not None:
      return [self.prefix + n for n in self.index_names]
    if self.is_safetensors:
      return [self.prefix + n for n in read_safetensors_header(self.path)[0]]
    return [self.prefix + n for n in torch_state_dict(self.path, self.key, self.trusted)[0]]

  def tensors(self) -> Iterator[tuple[str, Callable[[], Any]]]:
    """(name, loader) for every tensor in the file, read one at a time; the file is released at the end."""
    if self.is_safetensors:
      reader = SafetensorsReader(self.path)
      try:
        for name in list(reader.entries):
          yield self.prefix + name, lambda name=name: reader.read(name)
      finally:
        reader.close()
    else:
      state, mapped = torch_state_dict(self.path, self.key, self.trusted)
      for name in list(state):
        yield self.prefix + name, lambda name=name: _copied(state.pop(name), mapped)
      del state  # the file's mapping goes with its last tensor


@dataclasses.dataclass
class TensorSet:
  """Named tensors spread over files: listed without loading, iterated one file and one tensor at a time."""
  files: list[TensorFile]
  description: str

  def names(self) -> list[str]:
    return [name for f in self.files for name in f.names()]

  def nbytes(self) -> int:
    return sum(os.path.getsize(f.path) for f in self.files)

  def __iter__(self) -> Iterator[tuple[str, Callable[[], Any]]]:
    for f in self.files:
      yield from f.tensors()

  def matching(self, pattern: str) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) of every tensor whose whole name matches the regex `pattern`; a file is loaded only if it
    holds one."""
    from stllm_jax.convert import strict  # pylint: disable=g-import-not-at-top
    compiled = re.compile(pattern)
    for f in self.files:
      if any(compiled.fullmatch(name) for name in f.names()):
        for name, load in f.tensors():
          if compiled.fullmatch(name):
            yield name, strict.to_numpy(load())

  def read(self, name: str) -> np.ndarray:
    """One tensor by name (loads only the file that holds it)."""
    from stllm_jax.convert import strict  # pylint: disable=g-import-not-at-top
    for f in self.files:
      if f.index_names is not None and name not in f.names():
        continue
      for found, load in f.tensors():
        if found == name:
          return strict.to_numpy(load())
    raise KeyError(name)


def hf_directory_files(directory: str) -> list[TensorFile]:
  """The weight files of a Hugging Face model directory (sharded with an index, or single)."""
  for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
    index_path = os.path.join(directory, index_name)
    if os.path.isfile(index_path):
      return _indexed_files(directory, index_path)
  for single in (SAFETENSORS_SINGLE, BIN_SINGLE):
    if os.path.isfile(os.path.join(directory, single)):
      return [TensorFile(os.path.join(directory, single))]
  raise UserError(f'{directory} holds no weights: expected {SAFETENSORS_SINGLE}, {BIN_SINGLE}, or shards with '
                  f'{SAFETENSORS_INDEX} / {BIN_INDEX}')


def _indexed_files(directory: str, index_path: str) -> list[TensorFile]:
  try:
    with open(index_path) as f:
      weight_map = json.load(f)['weight_map']
  except (json.JSONDecodeError, KeyError, TypeError) as err:
    raise UserError(f'{index_path} is not a Hugging Face weight index (it needs a "weight_map"): {err}') from None
  by_file: dict[str, list[str]] = {}
  for name, filename in weight_map.items():
    by_file.setdefault(filename, []).append(name)
  missing = [fn for fn in by_file if not os.path.isfile(os.path.join(directory, fn))]
  if missing:
    raise UserError(f'{index_path} names shards that are not in {directory}: {missing[:5]} '
                    '(an incomplete download?)')
  return [TensorFile(os.path.join(directory, fn), index_names=tuple(names)) for fn, names in sorted(by_file.items())]
