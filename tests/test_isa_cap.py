"""isa_cap: `benchmark --cpu-isa avx2` limits XLA's code, YNNPACK (XLA:CPU's matmuls) and PyTorch to AVX2; the
ELF symbol lookup that finds YNNPACK's flags; its one-line errors."""

import json
import os
import platform
import subprocess
import sys

import jax
import pytest

import jax_env

from stllm_jax.benchmark import devices, isa_cap
from stllm_jax.errors import UserError

TINY = os.path.join(jax_env.ROOT, 'configs', 'tiny.py')
X86_LINUX = platform.machine() == 'x86_64' and sys.platform.startswith('linux')
needs_x86_linux = pytest.mark.skipif(not X86_LINUX, reason='YNNPACK flags are read on x86-64 Linux only')


def jaxlib_library() -> str:
  import jaxlib  # pylint: disable=g-import-not-at-top
  return os.path.join(os.path.dirname(jaxlib.__file__), 'libjax_common.so')


@needs_x86_linux
def test_the_symbol_table_holds_ynnpacks_flags_function_and_variable():
  symbols = isa_cap.elf_symbols(jaxlib_library(), (isa_cap.FLAGS_FUNCTION, isa_cap.FLAGS_VARIABLE, 'no_such_symbol'))
  assert set(symbols) == {isa_cap.FLAGS_FUNCTION, isa_cap.FLAGS_VARIABLE}
  (function, function_type), (variable, variable_type) = symbols[isa_cap.FLAGS_FUNCTION], symbols[isa_cap.FLAGS_VARIABLE]
  assert (function_type, variable_type) == (2, 1)  # STT_FUNC, STT_OBJECT
  assert function > 0 and variable > 0 and function != variable


def test_a_file_that_is_not_elf_is_one_line(tmp_path):
  path = tmp_path / 'notes.txt'
  path.write_text('not a library\n')
  with pytest.raises(UserError, match='is not a 64-bit little-endian ELF file'):
    isa_cap.elf_symbols(str(path), (isa_cap.FLAGS_FUNCTION,))


@needs_x86_linux
def test_ynnpack_reports_the_hosts_isa_when_nothing_limits_it():
  host = devices.cpu_isa()['host']
  if host not in ('AVX-512', 'AVX2'):
    pytest.skip(f'host ISA {host}')
  assert isa_cap.ynnpack_isa() == host


def test_bad_choices_and_a_started_backend_are_refused_before_anything_changes(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_enable_fast_math=false')
  with pytest.raises(UserError, match="--cpu-isa 'avx512': choose among host, avx2"):
    isa_cap.apply('avx512')
  jax.devices()  # the backend is running in this process
  if X86_LINUX:
    with pytest.raises(UserError, match='JAX has already started its CPU backend'):
      isa_cap.apply('avx2')
  isa_cap.apply('host')  # nothing to do
  assert os.environ['XLA_FLAGS'] == '--xla_cpu_enable_fast_math=false'
  assert 'ATEN_CPU_CAPABILITY' not in os.environ or os.environ['ATEN_CPU_CAPABILITY'] != 'avx2'


@needs_x86_linux
def test_a_jaxlib_without_ynnpacks_symbols_is_refused_before_any_switch_is_set(monkeypatch):
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(xla_bridge, 'backends_are_initialized', lambda: False)  # as in a fresh process
  monkeypatch.delitem(sys.modules, 'torch', raising=False)
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_enable_fast_math=false')
  for name in isa_cap.TORCH_AVX2_ENV:
    monkeypatch.delenv(name, raising=False)

  def no_symbols():
    raise UserError("YNNPACK's arch flags are not in the symbol table of the jaxlib in /somewhere")

  monkeypatch.setattr(isa_cap, '_ynnpack_flags', no_symbols)
  with pytest.raises(UserError, match='not in the symbol table'):
    isa_cap.apply('avx2')
  assert os.environ['XLA_FLAGS'] == '--xla_cpu_enable_fast_math=false'
  assert not any(name in os.environ for name in isa_cap.TORCH_AVX2_ENV)


@needs_x86_linux
def test_cpu_isa_avx2_limits_every_library_in_the_benchmarks_process(tmp_path):
  """A fresh process (XLA and torch read their switches once): XLA's code, YNNPACK's matmul kernels and PyTorch all
  report AVX2, in the JSON and in the table's device line."""
  host = devices.cpu_isa()['host']
  if host not in ('AVX-512', 'AVX2'):
    pytest.skip(f'host ISA {host}')
  out = tmp_path / 'result.json'
  completed = subprocess.run(
      [sys.executable, '-m', 'stllm_jax.benchmark', 'generate', '--config', TINY, '--frames', '2', '--new-tokens', '4',
       '--repeats', '1', '--against', 'torch', '--cpu-isa', 'avx2', '--config.mesh=fsdp=1', '--out', str(out)],
      env=jax_env.subprocess_env(), capture_output=True, text=True, timeout=600, check=False)
  assert completed.returncode == 0, completed.stderr[-3000:]
  with open(out) as f:
    isa = json.load(f)['device']['cpu_isa']
  assert isa == {'host': host, 'xla': 'AVX2', 'ynnpack': 'AVX2', 'torch': 'AVX2'}
  expected = 'AVX2' if host == 'AVX2' else 'AVX-512 host, XLA AVX2, YNNPACK AVX2, PyTorch AVX2'
  assert expected in completed.stdout
