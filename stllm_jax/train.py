"""Train ST-LLM.

    python -m stllm_jax.train --config configs/X.py [--workdir DIR] [--config.train.lr=1e-5 ...]

A batch goes: data iterator (host, numpy) -> `sharding.shard_batch` (split over the mesh's data axes)
-> `step.train_step` (jitted once per visual-token bucket x text-length bucket) -> metrics. Checkpoints
(`checkpoints.RunCheckpoints`) hold the train state and the data iterator's state; a rerun of the same
command resumes from the latest one. SIGTERM saves a checkpoint and exits (status 143).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from stllm_jax import checkpoints, demo, masking, sharding, step
from stllm_jax.data import pipeline
from stllm_jax.data.errors import DataError
from stllm_jax.data.random_batches import RandomBatches
from stllm_jax.errors import UserError, exit_with
from stllm_jax.metrics import MetricsWriter, progress_bar
from stllm_jax.models import stllm

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/tiny.py', lock_config=True)
flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, metrics); default runs/<config name>')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() (multi-host; set by launch/ scripts)')

KILL_AT_STEP_ENV = 'STLLM_KILL_AT_STEP'  # fault injection: SIGKILL this process before step N (resume tests)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax narrates every save at INFO
  enable_compilation_cache()
  if FLAGS.config is None:
    exit_with(UserError('give a config: python -m stllm_jax.train --config configs/tiny.py'))
  if FLAGS.distributed:
    jax.distributed.initialize()
  workdir = FLAGS.workdir or os.path.join('runs', os.path.splitext(os.path.basename(config_flags.get_config_filename(
      FLAGS['config'])))[0])
  try:
    if 'demo' in FLAGS.config:  # configs/demo.py: data, training, evaluation and the claims' tables
      demo.run(FLAGS.config, workdir, train)
    else:
      train(FLAGS.config, workdir)
  except (UserError, DataError) as error:
    exit_with(error)


def enable_compilation_cache() -> None:
  """Compiled train steps are kept on disk (JAX_COMPILATION_CACHE_DIR, default ~/.cache/stllm_jax/xla),
  so a rerun or a resumed run does not compile its programs again."""
  cache = os.environ.get('JAX_COMPILATION_CACHE_DIR', os.path.expanduser('~/.cache/stllm_jax/xla'))
  jax.config.update('jax_compilation_cache_dir', cache)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def train(config: Any, workdir: str) -> dict:
  """Runs (or resumes) training; returns the last logged metrics."""

  model_cfg, train_cfg = _validated(config)
  preflight(config)
  mesh = sharding.make_mesh(config.mesh)
  data = make_data(config, model_cfg, train_cfg)
  total_steps = train_cfg.steps or math.ceil(train_cfg.epochs * data.batches_per_epoch)
  log = _logger()
  log(f'{jax.device_count()} {jax.devices()[0].platform} device(s), mesh {dict(mesh.shape)}; '
      f'{total_steps} steps of {train_cfg.batch_size} samples ({train_cfg.grad_accum_steps} micro-batches)')

  model = stllm.STLLM(model_cfg)
  abstract = stllm.abstract_variables(model_cfg)
  shardings = sharding.param_shardings(abstract, mesh)
  params = checkpoints.initial_params(config, model_cfg, shardings, log)
  trainable, frozen = step.split_params(params, train_cfg.frozen)
  del params
  log(f'trainable {_count(trainable):,d} params, frozen {_count(frozen):,d}')
  schedule = step.make_schedule(train_cfg, total_steps)
  tx = step.make_optimizer(train_cfg, schedule)
  state = step.init_state(trainable, tx, config.seed, step.split_params(shardings, train_cfg.frozen)[0], mesh)

  run = checkpoints.RunCheckpoints(workdir, train_cfg.checkpoints_to_keep)
  frozen_sums = checkpoints.checksums(frozen)
  start = run.latest_step()
  if start is not None:
    state, extra = run.restore(start, state)
    changed = checkpoints.checksum_mismatches(extra['frozen_checksums'], frozen_sums)
    if changed:
      raise UserError(f'{workdir} was trained from other frozen weights than config.init gives now '
                      f'({len(changed)} params differ, e.g. {changed[0]}); use the same init.checkpoint or a new workdir')
    data.set_state(extra['data'])
    log(f'resumed from step {start} in {run.directory}')
  start = int(state.step)
  if start >= total_steps:
    run.close()
    if hasattr(data, 'close'):
      data.close()
    log(f'{workdir} is trained already ({start} of {total_steps} steps); nothing to do')
    return {}

  # The state keeps its shardings from step to step, so each bucket compiles exactly once.
  state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
  train_step = jax.jit(functools.partial(step.train_step, model=model, cfg=train_cfg, tx=tx, schedule=schedule),
                       static_argnames='n_keep', donate_argnames='state', out_shardings=(state_shardings, None))
  writer = MetricsWriter(workdir)
  stop = {'signal': None}
  signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
  kill_at = int(os.environ.get(KILL_AT_STEP_ENV, '0'))

  def save(at_step: int) -> None:
    if not bool(_all_finite(state.params)):
      raise UserError(f'the trainable params hold non-finite values at step {at_step}; no checkpoint written')
    run.save(at_step, state, {'data': data.get_state(), 'frozen_checksums': frozen_sums,
                              'config': config.to_dict() if hasattr(config, 'to_dict') else dict(config)})

  progress = progress_bar(total=total_steps, initial=start, desc='train', unit='step',
                          disable=jax.process_index() != 0)
  window, last, nonfinite_in_a_row = [], {}, 0
  window_start = time.perf_counter()
  try:
    with sharding.activate(mesh):
      for current in range(start, total_steps):
        if kill_at and current + 1 == kill_at:
          run.wait()
          os.kill(os.getpid(), signal.SIGKILL)
        host_batch = next(data)
        num_visual = model_cfg.num_visual_tokens(host_batch['frames'].shape[1])
        rho, n_keep = masking.step_mask_plan(current, config.seed, num_visual, train_cfg.masking)
        batch = sharding.shard_batch({k: host_batch[k] for k in step.MODEL_BATCH_KEYS}, mesh)
        state, metrics = train_step(state, frozen, batch, n_keep=n_keep)
        window.append(_StepRecord(metrics, rho, n_keep, *host_batch['frames'].shape[:2],
                                  host_batch['input_ids'].shape[1]))
        progress.update(1)
        done = current + 1
        if done % train_cfg.log_every == 0 or done == total_steps or stop['signal']:
          jax.block_until_ready(window[-1].metrics)  # the window's steps have run: time them
          last = _summarise(window, time.perf_counter() - window_start, jax.process_count())
          last.update(compiled_steps=step.compiled_programs(train_step), **data.metrics())
          writer.write(done, last)
          progress.set_postfix(loss=f'{last["loss"]:.4f}', lr=f'{last["lr"]:.2e}', keep=last['kept_tokens'])
          nonfinite_in_a_row = _count_nonfinite(window, nonfinite_in_a_row)
          window, window_start = [], time.perf_counter()
          if nonfinite_in_a_row >= train_cfg.max_nonfinite_in_a_row:
            raise UserError(f'{nonfinite_in_a_row} steps in a row had a non-finite loss or gradient (last at step '
                            f'{done}); their updates were skipped. Lower train.lr, enable train.grad_clip_norm, or '
                            f'check the data. The last good checkpoint is in {run.directory}')
        if done % train_cfg.checkpoint_every == 0 or done == total_steps or stop['signal']:
          save(done)
        if stop['signal']:
          break
  finally:  # a pending checkpoint is always completed, whatever stopped the loop
    progress.close()
    run.wait()
    run.close()
    writer.close()
    if hasattr(data, 'close'):
      data.close()
  if stop['signal']:
    log(f'stopped by signal {stop["signal"]} after step {done}; checkpoint saved, rerun the same command to resume')
    sys.exit(128 + stop['signal'])
  log(f'done: {total_steps} steps; last loss {last.get("loss", float("nan")):.4f}; '
      f'{last.get("compiled_steps", 0)} compiled train-step programs; workdir {workdir}')
  return last


# ----------------------------------------------------------------------------------------------- pieces

def _validated(config: Any):
  try:
    model_cfg, train_cfg = stllm.model_config(config.model), step.train_config(config.train)
  except (ValueError, TypeError, KeyError) as err:
    raise UserError(f'bad config: {err}') from None
  if train_cfg.mvm_weight > 0 and not model_cfg.mvm_head:
    raise UserError('train.mvm_weight > 0 needs the MVM head: set model.mvm_head=True (or train.mvm_weight=0)')
  return model_cfg, train_cfg


def preflight(config: Any) -> None:
  """Everything a run needs from disk, checked before any work; all problems in one message."""
  problems = []
  init = config.init.checkpoint
  if init and not os.path.isdir(init):
    problems.append(f'initial weights {init!r} not found. Convert the released weights first, e.g.\n'
                    f'    python -m stllm_jax.convert lavis --vit eva_vit_g.pth '
                    f'--instructblip instruct_blip_vicuna7b_trimmed.pth --llm vicuna-7b-v1.1/ '
                    f'--qformer-tokenizer bert-base-uncased/ --out {init}\n'
                    f'  (README "Weights"), or set --config.init.checkpoint="" to start from random weights')
  if not uses_random_data(config):
    problems.extend(data_problems(config.data))
  if problems:
    raise UserError('cannot start training:\n  - ' + '\n  - '.join(problems))


def uses_random_data(config: Any) -> bool:
  return config.data.get('source') == 'random'


def data_problems(data_config: Any) -> list[str]:
  """Missing annotation files, media roots and tokenizer directories of `config.data`."""
  try:
    cfg = pipeline.parse_config(data_config)
  except (DataError, ValueError, TypeError) as err:
    return [str(err)]
  problems = []
  for spec in cfg.datasets:
    for what, path, is_there in (('annotation', spec.annotation, os.path.isfile),
                                 ('media_root', spec.media_root, os.path.isdir)):
      if not is_there(path):
        problems.append(f'data.datasets.{spec.name}.{what} {path!r} not found')
  for what in ('llm_tokenizer', 'qformer_tokenizer'):
    path = getattr(cfg, what)
    if not path or not os.path.isdir(path):
      problems.append(f'data.{what} {path!r} is not a tokenizer directory')
  if problems:
    problems.append('see README "Data" for the VideoChat2 instruction data layout and where tokenizers come from '
                    '(`python -m stllm_jax.convert` copies them next to the converted weights)')
  return problems


def make_data(config: Any, model_cfg: Any, train_cfg: Any):
  """The training batch iterator for this host: numpy batches of batch_size / process_count samples."""
  if uses_random_data(config):
    return RandomBatches(config.data, model_cfg, train_cfg.batch_size, jax.process_index(), jax.process_count())
  if train_cfg.batch_size % jax.process_count():
    raise UserError(f'train.batch_size={train_cfg.batch_size} is not a multiple of the {jax.process_count()} hosts')
  cfg = dataclasses.replace(pipeline.parse_config(config.data), batch_size=train_cfg.batch_size // jax.process_count(),
                            image_size=model_cfg.vision.image_size)
  return pipeline.TrainIterator(cfg, jax.process_index(), jax.process_count())


def _logger():
  return (lambda message: tqdm.write(message, file=sys.stderr)) if jax.process_index() == 0 else (lambda message: None)


def _count(tree: Any) -> int:
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def _all_finite(tree: Any):
  return jax.jit(lambda t: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(t)])))(tree)


class _StepRecord(NamedTuple):
  metrics: dict  # device arrays, fetched once per logging window
  mask_rate: float
  kept_tokens: int
  local_batch: int
  num_frames: int
  text_len: int


def _summarise(window: list[_StepRecord], seconds: float, process_count: int) -> dict:
  """Averages of the window's device metrics (one transfer), plus rates over all hosts."""
  device_metrics = jax.device_get([r.metrics for r in window])
  mean = lambda key: float(np.mean([m[key] for m in device_metrics]))
  tokens = sum(r.local_batch * (r.kept_tokens + r.text_len) for r in window) * process_count
  frames = sum(r.local_batch * r.num_frames for r in window) * process_count
  return {'loss': mean('loss'), 'lm_loss': mean('lm_loss'), 'mvm_loss': mean('mvm_loss'),
          'grad_norm': mean('grad_norm'), 'lr': float(device_metrics[-1]['lr']),
          'mask_rate': float(np.mean([r.mask_rate for r in window])), 'kept_tokens': window[-1].kept_tokens,
          'nonfinite_steps': int(sum(not bool(m['finite']) for m in device_metrics)),
          'step_time_s': seconds / len(window), 'tokens_per_s': tokens / seconds, 'frames_per_s': frames / seconds}


def _count_nonfinite(window: list[_StepRecord], in_a_row: int) -> int:
  for finite in jax.device_get([r.metrics['finite'] for r in window]):
    in_a_row = 0 if finite else in_a_row + 1
  return in_a_row


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, but a --config.X override that names no field of the config is one message, not
  the bare AttributeError / KeyError that ml_collections raises."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as error:
    while error.args and isinstance(error.args[0], BaseException):  # AttributeError(KeyError(message))
      error = error.args[0]
    field, _, hint = str(error.args[0] if error.args else error).partition('\n')
    field = field.strip('\'"')
    overrides = [arg.split('=')[0] for arg in argv[1:] if arg.startswith('--config.')]
    named = [arg for arg in overrides if field in arg.split('.')[1:]] or overrides or ['a --config override']
    exit_with(UserError(f'{named[0]}: the config has no field {field!r}{" (" + hint + ")" if hint else ""}. '
                        'Flags of the command itself (--workdir, --distributed) take no "config." prefix'))


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
