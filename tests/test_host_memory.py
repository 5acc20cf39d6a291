"""Host memory on CPUs: freed blocks reused by the next execution instead of mapped and faulted in again."""

import json
import os
import subprocess
import sys

import jax
import pytest

from stllm_jax import host_memory

# A fresh process: a jitted step with a 64 MiB temporary (the product of a [4096, 8] and an [8, 4096] matrix, read
# by two reductions), which XLA:CPU allocates and frees in every call; minor page faults per call, once warm.
FAULTS_PER_CALL = r'''
import json, resource
import jax, jax.numpy as jnp
from stllm_jax import host_memory
applied = host_memory.keep_freed_memory()
a, b = jnp.ones((4096, 8)), jnp.ones((8, 4096))
step = jax.jit(lambda a, b: ((a @ b).sum(), (a @ b).max()))
assert step.lower(a, b).compile().memory_analysis().temp_size_in_bytes == 4096 * 4096 * 4
for _ in range(12):
  jax.block_until_ready(step(a, b))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
  jax.block_until_ready(step(a, b))
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
print(json.dumps({'applied': applied, 'described': host_memory.describe(), 'faults': faults}))
'''
PAGES = 4096 * 4096 * 4 // 4096

needs_glibc = pytest.mark.skipif(not host_memory.uses_glibc(), reason='glibc only (Linux)')


def faults_per_call(**env) -> dict:
  out = subprocess.run([sys.executable, '-c', FAULTS_PER_CALL], capture_output=True, text=True, check=True,
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu', **env},
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return json.loads(out.stdout.strip().splitlines()[-1])


@needs_glibc
def test_freed_temporary_is_reused_without_page_faults():
  kept = faults_per_call(STLLM_JAX_SYSTEM_MALLOC='')
  assert kept['applied'] and kept['described'] == 'kept'
  assert kept['faults'] < 0.25 * PAGES, kept  # measured: 0-1,640 (16,386 with glibc's defaults)


@needs_glibc
def test_opting_out_leaves_malloc_as_it_is():
  system = faults_per_call(STLLM_JAX_SYSTEM_MALLOC='1')
  assert not system['applied'] and system['described'] == 'system'
  assert system['faults'] > 0.5 * PAGES, system  # glibc maps the temporary afresh for every call


def test_only_when_jax_can_run_on_the_cpu_alone():
  previous = jax.config.jax_platforms
  try:
    jax.config.update('jax_platforms', 'cuda,cpu')  # an accelerator first: malloc left alone
    assert not host_memory.cpu_only() and not host_memory.keep_freed_memory()
    jax.config.update('jax_platforms', 'cpu')
    assert host_memory.cpu_only()
  finally:
    jax.config.update('jax_platforms', previous)
