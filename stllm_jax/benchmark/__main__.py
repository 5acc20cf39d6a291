from stllm_jax.benchmark.cli import main

if __name__ == '__main__':
  main()
