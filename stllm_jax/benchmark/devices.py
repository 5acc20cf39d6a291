"""What the benchmark knows about the device: its bf16 dense peak (for MFU), its memory bandwidth (for the decode
limit) and its peak memory."""

from __future__ import annotations

import os
import sys
from typing import Any

import jax

from stllm_jax import host_memory
from stllm_jax.benchmark import isa_cap

# bf16 dense peaks in TFLOP/s (vendor data sheets, no sparsity); matched in order on device_kind.
PEAK_BF16_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (('H100', 'PCIE'), 756.0),
    (('H100',), 989.0),
    (('H200',), 989.0),
    (('A100',), 312.0),
    (('TPU V5 LITE',), 197.0),
    (('TPU V5E',), 197.0),
    (('TPU V5P',), 459.0),
    (('TPU V5',), 459.0),
    (('TPU V4',), 275.0),
)


# HBM bandwidth in GB/s (10^9 bytes; vendor data sheets); matched in order on device_kind, e.g.
# 'NVIDIA A100-SXM4-40GB', 'NVIDIA A100 80GB PCIe', 'NVIDIA H100 80GB HBM3' (SXM), 'NVIDIA H100 PCIe', 'NVIDIA H200'.
HBM_BANDWIDTH_GBPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (('A100', '80GB', 'PCIE'), 1935.0),
    (('A100', '80GB'), 2039.0),  # SXM4
    (('A100',), 1555.0),  # 40GB, SXM4 and PCIe
    (('H100', 'PCIE'), 2000.0),
    (('H100', 'NVL'), 3900.0),
    (('H100',), 3350.0),  # SXM5
    (('H200',), 4800.0),
    (('TPU V5 LITE',), 819.0),
    (('TPU V5E',), 819.0),
    (('TPU V5P',), 2765.0),
    (('TPU V5',), 2765.0),
    (('TPU V4',), 1200.0),
)


def _lookup(table: tuple[tuple[tuple[str, ...], float], ...], device_kind: str) -> float | None:
  kind = device_kind.upper()
  for needles, value in table:
    if all(n in kind for n in needles):
      return value
  return None


def peak_tflops(device_kind: str) -> float | None:
  """The bf16 dense peak of a device kind ('NVIDIA H100 80GB HBM3', 'TPU v5 lite', ...), None if unknown (CPU)."""
  return _lookup(PEAK_BF16_TFLOPS, device_kind)


def hbm_bandwidth_gbps(device_kind: str) -> float | None:
  """The memory bandwidth of a device kind in GB/s, None if unknown (CPU)."""
  return _lookup(HBM_BANDWIDTH_GBPS, device_kind)


def describe() -> dict[str, Any]:
  device = jax.devices()[0]
  return {'platform': device.platform, 'device_kind': device.device_kind, 'device_count': jax.device_count(),
          'host_cpu': cpu_model_name(), 'host_cores': len(os.sched_getaffinity(0)), 'cpu_isa': cpu_isa(),
          'host_malloc': host_memory.describe(),
          'peak_bf16_tflops': peak_tflops(device.device_kind),
          'hbm_bandwidth_gbps': hbm_bandwidth_gbps(device.device_kind)}


def _cpuinfo(*fields: str) -> str | None:
  """The value of the first /proc/cpuinfo line that starts with one of `fields`; None without one (or the file)."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith(fields):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return None


def cpu_model_name() -> str:
  return _cpuinfo('model name') or 'unknown'


# Vector instruction sets, widest first: the /proc/cpuinfo flag that names each.
_ISA_FLAGS = (('AVX-512', 'avx512f'), ('AVX2', 'avx2'), ('AVX', 'avx'), ('NEON', 'asimd'), ('SSE4.2', 'sse4_2'))
# XLA's --xla_cpu_max_isa values, as the names above.
_XLA_ISA_NAMES = {'AVX512': 'AVX-512', 'AVX2': 'AVX2', 'AVX': 'AVX', 'SSE4_2': 'SSE4.2', 'NEON': 'NEON'}
_TORCH_ISA_NAMES = {'AVX512': 'AVX-512', 'AVX2': 'AVX2', 'DEFAULT': 'none', 'ZVECTOR': 'ZVECTOR',
                    'SVE256': 'SVE256', 'VSX': 'VSX'}


def cpu_isa() -> dict[str, str]:
  """The host CPU's widest vector instruction set, and the one each library is limited to: XLA's generated code by
  `--xla_cpu_max_isa` in XLA_FLAGS, YNNPACK (XLA's matmuls) by its arch flags (isa_cap.py; where they can be read),
  PyTorch by ATEN_CPU_CAPABILITY (read only if torch is already imported)."""
  flags = set((_cpuinfo('flags', 'Features') or '').split())  # x86 names them flags, Arm Features
  host = next((name for name, flag in _ISA_FLAGS if flag in flags), 'unknown')
  isa = {'host': host, 'xla': host}
  for flag in os.environ.get('XLA_FLAGS', '').split():
    if flag.startswith('--xla_cpu_max_isa='):
      capped = flag.split('=', 1)[1].upper()
      isa['xla'] = _XLA_ISA_NAMES.get(capped, capped)
  ynnpack = isa_cap.ynnpack_isa()
  if ynnpack is not None:
    isa['ynnpack'] = ynnpack
  torch = sys.modules.get('torch')
  if torch is not None:
    capability = torch.backends.cpu.get_cpu_capability()
    isa['torch'] = _TORCH_ISA_NAMES.get(capability, capability)
  return isa


def describe_host(device: dict[str, Any]) -> str:
  """The host part of a report's device line: 'AMD EPYC, 2 cores, AVX-512, freed memory kept'."""
  malloc = ', freed memory kept' if device.get('host_malloc') == 'kept' else ''
  return f"{device['host_cpu']}, {device['host_cores']} cores, {describe_isa(device['cpu_isa'])}{malloc}"


def describe_isa(isa: dict[str, str]) -> str:
  """'AVX-512' when every library uses what the host has; else e.g. 'AVX-512 host, XLA AVX2, YNNPACK AVX2, PyTorch
  AVX2'."""
  used = {name: value for name, value in (('XLA', isa.get('xla')), ('YNNPACK', isa.get('ynnpack')),
                                          ('PyTorch', isa.get('torch'))) if value}
  if all(value == isa['host'] for value in used.values()):
    return isa['host']
  return ', '.join([f"{isa['host']} host"] + [f'{name} {value}' for name, value in used.items()])


def peak_memory_bytes() -> int | None:
  """Peak bytes in use on device 0 since start (GPU/TPU); None where the runtime keeps no statistics (CPU)."""
  stats = jax.devices()[0].memory_stats()
  return int(stats['peak_bytes_in_use']) if stats and 'peak_bytes_in_use' in stats else None


def compiled_memory(compiled: Any) -> dict[str, int] | None:
  """compiled.memory_analysis() as bytes per device: arguments, outputs, aliased, temporaries, code."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  fields = {'argument_bytes': 'argument_size_in_bytes', 'output_bytes': 'output_size_in_bytes',
            'alias_bytes': 'alias_size_in_bytes', 'temp_bytes': 'temp_size_in_bytes',
            'generated_code_bytes': 'generated_code_size_in_bytes'}
  out = {name: int(getattr(analysis, attr, 0) or 0) for name, attr in fields.items()}
  # Donated inputs alias outputs: they are counted once.
  out['total_bytes'] = (out['argument_bytes'] + out['output_bytes'] - out['alias_bytes'] + out['temp_bytes']
                        + out['generated_code_bytes'])
  return out
