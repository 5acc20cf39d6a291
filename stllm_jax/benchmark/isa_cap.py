"""Both frameworks limited to AVX2 on a host that has AVX-512: `benchmark train --cpu-isa avx2`.

Each library picks its vector instructions at run time and has its own switch:
- XLA's generated code (elementwise fusions, transposes): `--xla_cpu_max_isa=AVX2` in XLA_FLAGS, read when the CPU
  backend starts.
- YNNPACK, which runs XLA:CPU's matmuls: no switch. It asks cpuinfo once and keeps the answer in the static
  `ynn::get_supported_arch_flags()::flags`; `cap_ynnpack` finds that variable through jaxlib's symbol table and
  clears every bit above FMA3 before the first program is compiled, so each kernel chosen afterwards is an AVX2 one.
  Without it the "AVX2 setting" left the matmuls on AVX-512 (BENCHMARK.md, issue 20).
- PyTorch: ATEN_CPU_CAPABILITY (ATen's kernels), MKL_ENABLE_INSTRUCTIONS (MKL's GEMMs), ONEDNN_MAX_CPU_ISA (oneDNN),
  read when torch is imported or first calls them.

Only x86-64 Linux (the symbol table is ELF's, the load address comes from /proc/self/maps).
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import mmap
import os
import platform
import struct
import sys

import numpy as np

from stllm_jax.errors import UserError

CHOICES = ('host', 'avx2')
FLAGS_FUNCTION = '_ZN3ynn24get_supported_arch_flagsEv'  # ynn::get_supported_arch_flags()
FLAGS_VARIABLE = '_ZZN3ynn24get_supported_arch_flagsEvE5flags'  # its static `flags`
# YNNPACK's x86 arch_flag bits (ynnpack/base/arch.h): sse2, ssse3, sse41, avx, f16c, avx2, fma3 are bits 0-6;
# every later bit is an AVX-512 or AMX extension.
AVX2_BITS = (1 << 7) - 1
_AVX_BIT, _AVX2_BIT = 1 << 3, 1 << 5
TORCH_AVX2_ENV = {'ATEN_CPU_CAPABILITY': 'avx2', 'MKL_ENABLE_INSTRUCTIONS': 'AVX2', 'ONEDNN_MAX_CPU_ISA': 'AVX2'}
XLA_AVX2_FLAG = '--xla_cpu_max_isa=AVX2'

_SHT_SYMTAB, _STT_OBJECT, _STT_FUNC = 2, 1, 2
_ELF64_SYM = np.dtype([('name', '<u4'), ('info', 'u1'), ('other', 'u1'), ('section', '<u2'), ('value', '<u8'),
                       ('size', '<u8')])


def apply(choice: str) -> None:
  """Limits XLA, YNNPACK and PyTorch to `choice` ('host': nothing changes). Call before JAX compiles anything and
  before torch is imported."""
  if choice not in CHOICES:
    raise UserError(f"--cpu-isa {choice!r}: choose among {', '.join(CHOICES)}")
  if choice == 'host':
    return
  if not _x86_64_linux():
    raise UserError(f'--cpu-isa {choice}: only on x86-64 Linux (this is {sys.platform} {platform.machine()})')
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized():
    raise UserError(f'--cpu-isa {choice}: JAX has already started its CPU backend; XLA_FLAGS would not apply')
  if 'torch' in sys.modules:
    raise UserError(f'--cpu-isa {choice}: torch is already imported; its ISA variables would not apply')
  cap_ynnpack(AVX2_BITS)  # first: it is what can fail (another jaxlib), and then nothing else has changed
  xla_flags = [f for f in os.environ.get('XLA_FLAGS', '').split() if not f.startswith('--xla_cpu_max_isa=')]
  os.environ['XLA_FLAGS'] = ' '.join(xla_flags + [XLA_AVX2_FLAG])
  os.environ.update(TORCH_AVX2_ENV)


def cap_ynnpack(keep_bits: int) -> int:
  """Clears YNNPACK's arch flags outside `keep_bits`; returns the flags it keeps."""
  function, variable = _ynnpack_flags()
  cell = ctypes.c_uint64.from_address(variable)
  cell.value = function() & keep_bits
  return function()


def ynnpack_isa() -> str | None:
  """The widest x86 ISA YNNPACK's kernels may use ('AVX-512', 'AVX2', 'AVX', 'SSE'); None where it can't be read
  (another jaxlib, another OS or CPU)."""
  if not _x86_64_linux():
    return None
  try:
    function, _ = _ynnpack_flags()
  except UserError:
    return None
  flags = function()
  if flags & ~AVX2_BITS:
    return 'AVX-512'
  return 'AVX2' if flags & _AVX2_BIT else 'AVX' if flags & _AVX_BIT else 'SSE'


def _x86_64_linux() -> bool:
  return platform.machine() in ('x86_64', 'AMD64') and sys.platform.startswith('linux')


@functools.lru_cache(maxsize=None)
def _ynnpack_flags() -> tuple[ctypes._CFuncPtr, int]:
  """YNNPACK's flags function (callable) and the address of its static flags, in the loaded jaxlib."""
  importlib.import_module('jax')  # maps jaxlib's shared libraries into this process
  import jaxlib  # pylint: disable=g-import-not-at-top
  jaxlib_dir = os.path.dirname(os.path.realpath(jaxlib.__file__))
  for path, base in _loaded_libraries(jaxlib_dir):
    symbols = elf_symbols(path, (FLAGS_FUNCTION, FLAGS_VARIABLE))
    if len(symbols) == 2:
      (function, function_type), (variable, variable_type) = symbols[FLAGS_FUNCTION], symbols[FLAGS_VARIABLE]
      if function_type != _STT_FUNC or variable_type != _STT_OBJECT:
        break
      return ctypes.CFUNCTYPE(ctypes.c_uint64)(base + function), base + variable
  raise UserError(f'YNNPACK\'s arch flags are not in the symbol table of the jaxlib in {jaxlib_dir}: '
                  'this jaxlib cannot be limited to AVX2 (the pinned one can)')


def _loaded_libraries(directory: str) -> list[tuple[str, int]]:
  """(path, load address) of each shared library under `directory` mapped into this process."""
  found = {}
  with open('/proc/self/maps') as maps:
    for line in maps:
      fields = line.split()
      if len(fields) >= 6 and fields[5].startswith(directory + os.sep) and int(fields[2], 16) == 0:
        found.setdefault(fields[5], int(fields[0].split('-')[0], 16))
  return sorted(found.items(), key=lambda item: -os.path.getsize(item[0]))  # the largest (libjax_common) first


def elf_symbols(path: str, names: tuple[str, ...]) -> dict[str, tuple[int, int]]:
  """{name: (value, type)} for those of `names` in the .symtab of a 64-bit little-endian ELF file (values are
  offsets from the load address for a shared library whose first segment starts at 0)."""
  with open(path, 'rb') as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
    if data[:4] != b'\x7fELF' or data[4] != 2 or data[5] != 1:
      raise UserError(f'{path} is not a 64-bit little-endian ELF file')
    shoff, = struct.unpack_from('<Q', data, 0x28)
    shentsize, shnum = struct.unpack_from('<HH', data, 0x3A)
    sections = [struct.unpack_from('<IIQQQQIIQQ', data, shoff + i * shentsize) for i in range(shnum)]
    symtab = next((s for s in sections if s[1] == _SHT_SYMTAB), None)
    if symtab is None:
      return {}
    strtab = sections[symtab[6]]  # the section symtab's link field names
    strings = data[strtab[4]:strtab[4] + strtab[5]]  # its offset and size
    wanted = {}  # offset of a name in the string table -> name (a name may also end a longer string)
    for name in names:
      needle, start = name.encode() + b'\0', 0
      while (at := strings.find(needle, start)) >= 0:
        wanted[at] = name
        start = at + 1
    first, size = symtab[4], symtab[5]
    table = np.frombuffer(data, _ELF64_SYM, count=size // _ELF64_SYM.itemsize, offset=first)
    rows = np.flatnonzero(np.isin(table['name'], np.fromiter(wanted, np.uint32)))
    found = {}
    for row in rows:  # the first symbol of each name
      found.setdefault(wanted[int(table['name'][row])], (int(table['value'][row]), int(table['info'][row]) & 0xF))
    del table  # the mmap closes only once no array views it
    return found
