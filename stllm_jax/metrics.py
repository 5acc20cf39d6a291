"""Training metrics: a JSONL log and TensorBoard event files in the workdir (written by process 0 only),
and the progress bars of long jobs."""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time
from typing import Any, Mapping

import jax
from tqdm import tqdm

from stllm_jax.errors import UserError


def progress_bar(iterable: Any = None, **kwargs) -> tqdm:
  """A tqdm bar on stderr that redraws every second on a terminal and every 30 s into a log file."""
  kwargs.setdefault('mininterval', 1.0 if sys.stderr.isatty() else 30.0)
  return tqdm(iterable, file=sys.stderr, **kwargs)


class MetricsWriter:
  """metrics.jsonl (every value) and TensorBoard scalars (the numbers) in the workdir, from process 0."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = TensorBoardScalars(os.path.join(workdir, 'tensorboard')) if self.enabled else None

  def write(self, step: int, values: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    try:
      with open(self.path, 'a') as f:
        f.write(json.dumps({'step': step, **values}) + '\n')
      self._tb.write(step, {k: v for k, v in values.items() if isinstance(v, (int, float))})
    except OSError as error:
      raise self._write_failed(error) from None

  def close(self, raise_errors: bool = True) -> None:
    """Closes the event file; `raise_errors=False` while another error stops the run, which stays the one
    reported (a full disk fails this close too)."""
    if self._tb is None:
      return
    try:
      self._tb.close()
    except OSError as error:
      if raise_errors:
        raise self._write_failed(error) from None

  def _write_failed(self, error: OSError) -> UserError:
    return UserError(f'could not write the training metrics in {os.path.dirname(self.path)} '
                     f'({error.strerror or error}); free space (or fix the directory) and rerun the same command '
                     'to resume')


class TensorBoardScalars:
  """Scalars in a TensorBoard event file of `logdir` (events.out.tfevents.TIME.HOST): TFRecord-framed `Event`
  protos, encoded here so that training needs neither TensorFlow nor tensorboardX (which imports torch when it is
  installed: seconds of start-up and hundreds of MB in the training process)."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    now = time.time()
    self.path = os.path.join(logdir, f'events.out.tfevents.{int(now)}.{socket.gethostname()}')
    self._file = open(self.path, 'ab')  # pylint: disable=consider-using-with
    self._record(_event(now, 0, file_version=b'brain.Event:2'))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    now = time.time()
    for tag, value in scalars.items():
      self._record(_event(now, step, summary=_field_bytes(1, _field_bytes(1, tag.encode()) + _field_float(2, value))))
    self._file.flush()

  def close(self) -> None:
    self._file.close()

  def _record(self, data: bytes) -> None:
    """One TFRecord: length, its masked CRC-32C, the data, its masked CRC-32C."""
    length = struct.pack('<Q', len(data))
    self._file.write(length + struct.pack('<I', masked_crc32c(length)) + data + struct.pack('<I', masked_crc32c(data)))


def _event(wall_time: float, step: int, file_version: bytes = b'', summary: bytes = b'') -> bytes:
  """tensorboard's Event: wall_time = 1 (double), step = 2 (int64), file_version = 3, summary = 5."""
  out = struct.pack('<Bd', 1 << 3 | 1, wall_time) + _varint(2 << 3) + _varint(step)
  return out + (_field_bytes(3, file_version) if file_version else b'') + (_field_bytes(5, summary) if summary else b'')


def _field_bytes(number: int, payload: bytes) -> bytes:  # wire type 2: length-delimited
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _field_float(number: int, value: float) -> bytes:  # wire type 5: 32-bit (Summary.Value.simple_value)
  return _varint(number << 3 | 5) + struct.pack('<f', value)


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    out.append(n & 0x7f | (0x80 if n > 0x7f else 0))
    n >>= 7
    if not n:
      return bytes(out)


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = crc >> 1 ^ (0x82F63B78 if crc & 1 else 0)  # Castagnoli, reflected
    table.append(crc)
  return table


_CRC32C_TABLE = _crc32c_table()


def masked_crc32c(data: bytes) -> int:
  """TFRecord's checksum: CRC-32C of `data`, rotated right by 15 bits plus 0xa282ead8 (mod 2^32)."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ crc >> 8
  crc ^= 0xFFFFFFFF
  return ((crc >> 15 | crc << 17) + 0xA282EAD8) & 0xFFFFFFFF


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
