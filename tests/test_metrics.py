"""The training metrics files: metrics.jsonl and TensorBoard scalars that TensorBoard's own protos and checksums
read back, written without importing torch."""

import json
import os
import struct
import subprocess
import sys

import jax_env
import numpy as np
import pytest
from tensorboardX import record_writer
from tensorboardX.proto import event_pb2

from stllm_jax import metrics
from stllm_jax.errors import UserError


def read_records(path):
  """The data of each TFRecord in `path`, each checksum checked as TensorBoard's writers compute it."""
  records, blob, at = [], open(path, 'rb').read(), 0
  while at < len(blob):
    header = blob[at:at + 8]
    (length,), (header_crc,) = struct.unpack('<Q', header), struct.unpack('<I', blob[at + 8:at + 12])
    data = blob[at + 12:at + 12 + length]
    (data_crc,) = struct.unpack('<I', blob[at + 12 + length:at + 16 + length])
    assert header_crc == record_writer.masked_crc32c(header) and data_crc == record_writer.masked_crc32c(data)
    records.append(data)
    at += 16 + length
  return records


def test_tensorboard_reads_every_scalar_with_its_step(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path))
  writer.write(10, {'loss': 7.25, 'lr': 2e-5, 'accepted': True, 'compiled_steps': 3, 'note': 'not a number'})
  writer.write(20, {'loss': float('nan'), 'kept_tokens': 1234567})
  writer.close()
  assert [r['step'] for r in metrics.read_jsonl(tmp_path / 'metrics.jsonl')] == [10, 20]
  files = os.listdir(tmp_path / 'tensorboard')
  assert len(files) == 1 and files[0].startswith('events.out.tfevents.')
  events = [event_pb2.Event.FromString(data) for data in read_records(tmp_path / 'tensorboard' / files[0])]
  assert events[0].file_version == 'brain.Event:2'
  scalars = [(e.step, v.tag, v.simple_value) for e in events[1:] for v in e.summary.value]
  assert scalars[:4] == [(10, 'loss', 7.25), (10, 'lr', np.float32(2e-5)), (10, 'accepted', 1.0),
                         (10, 'compiled_steps', 3.0)]
  assert scalars[4][:2] == (20, 'loss') and np.isnan(scalars[4][2]) and scalars[5] == (20, 'kept_tokens', 1234567.0)
  assert all(e.wall_time > 1.7e9 for e in events)


def test_a_full_disk_is_one_message_and_a_close_during_another_error_stays_quiet(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path))
  writer._tb._file = open('/dev/full', 'ab')  # pylint: disable=protected-access  # every flush: ENOSPC
  with pytest.raises(UserError, match=r'could not write the training metrics in .* \(No space left on device\)'):
    writer.write(1, {'loss': 1.0})
  writer.close(raise_errors=False)  # the run's own error stands
  writer = metrics.MetricsWriter(str(tmp_path))
  writer._tb._file = open('/dev/full', 'ab')  # pylint: disable=protected-access
  writer._tb._file.write(b'unflushed')  # pylint: disable=protected-access
  with pytest.raises(UserError, match='No space left on device'):
    writer.close()


def test_masked_crc32c_matches_tensorboard_on_every_length():
  rng = np.random.default_rng(0)
  for n in (0, 1, 7, 8, 9, 100, 4099):
    data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    assert metrics.masked_crc32c(data) == record_writer.masked_crc32c(data)


def test_writing_metrics_imports_no_torch(tmp_path):
  probe = ('import sys; from stllm_jax import metrics; w = metrics.MetricsWriter(sys.argv[1]); '
           'w.write(1, {"loss": 1.0}); w.close(); print("torch" in sys.modules)')
  result = subprocess.run([sys.executable, '-c', probe, str(tmp_path)], env=jax_env.subprocess_env(),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and result.stdout.strip() == 'False', result.stderr[-2000:]
  assert json.loads((tmp_path / 'metrics.jsonl').read_text()) == {'step': 1, 'loss': 1.0}
