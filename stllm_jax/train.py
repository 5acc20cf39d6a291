"""Train ST-LLM.

    python -m stllm_jax.train --config configs/X.py [--workdir DIR] [--config.train.lr=1e-5 ...]

A batch goes: data iterator (host, numpy) -> `sharding.shard_batch` (split over the mesh's data axes)
-> `step.train_step` (jitted once per visual-token bucket x text-length bucket) -> metrics. Checkpoints
(`checkpoints.RunCheckpoints`) hold the train state and the data iterator's state; a rerun of the same
command resumes from the latest one. SIGTERM saves a checkpoint and exits (status 143).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import math
import os
import signal
import sys
import tempfile
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from stllm_jax import checkpoints, host_memory, loading, masking, sharding, step
from stllm_jax import params as params_lib
from stllm_jax.data import pipeline
from stllm_jax.data.errors import DataError
from stllm_jax.data.random_batches import RandomBatches
from stllm_jax.errors import UserError, exit_with, quiet_background_write_failures
from stllm_jax.metrics import MetricsWriter, progress_bar
from stllm_jax.models import stllm

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/tiny.py', lock_config=True)
flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, metrics); default runs/<config name>')
flags.DEFINE_bool('distributed', False, 'One process of a multi-process job (set by launch/ scripts): connect to '
                  'the others with jax.distributed (see initialize_distributed)')

def main(argv):
  del argv
  command(train_command)


def train_command(config: Any, workdir: str) -> dict:
  """`train`, except for the demo's config (its towers, data and evaluation belong to `python -m stllm_jax.demo`)."""
  if 'demo' in config:
    raise UserError("this is the built-in demo's config: run it with python -m stllm_jax.demo "
                    '(--config FILE for another demo config; the same --workdir and --config.X flags)')
  return train(config, workdir)


def command(run: Callable[[Any, str], Any]) -> None:
  """What `train` and the demo (`python -m stllm_jax.demo`) share: quiet logs, the compilation cache, the config
  flag, freed host memory kept for reuse on CPUs (`config.host_malloc`), `--distributed`, the workdir (default
  runs/<config name>); then `run(config, workdir)`. A mistake the user can fix ends in one line."""
  logging.set_verbosity(logging.WARNING)  # orbax narrates every save at INFO
  quiet_background_write_failures()
  enable_compilation_cache()
  try:
    config = load_config_flag()
    host_memory.set_up_malloc(config.get('host_malloc', host_memory.DEFAULT_MODE))  # before JAX starts
    if FLAGS.distributed:
      initialize_distributed()
    workdir = FLAGS.workdir or os.path.join('runs', os.path.splitext(os.path.basename(
        config_flags.get_config_filename(FLAGS['config'])))[0])
    run(config, workdir)
  except (UserError, DataError) as error:
    exit_with(error)


def load_config_flag() -> Any:
  """FLAGS.config, with one message for a missing or broken config file (ml_collections defers its error)."""
  filename = config_flags.get_config_filename(FLAGS['config'])
  if not filename:
    raise UserError('give a config: python -m stllm_jax.train --config configs/tiny.py')
  if not os.path.isfile(filename):
    raise UserError(f'config file {filename!r} does not exist (configs live in configs/, e.g. configs/tiny.py)')
  try:
    return FLAGS.config
  except Exception as error:  # an exception inside the file's get_config()  # pylint: disable=broad-except
    cause = error.__cause__ or error
    raise UserError(f'config file {filename!r} cannot be loaded: {type(cause).__name__}: '
                    f'{str(cause).strip().splitlines()[-1] if str(cause).strip() else ""}') from None


def initialize_distributed() -> None:
  """Connects this process to the others of its job. Any launcher: JAX_COORDINATOR_ADDRESS (host:port of process
  0), JAX_NUM_PROCESSES and JAX_PROCESS_ID in each process's environment. Unset, jax finds them itself on SLURM,
  Cloud TPU, Open MPI and Kubernetes."""
  count, index = os.environ.get('JAX_NUM_PROCESSES'), os.environ.get('JAX_PROCESS_ID')
  try:
    jax.distributed.initialize(num_processes=int(count) if count else None, process_id=int(index) if index else None)
  except ValueError as error:  # nothing to connect to: no coordinator address given or detected
    raise UserError(f'--distributed: {error} (set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, '
                    'or start the processes with srun or on a Cloud TPU pod)') from None


def enable_compilation_cache() -> None:
  """Compiled train steps are kept on disk (JAX_COMPILATION_CACHE_DIR, default ~/.cache/stllm_jax/xla; programs
  that compile in at least JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS, default 1 s), so a rerun or a resumed run
  does not compile its programs again."""
  cache = os.environ.get('JAX_COMPILATION_CACHE_DIR', os.path.expanduser('~/.cache/stllm_jax/xla'))
  jax.config.update('jax_compilation_cache_dir', cache)
  jax.config.update('jax_persistent_cache_min_compile_time_secs',
                    float(os.environ.get('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', 1.0)))


def train(config: Any, workdir: str) -> dict:
  """Runs (or resumes) training; returns the last logged metrics."""
  run = setup(config, workdir)
  if run.start >= run.total_steps:
    run.close()
    run.log(f'{workdir} is trained already ({run.start} of {run.total_steps} steps); nothing to do')
    return {}
  return summarise(run, loop(run))


@dataclasses.dataclass
class Run:
  """A run ready for its loop: what `setup` builds from the config and the workdir."""
  config: Any
  workdir: str
  train_cfg: step.TrainConfig
  mesh: Any
  data: pipeline.BatchIterator
  checkpoints: checkpoints.RunCheckpoints
  state: Any  # the trainable params' train state (newest intact checkpoint, if any); donated to the first step
  frozen: Any
  frozen_sums: dict  # frozen param -> checksum, saved with each checkpoint (a resume checks them)
  train_step: Callable  # jitted: (state, frozen, batch, n_keep, n_slots) -> (state, metrics)
  num_visual_tokens: Callable[[int], int]  # frames per video -> visual tokens
  start: int  # the step the state is at
  total_steps: int
  log: Callable[[str], None]

  def close(self, raise_errors: bool = True) -> None:
    """Closes the checkpoints (waiting for a pending save) and the data (its worker processes): both, whatever the
    first raises. raise_errors=False while another error is stopping the run: that error is the one reported."""
    errors = []
    for close in (self.checkpoints.close, self.data.close):
      try:
        close()
      except Exception as error:  # pylint: disable=broad-except
        errors.append(error)
    if errors and raise_errors:
      raise errors[0]


class LoopEnd(NamedTuple):
  last: dict  # the last logged metrics
  done: int  # steps done when the loop ended
  signal: int | None  # the signal that stopped it, if one did
  skips: str  # skipped samples by reason over the run ('' for generated data)


def setup(config: Any, workdir: str) -> Run:
  """Checks the config and the disk, builds mesh, data, params and optimizer, resumes from the newest intact
  checkpoint and jits the train step."""
  model_cfg, train_cfg = validated(config)
  preflight(config)
  check_workdir(workdir)
  mesh = sharding.make_mesh(config.mesh)
  data = make_data(config, model_cfg, train_cfg)
  total_steps = train_cfg.steps or math.ceil(train_cfg.epochs * data.batches_per_epoch)
  log = _logger()
  log(f'{jax.device_count()} {jax.devices()[0].platform} device(s), mesh {dict(mesh.shape)}; '
      f'{total_steps} steps of {train_cfg.batch_size} samples ({train_cfg.grad_accum_steps} micro-batches)')

  shardings = sharding.param_shardings(stllm.abstract_variables(model_cfg), mesh)
  params = loading.initial_params(config, model_cfg, shardings, log)
  trainable, frozen = params_lib.split_params(params, train_cfg.frozen)
  del params
  log(f'trainable {_count(trainable):,d} params, frozen {_count(frozen):,d}')
  _, tx = schedule_and_optimizer(train_cfg, total_steps)
  state = step.init_state(trainable, tx, config.seed, params_lib.split_params(shardings, train_cfg.frozen)[0], mesh)

  run = checkpoints.RunCheckpoints(workdir, train_cfg.checkpoints_to_keep)
  frozen_sums = checkpoints.checksums(frozen)
  state = resume(run, state, data, frozen_sums, workdir, log)
  state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
  train_step = jitted_train_step(model_cfg, train_cfg, total_steps, sharding.cache_key(state_shardings))
  return Run(config=config, workdir=workdir, train_cfg=train_cfg, mesh=mesh, data=data, checkpoints=run,
             state=state, frozen=frozen, frozen_sums=frozen_sums, train_step=train_step,
             num_visual_tokens=model_cfg.num_visual_tokens, start=int(state.step), total_steps=total_steps, log=log)


@functools.lru_cache(maxsize=4)
def schedule_and_optimizer(train_cfg: step.TrainConfig, total_steps: int) -> tuple[Callable, Any]:
  """The run's learning-rate schedule and optimizer: one pair per (training config, run length), shared by the
  state's initialisation and the jitted step."""
  schedule = step.make_schedule(train_cfg, total_steps)
  return schedule, step.make_optimizer(train_cfg, schedule)


@functools.lru_cache(maxsize=4)
def jitted_train_step(model_cfg: stllm.STLLMConfig, train_cfg: step.TrainConfig, total_steps: int,
                      state_shardings_key: Any) -> Callable:
  """The train step of a run, jitted once per (model, training config, run length, state shardings) and process, so
  that a second run of the same config in one process (a resume after a fault, a notebook, the tests) traces and
  compiles nothing again. The state keeps its shardings from step to step: each bucket compiles exactly once."""
  schedule, tx = schedule_and_optimizer(train_cfg, total_steps)
  return jax.jit(functools.partial(step.train_step, model=stllm.STLLM(model_cfg), cfg=train_cfg, tx=tx,
                                   schedule=schedule),
                 static_argnames='n_slots', donate_argnames='state',
                 out_shardings=(sharding.from_cache_key(state_shardings_key), None))


def loop(run: Run) -> LoopEnd:
  """Steps from `run.start` to the end, or until SIGTERM / Ctrl-C; logs metrics every `log_every` steps and saves
  every `checkpoint_every` (a pending save is always completed). Stops with a UserError on too many rejected steps
  or a failed save."""
  cfg, data, state = run.train_cfg, run.data, run.state
  writer = MetricsWriter(run.workdir)
  stop = {'signal': None}
  previous_handlers = _stop_on_signals(stop)
  saver = _Saver(run, StepGuard(cfg.max_nonfinite_in_a_row))
  progress = progress_bar(total=run.total_steps, initial=run.start, desc='train', unit='step',
                          disable=jax.process_index() != 0)
  window, last, done = [], {}, run.start
  skips = SkipReporter(data, run.log)
  window_start = time.perf_counter()
  try:
    with sharding.activate(run.mesh):
      for current in range(run.start, run.total_steps):
        host_batch = next(data)
        plan = masking.step_mask_plan(current, run.config.seed, run.num_visual_tokens(host_batch['frames'].shape[1]),
                                      cfg.masking)
        batch = sharding.shard_batch({k: host_batch[k] for k in step.MODEL_BATCH_KEYS}, run.mesh)
        state, metrics = run.train_step(state, run.frozen, batch, np.int32(plan.n_keep), n_slots=plan.n_slots)
        done = current + 1
        saver.guard.add(done, metrics, run.checkpoints.directory, saver.step)  # checks the step before (one in flight)
        window.append(_StepRecord(metrics, plan.rho, plan.n_keep, plan.n_slots, *host_batch['frames'].shape[:2],
                                  host_batch['input_ids'].shape[1]))
        progress.update(1)
        if done % cfg.log_every == 0 or done == run.total_steps or stop['signal']:
          jax.block_until_ready(window[-1].metrics)  # the window's steps have run: time them
          last = _summarise(window, time.perf_counter() - window_start, jax.process_count())
          last.update(compiled_steps=step.compiled_programs(run.train_step), **data.metrics())
          writer.write(done, last)
          progress.set_postfix(loss=f'{last["loss"]:.4f}', lr=f'{last["lr"]:.2e}', keep=last['kept_tokens'],
                               **skips.postfix())
          skips.report_new(done)
          window, window_start = [], time.perf_counter()
        if done % cfg.checkpoint_every == 0 or done == run.total_steps or stop['signal']:
          saver.save(done, state)
        if stop['signal']:
          break
    saver.guard.check_all()
  finally:  # a pending checkpoint is always completed, whatever stopped the loop
    progress.close()
    _restore_signals(previous_handlers)
    try:
      saver.wait()
    finally:
      quiet = sys.exc_info()[1] is not None  # an error already stopping the run is the one reported
      try:
        run.close(raise_errors=not quiet)
      finally:
        writer.close(raise_errors=not quiet and sys.exc_info()[1] is None)
  return LoopEnd(last=last, done=done, signal=stop['signal'], skips=skips.summary())


def summarise(run: Run, end: LoopEnd) -> dict:
  """The run's last lines: skipped samples, how it stopped (exit 128 + signal if a signal stopped it), the
  failure-share check over the whole run; returns the last logged metrics."""
  if end.skips:
    run.log(end.skips)
  if end.signal:
    run.log(f'stopped by signal {end.signal} after step {end.done}; checkpoint saved, rerun the same command to resume')
    sys.exit(128 + end.signal)
  data_check = getattr(run.data, 'check_failures', None)
  if data_check:
    data_check(final=True)  # the failure-share limit holds for a run shorter than data.failure_check_after too
  run.log(f'done: {run.total_steps} steps; last loss {end.last.get("loss", float("nan")):.4f}; '
          f'{end.last.get("compiled_steps", 0)} compiled train-step programs; workdir {run.workdir}')
  return end.last


class _Saver:
  """Writes checkpoints of the run: each step in the state is checked (StepGuard) and the params finite before it
  is called good, and the previous (asynchronous) save is waited for first, so that a failure names its own step."""

  def __init__(self, run: Run, guard: StepGuard):
    self.run, self.guard = run, guard
    self.step = run.start or None  # the newest step saved (or restored)

  def save(self, at_step: int, state: Any) -> None:
    self.guard.check_all()
    if not bool(_all_finite(state.params)):
      raise UserError(f'the trainable params hold non-finite values at step {at_step}; no checkpoint written')
    self.wait()
    extra = {'data': self.run.data.get_state(), 'frozen_checksums': self.run.frozen_sums,
             'origin': checkpoints.run_origin(self.run.workdir),
             'config': self.run.config.to_dict() if hasattr(self.run.config, 'to_dict') else dict(self.run.config)}
    try:
      self.run.checkpoints.save(at_step, state, extra)
    except SAVE_ERRORS as error:
      raise _save_failed(at_step, self.run.checkpoints, error) from None
    self.step = at_step

  def wait(self) -> None:
    try:
      self.run.checkpoints.wait()
    except SAVE_ERRORS as error:  # an asynchronous save failed (e.g. the disk filled up)
      raise _save_failed(self.step, self.run.checkpoints, error) from None


def check_workdir(workdir: str) -> None:
  """UserError unless `workdir` is (or can be made) a writable directory."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f'workdir {workdir} is a file, not a directory; choose another --workdir')
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as error:
    raise UserError(f'workdir {workdir} is not writable ({error.strerror}); choose another --workdir') from None


def resume(run: checkpoints.RunCheckpoints, state: Any, data: Any, frozen_sums: dict, workdir: str,
           log: Callable[[str], None]) -> Any:
  """The state of the newest intact checkpoint (the data iterator set to it), or `state` if there is none.
  A damaged step is moved to workdir/damaged_checkpoints/ and the one before is tried."""
  damaged = []
  for saved_step in reversed(run.all_steps()):
    try:
      restored, extra = run.restore(saved_step, state)
    except checkpoints.DamagedCheckpoint as error:
      moved = run.set_aside(saved_step) if jax.process_index() == 0 else ''
      _sync_processes(f'set aside {saved_step}')
      log(f'{error}; moved to {moved}, trying the checkpoint before it')
      damaged.append(saved_step)
      continue
    changed = checkpoints.checksum_mismatches(extra['frozen_checksums'], frozen_sums)
    if changed:
      raise UserError(f'{workdir} was trained from other frozen weights than config.init gives now '
                      f'({len(changed)} params differ, e.g. {changed[0]}); use the same init.checkpoint or a new workdir')
    data.set_state(extra['data'])
    log(f'resumed from step {saved_step} in {run.directory}'
        + (f' (newer damaged steps {damaged} set aside in {run.damaged_directory})' if damaged else ''))
    return restored
  if damaged:
    log(f'no intact checkpoint is left (damaged steps {damaged} set aside in {run.damaged_directory}); '
        'training starts from step 0')
  return state


def _sync_processes(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


# What a failed write surfaces as: OSError, or tensorstore's ValueError / RuntimeError around one (e.g.
# 'RESOURCE_EXHAUSTED: ... No space left on device').
SAVE_ERRORS = (OSError, ValueError, RuntimeError)


def _save_failed(at_step: int | None, run: checkpoints.RunCheckpoints, error: Exception) -> UserError:
  """The message for a checkpoint that could not be written (asynchronous saves fail at the next save or wait,
  so the step named is the one being saved or waited for)."""
  kept = run.latest_step(reload=True)
  where = f'checkpoint step {at_step}' if at_step is not None else 'a checkpoint'
  return UserError(f'could not write {where} to {run.directory} ({_write_problem(error)}); '
                   + (f'the last complete checkpoint is step {kept}; ' if kept is not None else 'no checkpoint was kept; ')
                   + 'free space (or fix the directory) and rerun the same command to resume')


def _write_problem(error: Exception) -> str:
  text = str(error)
  for known in (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT), os.strerror(errno.EROFS),
                os.strerror(errno.EACCES)):
    if known in text:
      return known
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  return f'{type(error).__name__}: {text.strip().splitlines()[0][:200] if text.strip() else ""}'


def _stop_on_signals(stop: dict) -> dict:
  """SIGTERM and Ctrl-C (SIGINT) finish the current step, save a checkpoint and stop (exit 128 + signal);
  a second Ctrl-C interrupts at once."""
  def handler(signum, frame):
    del frame
    stop.update(signal=signum)
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.default_int_handler)
  previous = {}
  for signum in (signal.SIGTERM, signal.SIGINT):
    try:
      previous[signum] = signal.signal(signum, handler)
    except ValueError:  # not the main thread: no signal handling
      pass
  return previous


def _restore_signals(previous: dict) -> None:
  for signum, handler in previous.items():
    signal.signal(signum, handler)


class StepGuard:
  """Counts rejected steps (non-finite or exploding: `accepted` false) in a row, reading each step's flag
  while the next one runs; `max_in_a_row` of them stop the run with a UserError."""

  def __init__(self, max_in_a_row: int):
    self.max_in_a_row = max_in_a_row
    self.in_a_row = 0
    self.rejected = 0
    self._pending: list[tuple[int, dict, str, int | None]] = []

  def add(self, step_number: int, metrics: dict, run_directory: str, last_saved: int | None) -> None:
    self._pending.append((step_number, metrics, run_directory, last_saved))
    while len(self._pending) > 1:
      self._check(*self._pending.pop(0))

  def check_all(self) -> None:
    while self._pending:
      self._check(*self._pending.pop(0))

  def _check(self, step_number: int, metrics: dict, run_directory: str, last_saved: int | None) -> None:
    values = jax.device_get({k: metrics[k] for k in ('accepted', 'finite', 'loss', 'update_norm', 'param_norm')})
    if bool(values['accepted']):
      self.in_a_row = 0
      return
    self.in_a_row += 1
    self.rejected += 1
    if self.in_a_row >= self.max_in_a_row:
      why = ('non-finite loss or gradient' if not bool(values['finite']) else
             f'exploding step: loss {float(values["loss"]):.3g}, update norm {float(values["update_norm"]):.3g} '
             f'for params of norm {float(values["param_norm"]):.3g}')
      kept = (f'the last checkpoint, step {last_saved}, holds only accepted steps ({run_directory})'
              if last_saved is not None else 'no checkpoint was written')
      raise UserError(f'{self.in_a_row} steps in a row were rejected (the last, step {step_number}: {why}); their '
                      f'updates were skipped. Lower train.lr, enable train.grad_clip_norm, or check the data '
                      f'(limits: train.max_nonfinite_in_a_row, train.max_loss, train.max_update_ratio); {kept}')


class SkipReporter:
  """Skipped samples by reason, from the data iterator's cumulative metrics: new skips on each log line,
  all of them at the end."""

  def __init__(self, data: Any, log: Callable[[str], None]):
    self.data, self.log = data, log
    self.reported = self._counts()

  def _counts(self) -> dict[str, int]:
    prefix = 'data/skipped/'
    return {k[len(prefix):]: v for k, v in self.data.metrics().items() if k.startswith(prefix)}

  def postfix(self) -> dict[str, int]:
    total = sum(self._counts().values())
    return {'skipped': total} if total else {}

  def report_new(self, at_step: int) -> None:
    counts = self._counts()
    new = {reason: n - self.reported.get(reason, 0) for reason, n in counts.items() if n > self.reported.get(reason, 0)}
    if new:
      self.log(f'step {at_step}: skipped {sum(new.values())} more samples ({_by_reason(new)}); '
               f'{sum(counts.values())} in all')
    self.reported = counts

  def summary(self) -> str:
    counts = self._counts()
    metrics = self.data.metrics()
    if 'data/attempts' not in metrics:  # generated data: nothing can be skipped
      return ''
    if not sum(counts.values()):
      return f'skipped samples: none of {metrics["data/attempts"]:,d} read' 
    return (f'skipped samples: {sum(counts.values()):,d} of {metrics.get("data/attempts", 0):,d} attempts '
            f'({_by_reason(counts)})')


def _by_reason(counts: dict[str, int]) -> str:
  return ', '.join(f'{reason} {n:,d}' for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]) if n)


# ----------------------------------------------------------------------------------------------- pieces

def validated(config: Any) -> tuple[stllm.STLLMConfig, step.TrainConfig]:
  """(model config, train config), checked as a run needs them (UserError naming what is wrong)."""
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
  """Missing datasets (annotation files, video directories) and tokenizer directories of `config.data`."""
  try:
    cfg = pipeline.parse_config(data_config)
  except (DataError, ValueError, TypeError) as err:
    return [str(err)]
  problems = [problem for problem in map(missing_dataset, cfg.datasets) if problem]
  if problems:
    problems.append('a dataset can be left out with --config.data.datasets.NAME.weight=0')
  for what in ('llm_tokenizer', 'qformer_tokenizer'):
    path = getattr(cfg, what)
    if not path or not os.path.isdir(path):
      problems.append(f'data.{what} {path!r} is not a tokenizer directory')
  if problems:
    problems.append('see README "Data" for the VideoChat2 instruction data layout and where tokenizers come from '
                    '(`python -m stllm_jax.convert` copies them next to the converted weights)')
  return problems


def missing_dataset(spec: pipeline.DatasetSpec) -> str:
  """What of a dataset the run reads is not on disk, and where it goes; '' if nothing (or it is left out)."""
  if spec.weight == 0:
    return ''
  missing = [f'{what} {path}' for what, path, is_there in (('annotation file', spec.annotation, os.path.isfile),
                                                          ('video directory', spec.media_root, os.path.isdir))
             if not is_there(path)]
  return f'dataset {spec.name}: no {" and no ".join(missing)}' if missing else ''


def make_data(config: Any, model_cfg: Any, train_cfg: Any) -> pipeline.BatchIterator:
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


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


class _StepRecord(NamedTuple):
  metrics: dict  # device arrays, fetched once per logging window
  mask_rate: float
  kept_tokens: int
  slots: int  # kept_tokens padded to a bucket
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
          'kept_slots': window[-1].slots,
          'nonfinite_steps': int(sum(not bool(m['finite']) for m in device_metrics)),
          'rejected_steps': int(sum(not bool(m['accepted']) for m in device_metrics)),
          'update_norm': mean('update_norm'),
          'step_time_s': seconds / len(window), 'tokens_per_s': tokens / seconds, 'frames_per_s': frames / seconds}


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
