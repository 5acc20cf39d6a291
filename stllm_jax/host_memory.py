"""Host memory on CPUs: freed blocks kept in the heap for the next step, not returned to the kernel.

XLA:CPU allocates each execution's temporaries and outputs afresh and frees them when it ends (bench_small's train
step: 410 MiB of temporaries). glibc's malloc serves blocks that large with mmap and gives them back with munmap,
so every step writes to pages the kernel has to map and zero again: one page fault per 4 KiB page, 105,800 per
bench_small step, 13% of the step on a 2-core AMD EPYC (BENCHMARK.md). With one malloc arena, no mmap and
the top of the heap trimmed only beyond 2 GiB, freed blocks stay in the heap and the next execution reuses them.

The price: the process keeps its peak heap (as a caching allocator does), so the command-line entry points
(train, the demo, benchmark, evaluate, chat, serve) do this only when JAX can run on nothing but the CPU;
STLLM_JAX_SYSTEM_MALLOC=1 leaves malloc as it is.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform
import sys

# mallopt parameters, from glibc's malloc.h
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
KEEP_FREED = ((M_ARENA_MAX, 1),  # every thread allocates from the main heap: other arenas map large blocks anyway
              (M_MMAP_MAX, 0),  # no block is served by mmap
              (M_TRIM_THRESHOLD, 2**31 - 1))  # the heap's top is returned only beyond 2 GiB free (mallopt takes an int)
OPT_OUT = 'STLLM_JAX_SYSTEM_MALLOC'
_applied = False


def keep_freed_memory() -> bool:
  """Makes malloc keep freed memory for reuse when JAX can only run on the CPU (`cpu_only`) and the C library is
  glibc, unless STLLM_JAX_SYSTEM_MALLOC is set to a non-empty value other than 0. True if it did.

  Call it before JAX starts its backends: threads that already allocated keep their own arenas, which map large
  blocks whatever the settings."""
  global _applied
  if not cpu_only() or os.environ.get(OPT_OUT, '') not in ('', '0') or not uses_glibc():
    return False
  libc = ctypes.CDLL(None)
  _applied = all(libc.mallopt(param, value) == 1 for param, value in KEEP_FREED) or _applied
  return _applied


def cpu_only() -> bool:
  """Whether JAX's backend will be the CPU, decided without starting it: JAX_PLATFORMS (or jax_platforms) puts the
  CPU first, or neither is set and no accelerator plugin (jax_plugins entry points or namespace, libtpu) is
  installed."""
  import jax  # pylint: disable=g-import-not-at-top  (the benchmark's command line starts without it)
  platforms = jax.config.jax_platforms or os.environ.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms.split(',')[0].strip().lower() == 'cpu'
  return not (importlib.metadata.entry_points(group='jax_plugins') or importlib.util.find_spec('jax_plugins')
              or importlib.util.find_spec('libtpu'))


def uses_glibc() -> bool:
  return sys.platform.startswith('linux') and platform.libc_ver()[0] == 'glibc'


def describe() -> str:
  """What benchmarks report: 'kept' when keep_freed_memory applied in this process, else 'system'."""
  return 'kept' if _applied else 'system'
