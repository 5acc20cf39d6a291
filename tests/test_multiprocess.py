"""Multi-process training and loading for real, on this machine: 2 processes x 4 CPU devices, one mesh over all 8.

The training processes are started by the launch scripts themselves (launch/tpu_pod.sh, launch/slurm.sh) with
stand-ins for `gcloud` and `srun` on PATH that start the processes here, with the environment the real tools
give them: the scripts' commands, arguments and exit statuses, jax's SLURM detection (coordinator address from
the node list and job id, process ids from SLURM_PROCID) and `train --distributed` all run as on a cluster.
One single-process 8-device run of the same config is the reference: a 2-process run reads the same samples
(each process its own rows) and gives the same losses and params to float tolerance, through a SIGKILL of both
processes and a resume.
"""

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import convert_layouts as layouts
import jax_env
from command_helpers import run_train
from stllm_jax import checkpoints
from stllm_jax.convert import cli
from stllm_jax.data.random_batches import RandomBatches
from stllm_jax.metrics import read_jsonl
from stllm_jax.models import stllm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'configs', 'tiny.py')
PYTHON_DIR = os.path.dirname(sys.executable)  # not resolved: a virtual environment's bin/ is the point
STEPS = 6
TRAIN_ARGS = [f'--config.train.steps={STEPS}', '--config.train.checkpoint_every=3', '--config.train.log_every=1',
              '--config.train.masking.keep_buckets=(0.7,)', '--config.data.text_buckets=(16,)',
              '--config.mesh=fsdp=4,tensor=2']  # masking and the MVM loss on (configs/tiny.py); one program
SECTION = 'multi-process (2 processes x 4 CPU devices, one mesh of 8)'

# gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command CMD: CMD on every host of the slice, here
# TPU_WORKERS local processes started in HOSTS_HOME (where the repository is checked out as stllm_jax/), each in
# a session of its own (a host: SIGKILL to its process group ends everything on it), pids in WORKER_PIDS. A real
# slice's hosts find the coordinator and their ids in the TPU metadata; here they get jax's generic variables.
GCLOUD = '''
while [ $# -gt 0 ]; do [ "$1" = --command ] && command=$2; shift; done
for ((worker = 0; worker < TPU_WORKERS; worker++)); do
  (cd "$HOSTS_HOME" && JAX_COORDINATOR_ADDRESS=localhost:$COORDINATOR_PORT JAX_NUM_PROCESSES=$TPU_WORKERS \\
     JAX_PROCESS_ID=$worker exec setsid bash -c "$command") &
  echo $! >> "$WORKER_PIDS"
done
status=0
for pid in $(jobs -p); do wait "$pid" || status=$?; done
exit $status
'''

# srun [OPTIONS] COMMAND: COMMAND once per task of the job (SLURM_NTASKS, one per node; all nodes are this machine
# here), each with the variables srun sets for a task; the status is the last failing task's (0 if none fails).
SRUN = '''
while [[ $1 == -* ]]; do shift; done
for ((task = 0; task < SLURM_NTASKS; task++)); do
  SLURM_PROCID=$task SLURM_LOCALID=0 SLURM_NODEID=$task SLURM_STEP_ID=0 SLURM_STEP_NODELIST=$SLURM_JOB_NODELIST \\
    SLURM_STEP_NUM_NODES=$SLURM_JOB_NUM_NODES SLURM_STEP_NUM_TASKS=$SLURM_NTASKS "$@" &
done
status=0
for pid in $(jobs -p); do wait "$pid" || status=$?; done
exit $status
'''


def stand_in(bin_dir, name, body):
  path = bin_dir / name
  path.write_text('#!/usr/bin/env bash\n' + body)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


def free_port(low=1024, high=65535):
  for port in np.random.default_rng().permutation(np.arange(low, high + 1))[:200]:
    with socket.socket() as s:
      try:
        s.bind(('localhost', int(port)))
        return int(port)
      except OSError:
        continue
  raise RuntimeError(f'no free port in [{low}, {high}]')


@pytest.fixture(scope='module')
def base_env():
  """CPU only, this checkout importable, the session's compilation cache (conftest); no JAX_* or SLURM_* variable
  of whatever runs the tests. The launch scripts call `python`: PATH starts with this interpreter's directory, so
  they run the Python that runs the tests (its packages), even when its environment is not activated."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'JAX_COORDINATOR', 'JAX_NUM_PROC',
                                                                    'JAX_PROCESS_ID'))}
  path = os.pathsep.join([PYTHON_DIR, env.get('PATH', os.defpath)])
  return dict(env, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT, XLA_FLAGS=jax_env.xla_flags(device_count=4), PATH=path)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """The same training in one process with all 8 devices (this one's, see conftest): its workdir."""
  workdir = tmp_path_factory.mktemp('single') / 'run'
  result = run_train('--config', TINY, f'--workdir={workdir}', *TRAIN_ARGS)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "8 cpu device(s), mesh {'data': 1, 'fsdp': 4, 'tensor': 2}" in result.stderr
  return workdir


def test_each_process_reads_its_own_rows_of_every_global_batch(tiny_config):
  config = tiny_config()
  model_cfg = stllm.model_config(config.model)
  single = RandomBatches(config.data, model_cfg, 8)
  parts = [RandomBatches(config.data, model_cfg, 8, process, 2) for process in range(2)]
  for _ in range(3):
    whole, (first, second) = next(single), [next(part) for part in parts]
    for key in whole:
      assert len(first[key]) == len(second[key]) == 4
      np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), whole[key])
    assert not np.isin(first['frames'][:, 0, 0, 0, 0], second['frames'][:, 0, 0, 0, 0]).any()  # disjoint rows


def saved_state(workdir, at_step):
  """(train state on one device, JSON item) of a checkpoint step, read in this process (whatever topology wrote it)."""
  with ocp.StandardCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(os.path.join(workdir, 'checkpoints', str(at_step), 'state')).item_metadata.tree
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree_util.tree_map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=one_device),
                                    metadata, is_leaf=lambda x: hasattr(x, 'shape'))
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'), item_names=('state', 'extra')) as manager:
    restored = manager.restore(at_step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                extra=ocp.args.JsonRestore()))
  return restored.state, restored.extra


def wait_for(condition, process, what, timeout=600):
  deadline = time.monotonic() + timeout
  while not condition():
    assert process.poll() is None, f'the run ended (status {process.returncode}) before {what}'
    assert time.monotonic() < deadline, f'no {what} after {timeout} s'
    time.sleep(0.1)


def test_two_processes_train_as_one_through_a_sigkill_and_a_resume(tmp_path, base_env, reference, report):
  bin_dir, hosts_home, workdir = tmp_path / 'bin', tmp_path / 'home', tmp_path / 'run'
  bin_dir.mkdir()
  hosts_home.mkdir()
  (hosts_home / 'stllm_jax').symlink_to(ROOT)
  stand_in(bin_dir, 'gcloud', GCLOUD)
  stand_in(bin_dir, 'srun', SRUN)
  env = dict(base_env, PATH=f'{bin_dir}{os.pathsep}{base_env["PATH"]}')

  # 1. A TPU pod slice of 2 hosts; both are killed (SIGKILL) once step 4 is logged and checkpoint 3 is on disk.
  pids = tmp_path / 'worker_pids'
  tpu = subprocess.Popen(['bash', 'launch/tpu_pod.sh', TINY, str(workdir), *TRAIN_ARGS], cwd=ROOT, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         env=dict(env, TPU_NAME='pod', ZONE='us-east5-a', TPU_WORKERS='2', HOSTS_HOME=str(hosts_home),
                                  COORDINATOR_PORT=str(free_port()), WORKER_PIDS=str(pids)))
  try:
    logged = lambda: (workdir / 'metrics.jsonl').exists() and read_jsonl(workdir / 'metrics.jsonl')[-1]['step'] >= 4
    wait_for(lambda: logged() and (workdir / 'checkpoints' / '3').is_dir(), tpu, 'step 4 and checkpoint 3')
  finally:
    for pid in map(int, pids.read_text().split() if pids.exists() else ()):
      with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
  output = tpu.communicate(timeout=60)[0]
  assert tpu.returncode == 128 + signal.SIGKILL, output[-3000:]  # the hosts' status comes through the script
  assert "8 cpu device(s), mesh {'data': 1, 'fsdp': 4, 'tensor': 2}" in output
  killed_at = read_jsonl(workdir / 'metrics.jsonl')[-1]['step']
  assert 4 <= killed_at < STEPS

  # 2. The same run resumed as a SLURM job of 2 nodes; jax derives the coordinator port from the job id.
  port = free_port(61440, 65535)
  slurm = subprocess.run(['bash', 'launch/slurm.sh', TINY, str(workdir), *TRAIN_ARGS], cwd=ROOT, text=True,
                         capture_output=True, timeout=900,
                         env=dict(env, SLURM_JOB_ID=str(4096 * 100 + port - 61440), SLURM_NTASKS='2',
                                  SLURM_JOB_NUM_NODES='2', SLURM_JOB_NODELIST='localhost,127.0.0.1',
                                  SLURM_SUBMIT_DIR=ROOT))
  assert slurm.returncode == 0, slurm.stderr[-3000:]
  assert 'resumed from step 3' in slurm.stderr
  assert f'done: {STEPS} steps' in slurm.stderr

  expected = {r['step']: r['loss'] for r in read_jsonl(reference / 'metrics.jsonl')}
  records = read_jsonl(workdir / 'metrics.jsonl')
  assert [r['step'] for r in records] == list(range(1, killed_at + 1)) + list(range(4, STEPS + 1))
  for record in records:  # before the kill and after the resume: the single-process run's loss at that step
    np.testing.assert_allclose(record['loss'], expected[record['step']], rtol=1e-5, err_msg=f'step {record["step"]}')

  # One checkpoint per step, written by both processes together (each its own shards), that reads back whole.
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['3', '6']
  for at_step in (3, 6):
    state_dir = workdir / 'checkpoints' / str(at_step) / 'state'
    assert sorted(p.name for p in state_dir.glob('ocdbt.process_*')) == ['ocdbt.process_0', 'ocdbt.process_1']
  state, extra = saved_state(workdir, STEPS)
  checkpoints.check_run_digests('the 2-process checkpoint', extra, state)
  assert extra['data'] == {'step': STEPS}
  single_state, _ = saved_state(reference, STEPS)
  relative_error = lambda a, b: float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))
  params_error = max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(relative_error, state['params'],
                                                                      single_state['params'])))
  assert params_error < 1e-5  # reductions across processes add in another order: float noise, not bit equality
  loss_error = max(abs(r['loss'] - expected[r['step']]) / expected[r['step']] for r in records)
  report(SECTION, f'train via tpu_pod.sh (SIGKILL of both after step {killed_at}) + slurm.sh (resumed from step 3) vs '
                  f'one process: losses of {STEPS} steps to {loss_error:.1e}, final params to {params_error:.1e} '
                  '(largest relative error)')


@pytest.fixture(scope='module')
def sharded_weights(tmp_path_factory):
  """A tiny random InstructBLIP (configs/tiny.py's architecture) converted with --mesh fsdp=8."""
  root = str(tmp_path_factory.mktemp('weights'))
  _, model, llm_tokenizer, qformer_tokenizer = layouts.tiny_instructblip(root)
  source = layouts.hf_dir(os.path.join(root, 'hf'), model, 'safetensors', llm_tokenizer, qformer_tokenizer)
  out = os.path.join(root, 'sharded')
  with pytest.raises(SystemExit) as exit_info:
    cli.main(['hf-instructblip', source, '--config', TINY, '--mesh', 'fsdp=8', '--out', out])
  assert exit_info.value.code == 0
  return out


def test_two_processes_read_only_their_own_shards_of_converted_weights(tmp_path, base_env, sharded_weights,
                                                                        report):
  port = free_port()
  processes = [subprocess.Popen([sys.executable, os.path.join(ROOT, 'tests', 'shard_reader.py'), sharded_weights,
                                 'fsdp=8', str(tmp_path)], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE,
                                env=dict(base_env, JAX_COORDINATOR_ADDRESS=f'localhost:{port}', JAX_NUM_PROCESSES='2',
                                         JAX_PROCESS_ID=str(process)))
               for process in range(2)]
  outputs = [process.communicate(timeout=600) for process in processes]
  for process, (out, err) in zip(processes, outputs):
    assert process.returncode == 0, err[-3000:]
  measured = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]

  stored = flax.traverse_util.flatten_dict(checkpoints.load_stored_params(sharded_weights), sep='/')
  array_bytes = sum(np.asarray(v).nbytes for v in stored.values())
  shards = [dict(np.load(tmp_path / f'process_{process}.npz')) for process in range(2)]
  lines = []
  for process, (own, reads) in enumerate(zip(shards, measured)):
    for key, shard in own.items():  # each shard is the stored array's slice
      path, index = key.split('|')
      slices = tuple(slice(*(int(x) if x else None for x in part.split(':'))) for part in index.split(','))
      np.testing.assert_array_equal(shard, np.asarray(stored[path])[slices], err_msg=key)
    own_bytes = sum(shard.nbytes for shard in own.values())
    # it skips most of what belongs to the other process (reading everything would not)
    assert reads['sharded_bytes_read'] < reads['whole_bytes_read'] - (array_bytes - own_bytes) / 2, reads
    lines.append(f'process {process}: read {reads["sharded_bytes_read"]:,d} bytes for its shards ({own_bytes:,d} '
                 f'bytes of arrays) vs {reads["whole_bytes_read"]:,d} for all {array_bytes:,d} bytes of arrays')
  embedding = 'llm/embed/embedding'  # [vocab, 64]: its 64 columns over fsdp=8, 32 per process
  columns = [sorted(key.split('|')[1].split(',')[1] for key in own if key.startswith(f'{embedding}|'))
             for own in shards]
  assert columns == [sorted(['0:8', '8:16', '16:24', '24:32']), sorted(['32:40', '40:48', '48:56', '56:64'])]
  for line in lines:
    print(line)
    report(SECTION, f'sharded load (convert --mesh fsdp=8): {line}')
