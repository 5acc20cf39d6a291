"""How the tests run JAX, in this process and in the programs they start.

XLA's CPU backend compiles with LLVM at optimisation level 0 (`--xla_backend_optimization_level=0`) and with its
classic loop emitters instead of the newer MLIR fusion emitters (`--xla_cpu_use_fusion_emitters=false`): the
tiny programs of the tests compile in about a third of the time (a 3-beam generation program on the converted
tiny InstructBLIP: 1.9 s -> 0.6 s) and run slower, which they can afford. XLA's own (HLO) passes are the same as
at the default settings, so every test computes what a user's run computes up to float rounding; the parity tests
compare against Hugging Face under this setting.
"""

from __future__ import annotations

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_COMPILE = '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false'


def xla_flags(device_count: int | None = None) -> str:
  """XLA_FLAGS for a test process: fast compilation, and `device_count` simulated CPU devices if given."""
  return ' '.join([FAST_COMPILE] + ([f'--xla_force_host_platform_device_count={device_count}'] if device_count else []))


def subprocess_env(device_count: int | None = None, **extra: str) -> dict[str, str]:
  """The environment of a program a test starts: this one's (the session's compilation cache included), on the
  CPU, importing this checkout, with xla_flags(device_count)."""
  return dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT, XLA_FLAGS=xla_flags(device_count), **extra)
