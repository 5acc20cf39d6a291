"""`python -m stllm_jax.train ARGS` run in the test's own process: absl's flag parsing, the config file and its
--config.X overrides, the command's one-line errors and exit status, as the program runs them, without the
seconds a new Python process spends importing JAX.

A subprocess is still the way for what needs a process of its own: a signal (SIGKILL, Ctrl-C), other simulated
devices or `--distributed`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import sys

import jax
from absl import flags
from absl import logging as absl_logging

from stllm_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_JAX_SETTINGS = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs')


@contextlib.contextmanager
def jax_cache_settings_kept():
  """The compilation cache's jax settings as they were before the block (the command sets its own)."""
  settings = {name: getattr(jax.config, name) for name in _JAX_SETTINGS}
  try:
    yield
  finally:
    for name, value in settings.items():
      jax.config.update(name, value)


def _forget_flag_values() -> None:
  """The flags as before a parse: values unparsed, and the --config.X flags that ml_collections defined for this
  command line's overrides removed (the next command line defines its own)."""
  flags.FLAGS.unparse_flags()
  for name in [name for name in flags.FLAGS if name.startswith('config.')]:
    delattr(flags.FLAGS, name)


@dataclasses.dataclass(frozen=True)
class Finished:
  returncode: int
  stdout: str
  stderr: str


def run_train(*args: str) -> Finished:
  """`python -m stllm_jax.train *args` from the repository root: its exit status and what it printed. What the
  command sets for its process (the cache's jax settings, the log level and filter, the unraisable-exception hook)
  is put back afterwards, so that the tests after it run as before."""
  argv = ['stllm_jax.train', *args]
  saved_argv, saved_cwd, saved_hook = sys.argv, os.getcwd(), sys.unraisablehook
  saved_filters, saved_verbosity = list(logging.getLogger('absl').filters), absl_logging.get_verbosity()
  out, err = io.StringIO(), io.StringIO()
  returncode = 0
  try:
    sys.argv = argv  # ml_collections reads the --config.X overrides from sys.argv
    os.chdir(ROOT)
    with jax_cache_settings_kept(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      train.main(train.parse_flags(argv))
  except SystemExit as exit_:
    returncode = exit_.code if isinstance(exit_.code, int) else 1
  finally:
    sys.argv, sys.unraisablehook = saved_argv, saved_hook
    logging.getLogger('absl').filters[:] = saved_filters
    absl_logging.set_verbosity(saved_verbosity)
    os.chdir(saved_cwd)
    _forget_flag_values()
  return Finished(returncode, out.getvalue(), err.getvalue())
