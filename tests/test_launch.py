"""Launch scripts: usage errors, the restart loop, and the commands they hand to srun and gcloud
(tests/test_multiprocess.py runs slurm.sh and tpu_pod.sh for real, with 2 processes)."""

import os
import stat
import subprocess
import sys

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
  fake(tmp_path, 'srun', f'echo "$JAX_LOCAL_DEVICE_IDS $@" > {log}\n')
  assert run('slurm.sh', ['configs/stllm_7b.py', '/shared/run'], tmp_path, SLURM_GPUS_ON_NODE='4').returncode == 0
  command = log.read_text()
  assert 'python -m stllm_jax.train --distributed --config configs/stllm_7b.py --workdir /shared/run' in command
  assert command.startswith('0,1,2,3 ')  # every GPU of the node to its one process (not jax's SLURM_LOCALID only)

  fake(tmp_path, 'gcloud', f'echo "$@" > {log}\n')
  result = run('tpu_pod.sh', ['configs/stllm_7b.py', '/mnt/run', '--config.mesh=fsdp=64'], tmp_path,
               TPU_NAME='pod', ZONE='us-east5-a')
  assert result.returncode == 0, result.stderr
  command = log.read_text()
  assert '--worker=all' in command and 'pod' in command
  assert 'python -m stllm_jax.train --distributed --config configs/stllm_7b.py --workdir /mnt/run' in command
  assert '--config.mesh=fsdp=64' in command


def test_distributed_without_a_launcher_says_what_to_set(tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'JAX_COORDINATOR', 'JAX_NUM_PROCESSES',
                                                                    'JAX_PROCESS_ID'))}
  result = subprocess.run([sys.executable, '-m', 'stllm_jax.train', '--distributed', '--config', 'configs/tiny.py',
                           f'--workdir={tmp_path}'], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(env, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT))
  assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr[-2000:]
  assert 'set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID' in result.stderr
