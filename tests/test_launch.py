"""Launch scripts: usage errors, the restart loop, and the commands they hand to srun and gcloud."""

import os
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake(bin_dir, name, body):
  path = bin_dir / name
  path.write_text('#!/usr/bin/env bash\n' + body)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


def run(script, args, bin_dir, **env):
  return subprocess.run(['bash', os.path.join(ROOT, 'launch', script), *args], capture_output=True, text=True,
                        env=dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', **env), timeout=60)


@pytest.mark.parametrize('script', ['gpu_node.sh', 'slurm.sh', 'tpu_pod.sh'])
def test_missing_arguments_print_usage(script, tmp_path):
  result = run(script, [], tmp_path)
  assert result.returncode == 2 and 'usage:' in result.stderr


def test_gpu_node_restarts_after_a_crash_and_not_after_a_config_error(tmp_path):
  log = tmp_path / 'calls'
  # python fails once (a crash), then succeeds
  fake(tmp_path, 'python', f'echo "$@" >> {log}\n[ $(wc -l < {log}) -ge 2 ] && exit 0 || exit 1\n')
  result = run('gpu_node.sh', ['configs/tiny.py', 'runs/x', '--config.train.steps=3'], tmp_path)
  assert result.returncode == 0, result.stderr
  calls = log.read_text().splitlines()
  assert calls == ['-m stllm_jax.train --config configs/tiny.py --workdir runs/x --config.train.steps=3'] * 2
  assert 'resuming' in result.stderr

  log.unlink()
  fake(tmp_path, 'python', f'echo "$@" >> {log}\nexit 2\n')
  result = run('gpu_node.sh', ['configs/tiny.py', 'runs/x'], tmp_path)
  assert result.returncode == 2 and len(log.read_text().splitlines()) == 1


def test_slurm_and_tpu_scripts_start_distributed_training(tmp_path):
  log = tmp_path / 'calls'
  fake(tmp_path, 'srun', f'echo "$@" > {log}\n')
  assert run('slurm.sh', ['configs/stllm_7b.py', '/shared/run'], tmp_path).returncode == 0
  assert 'python -m stllm_jax.train --distributed --config configs/stllm_7b.py --workdir /shared/run' in log.read_text()

  fake(tmp_path, 'gcloud', f'echo "$@" > {log}\n')
  result = run('tpu_pod.sh', ['configs/stllm_7b.py', '/mnt/run', '--config.mesh=fsdp=64'], tmp_path,
               TPU_NAME='pod', ZONE='us-east5-a')
  assert result.returncode == 0, result.stderr
  command = log.read_text()
  assert '--worker=all' in command and 'pod' in command
  assert 'python -m stllm_jax.train --distributed --config configs/stllm_7b.py --workdir /mnt/run' in command
  assert '--config.mesh=fsdp=64' in command


def test_train_accepts_the_distributed_flag():
  from stllm_jax import train  # pylint: disable=g-import-not-at-top
  assert 'distributed' in train.FLAGS
