"""Host memory on CPUs: how malloc treats the blocks XLA:CPU frees after each step (`config.host_malloc`).

XLA:CPU allocates each execution's temporaries and outputs afresh and frees them when it ends (bench_small's train
step: 410 MiB of temporaries). glibc's malloc serves blocks that large with mmap and gives them back with munmap,
so every step writes to pages the kernel has to map and zero again: one page fault per 4 KiB page, 105,800 per
bench_small step. 'kept' keeps them: one arena for every thread (another thread's arena maps any block over
64 MiB whatever the settings, and XLA allocates a step's temporaries on its own threads), no mmap, the heap's
top trimmed only beyond 2 GiB. Measured on a 2-core AMD EPYC (BENCHMARK.md): bench_small's step 13% faster,
0 faults; but the demo's runs 21% longer (its small steps are many small allocations from several threads at
once, which queue for the one arena's lock). Keeping freed blocks with an arena per thread instead made no
difference to the demo that the host's noise did not hide. So 'system' (glibc's defaults) is the default, and
configs/bench_small.py says 'kept'.

The price of keeping: the process keeps its peak heap (as a caching allocator does). `train`, the demo and
`benchmark train / generate` set malloc up as their config says, only when JAX can run on nothing but the CPU;
STLLM_JAX_SYSTEM_MALLOC=1 leaves malloc as it is whatever the config says.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform
import sys

from stllm_jax.errors import UserError

# mallopt parameters, from glibc's malloc.h
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
MODES = {'system': (),
         'kept': ((M_ARENA_MAX, 1),  # every thread allocates from the main heap
                  (M_MMAP_MAX, 0),  # no block is served by mmap
                  (M_TRIM_THRESHOLD, 2**31 - 1))}  # the heap's top returned only beyond 2 GiB free (an int)
DEFAULT_MODE = 'system'
OPT_OUT = 'STLLM_JAX_SYSTEM_MALLOC'
_applied = 'system'


def set_up_malloc(mode: str = DEFAULT_MODE) -> bool:
  """Sets malloc up as `mode` (one of MODES) when JAX can only run on the CPU (`cpu_only`) and the C library is
  glibc, unless STLLM_JAX_SYSTEM_MALLOC is set to a non-empty value other than 0. True if it keeps freed memory.

  Call it before JAX starts its backends: threads that already allocated keep their own arenas."""
  global _applied
  if mode not in MODES:
    raise UserError(f'host_malloc {mode!r} is not a malloc mode: choose among {", ".join(MODES)}')
  if mode == 'system' or not cpu_only() or os.environ.get(OPT_OUT, '') not in ('', '0') or not uses_glibc():
    return False
  libc = ctypes.CDLL(None)
  if all(libc.mallopt(param, value) == 1 for param, value in MODES[mode]):
    _applied = mode
  return _applied != 'system'


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
  """What benchmarks report: the mode set_up_malloc applied in this process ('system' if none)."""
  return _applied
