"""`python -m stllm_jax.demo`: the built-in demo (see `stllm_jax.demo.run`); the flags of `stllm_jax.train`, with
`--config` defaulting to the repository's configs/demo.py."""

import os
import sys

from absl import app

from stllm_jax import train
from stllm_jax.demo import run

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                              'configs', 'demo.py')


def main(argv):
  del argv
  train.command(lambda config, workdir: run.run(config, workdir, train.train))


def with_default_config(argv: list[str]) -> list[str]:
  """argv with `--config DEFAULT_CONFIG` in front when it names no config file."""
  if any(arg == '--config' or arg.startswith('--config=') for arg in argv[1:]):
    return argv
  return [argv[0], f'--config={os.path.relpath(DEFAULT_CONFIG)}', *argv[1:]]


if __name__ == '__main__':
  sys.argv = with_default_config(sys.argv)
  app.run(main, flags_parser=train.parse_flags)
