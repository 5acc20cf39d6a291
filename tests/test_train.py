"""The training entry point: a sharded run, exact resume after SIGKILL, first-run and non-finite messages.

The command runs in this process (command_helpers.run_train, 8 simulated devices from conftest) except where it
must be a process of its own: the run killed by SIGKILL, and the check that the command imports no torch."""

import dataclasses
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import jax_env
from command_helpers import jax_cache_settings_kept, run_train

from stllm_jax import checkpoints, configlib, train
from stllm_jax.errors import UserError
from stllm_jax.metrics import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ['--config.train.steps=6', '--config.train.checkpoint_every=3', '--config.train.log_every=1',
        '--config.train.masking.keep_buckets=(0.5, 0.7)', '--config.data.text_buckets=(16,)',
        '--config.mesh=data=2,fsdp=2,tensor=2']


@pytest.fixture(scope='module')
def env():
  """8 CPU devices and the session's compilation cache (see conftest) for the subprocesses."""
  return jax_env.subprocess_env(device_count=8)


def tiny_args(workdir):
  return ['--config', 'configs/tiny.py', f'--workdir={workdir}', *FAST]


def run_killed_train(workdir, env, kill_at):
  """`python -m stllm_jax.train` on the tiny config, SIGKILLed before step `kill_at` (killed_train.py)."""
  return subprocess.run([sys.executable, os.path.join(ROOT, 'tests', 'killed_train.py'), str(kill_at),
                         *tiny_args(workdir)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def final_params(workdir):
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'), item_names=('state', 'extra')) as manager:
    restored = manager.restore(6, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return restored.state['params']


def test_sharded_run_and_exact_resume_after_sigkill(tmp_path, env, report):
  straight = run_train(*tiny_args(tmp_path / 'straight'))
  assert straight.returncode == 0, straight.stderr[-3000:]
  assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in straight.stderr

  killed = run_killed_train(tmp_path / 'resumed', env, kill_at=5)  # dies before step 5: step 4 is lost
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  resumed = run_train(*tiny_args(tmp_path / 'resumed'))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resumed from step 3' in resumed.stderr

  losses = {r['step']: r['loss'] for r in read_jsonl(tmp_path / 'straight' / 'metrics.jsonl')}
  second = read_jsonl(tmp_path / 'resumed' / 'metrics.jsonl')
  assert [r['step'] for r in second] == [1, 2, 3, 4, 4, 5, 6]  # step 4 ran twice: before the kill, after the resume
  assert {r['step']: r['loss'] for r in second} == losses  # identical losses (the rerun of 4 replaces the first)
  assert second[3]['loss'] == second[4]['loss']
  a, b = final_params(tmp_path / 'straight'), final_params(tmp_path / 'resumed')
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)  # bit-identical
  report('exact resume (tiny config, 8 CPU devices, mesh 2x2x2)',
         f'losses per step {[round(losses[s], 5) for s in sorted(losses)]}; resumed run identical, params bit-identical')
  compiled = read_jsonl(tmp_path / 'straight' / 'metrics.jsonl')[-1]['compiled_steps']
  assert compiled <= 2  # 2 visual buckets x 1 text bucket


def test_the_command_imports_neither_torch_nor_transformers(env):
  """Training reads text only through the data pipeline's tokenizers: the command starts without transformers
  (and the torch it imports), seconds sooner."""
  probe = 'import sys, stllm_jax.train; print(sorted(m for m in ("torch", "transformers") if m in sys.modules))'
  result = subprocess.run([sys.executable, '-c', probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and result.stdout.strip() == '[]', result.stdout + result.stderr[-2000:]


def test_the_compilation_cache_follows_its_environment_variables(tmp_path, monkeypatch):
  with jax_cache_settings_kept():
    monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(tmp_path))
    monkeypatch.setenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.25')
    train.enable_compilation_cache()
    assert jax.config.jax_compilation_cache_dir == str(tmp_path)
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.25
    monkeypatch.delenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS')
    train.enable_compilation_cache()
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 1.0  # the default: train steps, not small ops


QA_DATASETS = {  # the released QA recipe's datasets -> annotation file and video directory under data/videochat2
    'caption_videochatgpt': ('video/conversation/videochatgpt/train_full_flat.json', 'ANet/ANet_320p_fps30'),
    'classification_k710': ('video/classification/k710/train.json', 'k710'),
    'classification_ssv2': ('video/classification/ssv2/train.json', 'video_pub/ssv2_video'),
    'reasoning_next_qa': ('video/reasoning/next_qa/train.json', 'nextqa'),
    'reasoning_clevrer_qa': ('video/reasoning/clevrer_qa/train.json', 'clevrer/video_train'),
    'reasoning_clevrer_mc': ('video/reasoning/clevrer_mc/train.json', 'clevrer/video_train'),
    'vqa_webvid_qa': ('video/vqa/webvid_qa/train.json', 'WebVid2M'),
}
CONVERSATION_DATASETS = {  # the released conversation recipe's
    'caption_videochat': ('video/caption/videochat/train.json', 'WebVid10M'),
    'conversation_videochat1': ('video/conversation/videochat1/train_flat.json', 'WebVid10M'),
    'caption_videochatgpt': ('video/conversation/videochatgpt/train_full_flat.json', 'ANet/ANet_320p_fps30'),
    'caption_webvid': ('video/caption/webvid/train.json', 'WebVid2M'),
    'vqa_webvid_qa': ('video/vqa/webvid_qa/train.json', 'WebVid2M'),
}


@pytest.mark.parametrize('config, datasets', [('stllm_7b.py', QA_DATASETS),
                                              ('stllm_7b_global_local.py', CONVERSATION_DATASETS)])
def test_first_run_of_a_7b_config_names_every_missing_dataset_and_where_it_goes(tmp_path, config, datasets):
  workdir = tmp_path / 'run'
  result = run_train('--config', f'configs/{config}', f'--workdir={workdir}')
  assert result.returncode == 2
  assert 'Traceback' not in result.stderr
  assert 'cannot start training' in result.stderr
  assert 'python -m stllm_jax.convert' in result.stderr  # the weights are missing too
  for name, (annotation, videos) in datasets.items():
    assert (f'dataset {name}: no annotation file data/videochat2/VideoChat2-IT/{annotation} and no video directory '
            f'data/videochat2/videos/{videos}\n') in result.stderr
  assert result.stderr.count('  - dataset ') == len(datasets)
  assert 'README "Data"' in result.stderr
  assert not workdir.exists()  # stopped before anything else: no workdir, no weights read, no data opened


def test_first_run_message_leaves_out_a_dataset_of_weight_0():
  config = configlib.load_config_file(os.path.join(ROOT, 'configs', 'stllm_7b.py'))
  config.data.datasets.classification_k710.weight = 0.0
  missing = [problem for problem in train.data_problems(config.data) if problem.startswith('dataset ')]
  assert sorted(problem.split(':')[0] for problem in missing) == sorted(
      f'dataset {name}' for name in QA_DATASETS if name != 'classification_k710')


def test_bad_config_value_is_one_message(tmp_path):
  result = run_train(*tiny_args(tmp_path), '--config.train.mvm_loss=l1')
  assert result.returncode == 2 and 'Traceback' not in result.stderr
  assert "train.mvm_loss='l1'" in result.stderr


def test_the_configs_malloc_mode_is_what_the_command_sets_up(tmp_path):
  result = run_train(*tiny_args(tmp_path), '--config.host_malloc=fast')
  assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr[-2000:]
  assert "host_malloc 'fast' is not a malloc mode: choose among system, kept" in result.stderr
  assert not any(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.parametrize('override, message', [
    ('--config.workdir=x', "--config.workdir: the config has no field 'workdir'"),
    ('--config.train.stepz=3', "--config.train.stepz: the config has no field 'stepz' (Did you mean \"steps\""),
    ('--config.nope.x=1', "--config.nope.x: the config has no field 'nope'"),
])
def test_override_of_a_field_the_config_lacks_is_one_message(tmp_path, override, message):
  result = run_train(*tiny_args(tmp_path), override)
  assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr[-2000:]
  assert message in result.stderr


class NaNBatches:
  """Wraps a data iterator: every batch's frames are NaN."""

  def __init__(self, inner):
    self.inner = inner

  def __next__(self):
    batch = next(self.inner)
    return dict(batch, frames=batch['frames'] * np.nan)

  def __getattr__(self, name):
    return getattr(self.inner, name)


class FailingClose:
  """Stands in for the checkpoints or the data of a Run: its close raises (a full disk, a dead worker)."""

  def __init__(self, calls, name):
    self.calls, self.name = calls, name

  def close(self):
    self.calls.append(self.name)
    raise OSError(f'{self.name} could not close')


def test_closing_a_run_closes_both_parts_and_raises_only_when_asked():
  for raise_errors in (True, False):
    calls = []
    run = train.Run(**{f.name: None for f in dataclasses.fields(train.Run)})
    run.checkpoints, run.data = FailingClose(calls, 'checkpoints'), FailingClose(calls, 'data')
    if raise_errors:
      with pytest.raises(OSError, match='checkpoints could not close'):
        run.close()
    else:
      run.close(raise_errors=False)
    assert calls == ['checkpoints', 'data']


def test_non_finite_steps_are_skipped_then_training_stops(tmp_path, tiny_config, monkeypatch):
  config = tiny_config()
  config.mesh = 'fsdp=1'
  config.train.update(steps=8, log_every=1, checkpoint_every=2, max_nonfinite_in_a_row=3)
  config.train.masking.keep_buckets = (0.7,)
  config.train.masking.low = 0.3
  config.data.text_buckets = (16,)
  make_data = train.make_data
  data = []
  monkeypatch.setattr(train, 'make_data', lambda *a: data.append(NaNBatches(make_data(*a))) or data[0])
  closes = []
  failing = FailingClose(closes, 'data')
  monkeypatch.setattr(NaNBatches, 'close', lambda self: (self.inner.close(), failing.close()), raising=False)
  # The data's close fails too as the run stops: the run's own error is still the one reported.
  with pytest.raises(UserError, match=r'3 steps in a row were rejected \(the last, step 3: non-finite loss or gradient\)'):
    train.train(config, str(tmp_path))
  assert closes == ['data']
  records = read_jsonl(tmp_path / 'metrics.jsonl')
  assert [r['nonfinite_steps'] for r in records] == [1, 1, 1]
  # the checkpoint at step 2 holds the untouched (finite) initial params
  run = checkpoints.RunCheckpoints(str(tmp_path))
  assert run.latest_step() == 2
  with ocp.CheckpointManager(os.path.join(tmp_path, 'checkpoints'), item_names=('state', 'extra')) as manager:
    state = manager.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state['params']))


def test_initial_weights_load_strictly_and_new_parts_are_listed(tmp_path, tiny_config, tiny_params, capsys):
  config = tiny_config()
  config.mesh = 'fsdp=1'
  no_head = {k: v for k, v in tiny_params.items() if not k.startswith('mvm_')}
  model = config.model.to_dict()
  checkpoints.save_weights(str(tmp_path / 'weights'), no_head, model)
  config.init.checkpoint = str(tmp_path / 'weights')
  config.train.update(steps=1, log_every=1)
  config.train.masking.keep_buckets = (0.7,)
  config.data.text_buckets = (16,)
  train.train(config, str(tmp_path / 'run'))
  assert 'newly initialised: mvm_dense, mvm_norm' in capsys.readouterr().err

  config.init.new_params = ()
  with pytest.raises(UserError, match=r'not in the checkpoint \(and not in init.new_params\): 4'):
    train.train(config, str(tmp_path / 'run2'))


def test_a_second_run_of_the_same_config_reuses_the_jitted_step(tmp_path, tiny_config):
  """A resume in the same process (or any second train() of the config) traces and compiles nothing again; another
  run length (another learning-rate schedule) gets its own step."""
  def jitted_step(workdir, steps):
    config = tiny_config()
    config.mesh, config.train.steps = 'fsdp=1', steps
    run = train.setup(config, str(tmp_path / workdir))
    run.close()
    return run.train_step
  first = jitted_step('a', 3)
  assert jitted_step('b', 3) is first
  assert jitted_step('c', 4) is not first
