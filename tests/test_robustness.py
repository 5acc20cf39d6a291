"""Hostile and clumsy inputs through the real entry points: each case gives its input, the exit status (or the
UserError a command turns into exit status 2), the one-line message, and checks that nothing was lost.

Security: annotation paths never leave the media root. Nothing silent: a damaged checkpoint or weights
directory is refused (training falls back to the newest intact step), exploding training stops before a bad
checkpoint, skipped samples are reported and the failure share holds for short runs. One line, never a
traceback, for what a user can cause.
"""

import contextlib
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import command_helpers
import data_helpers as helpers
from stllm_jax import checkpoints, chat, evaluate, loading, train
from stllm_jax.convert import cli as convert_cli
from stllm_jax.data import annotations, conversation, pipeline, samples, video
from stllm_jax.data.errors import DataError, SampleError
from stllm_jax.errors import UserError
from stllm_jax.metrics import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quick(config, steps=4, every=2):
  """The tiny config made quick: one mask bucket, one text bucket, one device."""
  config.mesh = 'fsdp=1'
  config.train.update(steps=steps, log_every=1, checkpoint_every=every)
  config.train.masking.keep_buckets = (0.7,)
  config.train.masking.low = 0.3
  config.data.text_buckets = (16,)
  return config


@pytest.fixture(scope='module')
def trained(tmp_path_factory, tiny_config):
  """A tiny run of 4 steps with checkpoints at 2 and 4 (copy it before damaging it)."""
  workdir = str(tmp_path_factory.mktemp('trained') / 'run')
  train.train(quick(tiny_config()), workdir)
  return workdir


def copy_run(trained, tmp_path):
  target = str(tmp_path / 'run')
  shutil.copytree(trained, target)
  return target


def one_line(capsys) -> str:
  err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith('warning:')]
  assert len(err) == 1, err
  return err[0]


# ------------------------------------------------------------------------------------------------ security


@pytest.fixture(scope='module')
def media(tmp_path_factory):
  """A media root with one good video, a video outside it, and a symlink from inside to that outside video."""
  base = tmp_path_factory.mktemp('media')
  root, outside = base / 'root', base / 'outside'
  root.mkdir(), outside.mkdir()
  helpers.write_video(str(root / 'good.mp4'), helpers.pattern_frames(12))
  helpers.write_video(str(outside / 'secret.mp4'), helpers.pattern_frames(12))
  os.symlink(outside / 'secret.mp4', root / 'link_out.mp4')
  return str(root), str(outside)


ESCAPES = ['../outside/secret.mp4', 'sub/../../outside/secret.mp4', 'link_out.mp4', '/etc/passwd', '..',
           'OUTSIDE/secret.mp4']  # OUTSIDE: the absolute path of the directory beside the root


@pytest.mark.parametrize('video_path', ESCAPES)
def test_annotation_paths_outside_the_media_root_are_refused_unopened(media, video_path, monkeypatch):
  root, outside = media
  video_path = video_path.replace('OUTSIDE', outside)
  opened = []
  monkeypatch.setattr(video, 'load_clip', lambda path, *a, **k: opened.append(path))
  options = samples.SampleOptions('', '', max_text_length=64)
  monkeypatch.setattr(conversation, 'load_llm_tokenizer', lambda _: None)
  monkeypatch.setattr(conversation, 'encode_training_text', lambda *a: types.SimpleNamespace())
  monkeypatch.setattr(conversation, 'load_qformer_tokenizer', lambda _: None)
  monkeypatch.setattr(conversation, 'encode_qformer_text', lambda *a: ([1], 0))
  with pytest.raises(SampleError) as refused:
    samples.load_training_sample(helpers.qa_row(video_path), root, 4, 3.0, np.random.default_rng(0), options)
  assert refused.value.reason == 'outside_media_root' and opened == []
  assert 'outside the media root' in refused.value.message or 'absolute path' in refused.value.message


def test_symlinks_may_lead_only_into_allowed_media_dirs(media):
  root, outside = media
  assert annotations.media_path(root, 'good.mp4') == os.path.realpath(os.path.join(root, 'good.mp4'))
  with pytest.raises(SampleError, match='data.allowed_media_dirs'):
    annotations.media_path(root, 'link_out.mp4')
  assert annotations.media_path(root, 'link_out.mp4', (outside,)) == os.path.realpath(
      os.path.join(outside, 'secret.mp4'))
  with pytest.raises(SampleError):  # allowed dirs open symlinks, not `..`
    annotations.media_path(root, '../outside/../../x.mp4', (outside,))


def test_benchmark_entries_outside_their_video_directory_are_answered_as_errors(media, monkeypatch):
  root, outside = media
  items = [evaluate.Item(f'k{n}', root, path, 'q', 'p', record={}) for n, path in enumerate(ESCAPES[:4])]
  opened = []
  log = types.SimpleNamespace(done={}, append=lambda records: answers.extend(records), path='')
  answers = []
  evaluate.answer_items(None, items, log, lambda path, item: opened.append(path), None, 2,
                        lambda item, answer, error: dict(key=item.key, error=error), sys.stdout)
  assert opened == [] and len(answers) == 4
  assert all('outside_media_root' in a['error'] for a in answers)


# ------------------------------------------------------------------------------------------ checkpoint damage


def flip_bytes(path, count=16, at=(0.3, 0.5, 0.7, 0.9)):
  """Inverts `count` bytes at each of the fractions `at` of the file (64 bytes in all)."""
  data = bytearray(open(path, 'rb').read())
  for fraction in at:
    for i in range(count):
      data[(int(fraction * len(data)) + i) % len(data)] ^= 0xFF
  with open(path, 'wb') as f:
    f.write(data)


def largest_file(directory):
  return max(glob.glob(os.path.join(directory, '**', '*'), recursive=True), key=os.path.getsize)


def state_data_files(step_dir):
  """The files holding a step's arrays (params and optimizer state alike)."""
  return glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True)


def each_data_file(damage):
  return lambda step_dir: [damage(path) for path in state_data_files(step_dir)]


def edit_json_item(step_dir):
  path = os.path.join(step_dir, 'extra', 'metadata')
  extra = json.loads(open(path).read())
  extra['data']['step'] += 1  # a plausible, silent change: the data would skip a batch
  with open(path, 'w') as f:
    json.dump(extra, f)


DAMAGE = {  # what is done to checkpoint step 4 -> (message fragment)
    # in every file of arrays, so the params are hit whatever orbax put where; a flip may leave a chunk unreadable
    'flipped bytes in the state': (each_data_file(flip_bytes), 'arrays differ|cannot be read'),
    'truncated state files': (each_data_file(lambda path: open(path, 'r+b').truncate(100)), 'cannot be read'),
    'missing state files': (each_data_file(os.remove), 'cannot be read'),
    'missing metadata': (lambda d: os.remove(os.path.join(d, 'state', '_METADATA')), None),  # params still whole
    'edited JSON item': (edit_json_item, 'was changed after the save'),
    'missing JSON item': (lambda d: os.remove(os.path.join(d, 'extra', 'metadata')), 'cannot be read'),
}


@pytest.mark.parametrize('damage', list(DAMAGE))
def test_damaged_checkpoint_chat_refuses_and_training_falls_back(trained, tmp_path, tiny_config, damage, capsys):
  workdir = copy_run(trained, tmp_path)
  do, fragment = DAMAGE[damage]
  do(os.path.join(workdir, 'checkpoints', '4'))

  if fragment is None:  # what inference reads is intact (and checked): it loads, equal to the undamaged run
    jax.tree_util.tree_map(np.testing.assert_array_equal, loading.load_model(workdir).params,
                           loading.load_model(trained).params)
  else:
    with pytest.raises(checkpoints.DamagedCheckpoint) as refused:  # what chat, evaluate and export-hf load with
      loading.load_model(workdir)
    assert 'checkpoint step 4' in str(refused.value) and re.search(fragment, str(refused.value)), str(refused.value)
  if damage == 'flipped bytes in the state':
    with pytest.raises(SystemExit) as stopped:
      convert_cli.main(['export-hf', workdir, str(tmp_path / 'exported')])
    assert stopped.value.code == 2 and 'checkpoint step 4' in one_line(capsys)
    assert not os.path.exists(tmp_path / 'exported')

  capsys.readouterr()
  train.train(quick(tiny_config(), steps=5), workdir)  # falls back to step 2, trains on to 5
  err = capsys.readouterr().err
  assert 'checkpoint step 4' in err and 'resumed from step 2' in err and 'damaged_checkpoints' in err
  assert os.path.isdir(os.path.join(workdir, 'damaged_checkpoints', '4'))
  assert checkpoints.RunCheckpoints(workdir).all_steps()[-1] == 5
  assert 'step 5' in loading.load_model(workdir).description


def test_damaged_weights_directory_is_refused_by_every_reader(tmp_path, tiny_config, tiny_params, capsys):
  weights = str(tmp_path / 'weights')
  checkpoints.save_weights(weights, jax.tree_util.tree_map(np.asarray, tiny_params), tiny_config().model.to_dict())
  loading.load_model(weights)  # intact: loads
  flip_bytes(largest_file(os.path.join(weights, 'params')))
  with pytest.raises(checkpoints.DamagedCheckpoint, match=r'weights directory .* is damaged: \d+ arrays under'):
    loading.load_model(weights)
  clip = helpers.write_video(str(tmp_path / 'clip.mp4'), helpers.pattern_frames(8))
  with pytest.raises(SystemExit) as stopped:
    chat.main(['--checkpoint', weights, '--video', clip, '--prompt', 'hi'])
  assert stopped.value.code == 2 and 'is damaged' in one_line(capsys)
  config = quick(tiny_config())
  config.init.checkpoint = weights
  with pytest.raises(UserError, match='is damaged'):  # nor does training start from it
    train.train(config, str(tmp_path / 'run'))


def test_edited_model_json_is_refused(tmp_path, tiny_config, tiny_params):
  weights = str(tmp_path / 'weights')
  checkpoints.save_weights(weights, jax.tree_util.tree_map(np.asarray, tiny_params), tiny_config().model.to_dict())
  model = json.load(open(os.path.join(weights, 'model.json')))
  model['ln_vision_eps'] = 1e-6  # same shapes, other numbers
  json.dump(model, open(os.path.join(weights, 'model.json'), 'w'))
  with pytest.raises(checkpoints.DamagedCheckpoint, match='model.json was changed'):
    loading.load_model(weights)


# -------------------------------------------------------------------------------------------- bad training


def test_exploding_but_finite_training_stops_before_a_bad_checkpoint(tmp_path, tiny_config):
  config = quick(tiny_config(), steps=12, every=2)
  config.train.update(lr=1e30, warmup_fraction=0.0, max_nonfinite_in_a_row=3, log_every=10)
  with pytest.raises(UserError) as stopped:
    train.train(config, str(tmp_path))
  message = str(stopped.value)
  assert '3 steps in a row were rejected (the last, step 3: exploding step' in message, message
  assert 'the last checkpoint, step 2, holds only accepted steps' in message
  with ocp.CheckpointManager(os.path.join(tmp_path, 'checkpoints'), item_names=('state', 'extra')) as manager:
    assert manager.all_steps() == [2]
    state = manager.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
  assert max(float(np.max(np.abs(x))) for x in jax.tree_util.tree_leaves(state['params'])) < 10


class NaNBatches:
  def __init__(self, inner):
    self.inner = inner

  def __next__(self):
    batch = next(self.inner)
    return dict(batch, frames=np.full_like(batch['frames'], np.nan))

  def __getattr__(self, name):
    return getattr(self.inner, name)


def test_the_non_finite_limit_is_exact_between_log_lines(tmp_path, tiny_config, monkeypatch):
  config = quick(tiny_config(), steps=20, every=100)
  config.train.update(max_nonfinite_in_a_row=4, log_every=10)
  make_data = train.make_data
  monkeypatch.setattr(train, 'make_data', lambda *a: NaNBatches(make_data(*a)))
  with pytest.raises(UserError, match=r'4 steps in a row were rejected \(the last, step 4: non-finite'):
    train.train(config, str(tmp_path))


# ------------------------------------------------------------------------------------------------- skips


@pytest.fixture(scope='module')
def half_broken_data(tmp_path_factory):
  """9 of 17 rows name a missing video: 53% bad."""
  base = tmp_path_factory.mktemp('half')
  llm, qformer = helpers.make_tokenizers(str(base / 'tok'))
  videos = base / 'videos'
  videos.mkdir()
  frames = helpers.pattern_frames(20)
  rows = []
  for n in range(8):
    helpers.write_video(str(videos / f'v{n}.mp4'), frames[n:n + 12])
    rows.append(helpers.qa_row(f'v{n}.mp4'))
  rows += [helpers.qa_row(f'gone{n}.mp4') for n in range(9)]
  return helpers.write_json(str(base / 'half.json'), rows), str(videos), llm, qformer


def test_a_short_run_reports_skips_and_the_failure_share_holds(half_broken_data, tmp_path, tiny_config, capsys):
  annotation, videos, llm, qformer = half_broken_data
  config = quick(tiny_config(), steps=3, every=3)
  config.train.batch_size, config.train.grad_accum_steps = 4, 1
  config.model.llm.vocab_size = len(conversation.load_llm_tokenizer(llm))
  config.model.qformer.vocab_size = len(conversation.load_qformer_tokenizer(qformer))
  data = pipeline.default_config()
  data.datasets.half = pipeline.dataset_entry(annotation, videos, num_frames=4)
  data.update(llm_tokenizer=llm, qformer_tokenizer=qformer, num_workers=0, text_buckets=(64,),
              qformer_buckets=(32,), qformer_max_length=32)
  config.data = data
  with pytest.raises(DataError, match=r"dataset 'half': \d+ of \d+ samples failed .* > data.max_failure_share"):
    train.train(config, str(tmp_path))
  err = capsys.readouterr().err
  assert 'step 1: skipped' in err and 'missing_file' in err
  assert 'skipped samples:' in err and 'attempts (missing_file' in err
  assert checkpoints.RunCheckpoints(str(tmp_path)).all_steps() == [3]  # the run's work is kept


# ------------------------------------------------------------------------------------- one line, no traceback


@pytest.mark.parametrize('args, message', [
    (['--config', 'configs/nope.py'], "config file 'configs/nope.py' does not exist"),
    (['--config', 'configs/tiny.py', '--config.train.steps=-5'], 'train.steps must be >= 0, got -5'),
    (['--config', 'configs/tiny.py', '--config.train.lr=-1.0'], 'train.lr must be >= 0, got -1.0'),
])
def test_command_line_mistakes_are_one_line(tmp_path, args, message):
  result = command_helpers.run_train(*args, f'--workdir={tmp_path / "run"}')
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines() == [f'error: {message}'] or message in result.stderr.strip()
  assert 'Traceback' not in result.stderr and len(result.stderr.strip().splitlines()) <= 2


def test_a_workdir_that_is_a_file_is_one_message(tmp_path, tiny_config):
  (tmp_path / 'run').write_text('')
  with pytest.raises(UserError, match='is a file, not a directory'):
    train.train(quick(tiny_config()), str(tmp_path / 'run'))


@contextlib.contextmanager
def mounted_tmpfs(path, options):
  os.makedirs(path, exist_ok=True)
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(path)], capture_output=True).returncode:
    pytest.skip('needs permission to mount a tmpfs')
  try:
    yield str(path)
  finally:
    subprocess.run(['umount', '-l', str(path)], capture_output=True)


def test_a_read_only_workdir_is_one_message(tmp_path, tiny_config):
  with mounted_tmpfs(tmp_path / 'ro', 'size=1m,ro') as read_only:
    with pytest.raises(UserError, match=r'is not writable \(Read-only file system\)'):
      train.train(quick(tiny_config()), read_only)


def test_a_full_disk_is_one_message_and_the_last_good_step_is_kept(tmp_path, tiny_config, trained):
  size = sum(os.path.getsize(p) for p in glob.glob(os.path.join(trained, 'checkpoints', '2', '**', '*'),
                                                   recursive=True))
  with mounted_tmpfs(tmp_path / 'small', f'size={int(size * 1.6) // 1024 + 64}k') as small:
    workdir = os.path.join(small, 'run')
    with pytest.raises(UserError) as stopped:
      train.train(quick(tiny_config(), steps=8, every=2), workdir)
    message = str(stopped.value)
    assert 'No space left on device' in message and 'the last complete checkpoint is step 2' in message, message
    assert checkpoints.RunCheckpoints(workdir).all_steps() == [2]
    shutil.rmtree(os.path.join(workdir, 'tensorboard'), ignore_errors=True)
    shutil.copytree(workdir, tmp_path / 'rescued')  # "free space": the run moves to a roomier disk
  state = loading.load_model(str(tmp_path / 'rescued'))
  assert 'step 2' in state.description


def test_ctrl_c_saves_and_stops_with_status_130(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  workdir = tmp_path / 'run'
  process = subprocess.Popen([sys.executable, '-m', 'stllm_jax.train', '--config', 'configs/tiny.py',
                              f'--workdir={workdir}', '--config.train.steps=400', '--config.train.log_every=1',
                              '--config.train.checkpoint_every=1000', '--config.mesh=fsdp=1',
                              '--config.train.masking.keep_buckets=(0.7,)', '--config.data.text_buckets=(16,)'],
                             cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not (workdir / 'metrics.jsonl').exists() and time.time() < deadline:
    time.sleep(0.5)
  process.send_signal(signal.SIGINT)
  _, err = process.communicate(timeout=300)
  assert process.returncode == 130, err[-3000:]
  assert 'Traceback' not in err and 'stopped by signal 2' in err
  steps = checkpoints.RunCheckpoints(str(workdir)).all_steps()
  assert len(steps) == 1 and 0 < steps[0] < 400
  assert read_jsonl(workdir / 'metrics.jsonl')[-1]['step'] == steps[0]


# ------------------------------------------------------------------------------ paths that resolve from anywhere


def test_a_run_with_relative_paths_loads_from_any_directory_and_after_a_move(tmp_path, tiny_config, tiny_params,
                                                                            monkeypatch):
  project = tmp_path / 'project'
  project.mkdir()
  monkeypatch.chdir(project)
  frozen_only = {k: v for k, v in jax.tree_util.tree_map(np.asarray, tiny_params).items()
                 if k in ('vision', 'ln_vision', 'qformer')}
  checkpoints.save_weights('runs/x/towers', frozen_only, tiny_config().model.to_dict())  # like the demo's towers
  config = quick(tiny_config(), steps=2)
  config.init.checkpoint = 'runs/x/towers'
  config.init.new_params = ('.*',)
  train.train(config, 'runs/x')

  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  monkeypatch.chdir(elsewhere)
  loaded = loading.load_model(str(project / 'runs' / 'x'))
  assert 'step 2' in loaded.description
  shutil.move(str(project / 'runs' / 'x'), str(elsewhere / 'moved'))  # the workdir moves with its towers
  assert 'step 2' in loading.load_model(str(elsewhere / 'moved')).description
  shutil.rmtree(elsewhere / 'moved' / 'towers')
  with pytest.raises(UserError, match='no longer there'):
    loading.load_model(str(elsewhere / 'moved'))
