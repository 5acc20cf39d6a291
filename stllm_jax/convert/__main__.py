"""`python -m stllm_jax.convert ...`: see `stllm_jax.convert.cli`."""

from stllm_jax.convert import cli

if __name__ == '__main__':
  cli.main()
