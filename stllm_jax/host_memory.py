"""Host memory on CPUs: freed blocks kept in the heap for the next step, not returned to the kernel.

XLA:CPU allocates each execution's temporaries and outputs afresh and frees them when it ends (bench_small's train
step: 410 MiB of temporaries). glibc's malloc serves blocks that large with mmap and gives them back with munmap,
so every step writes to pages the kernel has to map and zero again: one page fault per 4 KiB page. Two ways to
keep freed blocks, chosen per config (`config.host_malloc`), because each wins on one kind of step (BENCHMARK.md,
a 2-core AMD EPYC):

- 'kept': no mmap, the heap's top trimmed only beyond 2 GiB, each thread its own arena (glibc's default). The
  demo's small steps run 17% faster than with glibc's defaults (many small allocations from XLA's threads at
  once). A thread other than the main one still maps a block over 64 MiB (its arena's heaps are no larger).
- 'kept_one_arena': the same in one arena for every thread, so no block is ever mapped afresh: bench_small's
  step 13% faster than with the defaults (105,800 page faults a step to none), 10% faster than 'kept'; but the
  threads queue for the arena's lock, which makes the demo's small steps 24% slower than 'kept'.
- 'system': glibc's defaults.

The price of keeping: the process keeps its peak heap (as a caching allocator does), so the command-line entry
points (train, the demo, benchmark, evaluate, chat, serve) do this only when JAX can run on nothing but the CPU;
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
_KEEP = ((M_MMAP_MAX, 0),  # no block is served by mmap (but see 'kept' above)
         (M_TRIM_THRESHOLD, 2**31 - 1))  # the heap's top is returned only beyond 2 GiB free (mallopt takes an int)
MODES = {'system': (),
         'kept': _KEEP,
         'kept_one_arena': ((M_ARENA_MAX, 1),) + _KEEP}  # every thread allocates from the main heap
DEFAULT_MODE = 'kept'
OPT_OUT = 'STLLM_JAX_SYSTEM_MALLOC'
_applied = 'system'


def keep_freed_memory(mode: str = DEFAULT_MODE) -> bool:
  """Sets malloc up as `mode` (one of MODES) when JAX can only run on the CPU (`cpu_only`) and the C library is
  glibc, unless STLLM_JAX_SYSTEM_MALLOC is set to a non-empty value other than 0. True if it kept freed memory.

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
  """What benchmarks report: the mode keep_freed_memory applied in this process ('system' if none)."""
  return _applied
