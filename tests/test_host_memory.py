"""Host memory on CPUs: freed blocks reused by the next execution instead of mapped and faulted in again."""

import json
import os
import subprocess
import sys

import jax
import pytest

from stllm_jax import host_memory
from stllm_jax.errors import UserError

# A fresh process: a jitted step with a ROWS x 16 KiB temporary (the product of a [ROWS, 8] and an [8, 4096] matrix,
# read by two reductions), which XLA:CPU allocates and frees in every call; minor page faults per call, once warm.
FAULTS_PER_CALL = r'''
import json, os, resource, sys
import jax, jax.numpy as jnp
from stllm_jax import host_memory
applied = host_memory.set_up_malloc(sys.argv[1])
a, b = jnp.ones((int(sys.argv[2]), 8)), jnp.ones((8, 4096))
step = jax.jit(lambda a, b: ((a @ b).sum(), (a @ b).max()))
assert step.lower(a, b).compile().memory_analysis().temp_size_in_bytes == a.shape[0] * 4096 * 4
for _ in range(12):
  jax.block_until_ready(step(a, b))
calls = []
for _ in range(10):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  jax.block_until_ready(step(a, b))
  calls.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({'applied': applied, 'described': host_memory.describe(), 'faults': sum(calls) / 10,
                  'calls': calls}))
'''

needs_glibc = pytest.mark.skipif(not host_memory.uses_glibc(), reason='glibc only (Linux)')


def faults_per_call(mode: str, mib: int, **env) -> dict:
  """Minor page faults per call of a step with a `mib` MiB temporary, with malloc set up as `mode`, as a share of
  the temporary's 4 KiB pages."""
  out = subprocess.run([sys.executable, '-c', FAULTS_PER_CALL, mode, str(mib * 64)], capture_output=True, text=True,
                       check=True, env={**os.environ, 'JAX_PLATFORMS': 'cpu', **env},
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  result = json.loads(out.stdout.strip().splitlines()[-1])
  return {**result, 'faulted': result['faults'] / (mib * 256)}


@needs_glibc
@pytest.mark.parametrize('mode, faulted', [('kept', False), ('system', True)])
def test_a_freed_temporary_is_reused_without_page_faults_when_kept(mode, faulted):
  result = faults_per_call(mode, 64, STLLM_JAX_SYSTEM_MALLOC='')
  assert result['applied'] == (mode == 'kept') and result['described'] == mode
  # measured: kept 0 faults per call, glibc's defaults 16,386 (the temporary's 16,384 pages mapped afresh)
  assert (result['faulted'] > 0.9) if faulted else (result['faulted'] < 0.25), result


@needs_glibc
def test_opting_out_leaves_malloc_as_it_is():
  result = faults_per_call('kept', 64, STLLM_JAX_SYSTEM_MALLOC='1')
  assert not result['applied'] and result['described'] == 'system'
  assert result['faulted'] > 0.9, result  # glibc maps the temporary afresh for every call


def test_an_unknown_mode_is_named_with_the_known_ones():
  with pytest.raises(UserError, match="host_malloc 'fast' is not a malloc mode: choose among system, kept$"):
    host_memory.set_up_malloc('fast')


def test_only_when_jax_can_run_on_the_cpu_alone():
  previous = jax.config.jax_platforms
  try:
    jax.config.update('jax_platforms', 'cuda,cpu')  # an accelerator first: malloc left alone
    assert not host_memory.cpu_only() and not host_memory.set_up_malloc('kept')
    jax.config.update('jax_platforms', 'cpu')
    assert host_memory.cpu_only()
  finally:
    jax.config.update('jax_platforms', previous)
