"""Where a train step's time goes: `python -m stllm_jax.benchmark profile --config configs/bench_small.py`.

Times a few steps untraced, then traces as many with `jax.profiler` (a Perfetto trace, kept under `--trace-dir`
for ui.perfetto.dev or TensorBoard) and sums the trace's XLA operations by kind: `ynn_fusion.12` and
`ynn_fusion.40` are one kind. Per step it reports each kind's thread time (summed over threads, so it can exceed
the step), how many ran, and two wall times read from the union of the operations' intervals: the program's
(any XLA operation running) and the matmuls' (the operations whose kind names a matmul library or a dot,
`MATMUL_MARKERS`). On a CPU the matmuls' share of the program's wall time says how far a faster step can come
from anything but faster GEMMs (BENCHMARK.md, GitHub issue 20).

Random batches and one fixed mask rate, as `benchmark train --mask-rate`; MVM as the config says
(`--config.train.mvm_weight=0` for the A/B's setting). Checked on XLA:CPU, whose trace names each operation after
its HLO instruction; a GPU trace names kernels (cuBLAS's and cuDNN's among them) that need not match
`XLA_OP_NAME`, so there the table may leave kernels out (not yet run on a GPU).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import statistics
import time
from typing import Any, Iterable

import jax

from stllm_jax.benchmark import devices, report, train_bench
from stllm_jax.data.random_batches import RandomBatches
from stllm_jax.errors import UserError

# An XLA operation's event is named after its HLO instruction: lower case, '_' and '-', numbered copies '.N'.
# Python frames ('$file.py:12 f'), runtime spans ('ThunkExecutor::Execute') and markers ('end: x') are not.
XLA_OP_NAME = re.compile(r'^[a-z][a-z0-9_\-]*(\.\d+)*$')
MATMUL_MARKERS = ('dot', 'gemm', 'matmul', 'ynn_fusion', 'xnn_fusion', 'onednn', 'convolution', 'cublas', 'cutlass')


def op_kind(name: str) -> str:
  """'ynn_fusion.12' -> 'ynn_fusion'; 'copy_bitcast_fusion' unchanged."""
  return re.sub(r'(\.\d+)+$', '', name)


def is_matmul(kind: str) -> bool:
  return any(marker in kind for marker in MATMUL_MARKERS)


def union_length(intervals: Iterable[tuple[float, float]]) -> float:
  """Total length covered by [start, end) intervals, overlaps counted once."""
  total, current = 0.0, None
  for start, end in sorted(intervals):
    if current is None or start > current[1]:
      if current is not None:
        total += current[1] - current[0]
      current = [start, end]
    else:
      current[1] = max(current[1], end)
  return total + (current[1] - current[0] if current is not None else 0.0)


def summarise_events(events: Iterable[dict[str, Any]], steps: int, top: int) -> dict[str, Any]:
  """Chrome-trace complete events ('ph' X, 'ts' / 'dur' in microseconds) -> per-step times by operation kind."""
  ops = [e for e in events if e.get('ph') == 'X' and XLA_OP_NAME.match(e.get('name', ''))]
  if not ops:
    raise UserError('the trace holds no XLA operations: this JAX build records none on this device')
  kinds = [op_kind(event['name']) for event in ops]
  intervals = [(float(e['ts']), float(e['ts']) + float(e.get('dur', 0))) for e in ops]
  thread_us, count = collections.Counter(), collections.Counter()
  for kind, (start, end) in zip(kinds, intervals):
    thread_us[kind] += end - start
    count[kind] += 1
  total_us = sum(thread_us.values())
  ms_per_step = lambda us: us / 1000.0 / steps
  execution_ms = ms_per_step(union_length(intervals))
  matmul_ms = ms_per_step(union_length(span for kind, span in zip(kinds, intervals) if is_matmul(kind)))
  return {
      'op_thread_ms_per_step': ms_per_step(total_us),
      'execution_wall_ms_per_step': execution_ms,
      'matmul_wall_ms_per_step': matmul_ms,
      'matmul_share_of_execution': matmul_ms / execution_ms if execution_ms else None,
      'kinds': len(thread_us),
      'top_ops': [{'kind': kind, 'thread_ms_per_step': ms_per_step(us), 'count_per_step': count[kind] / steps,
                   'share': us / total_us, 'matmul': is_matmul(kind)} for kind, us in thread_us.most_common(top)],
  }


def read_trace(trace_dir: str) -> list[dict[str, Any]]:
  """The events of the Perfetto trace `jax.profiler.trace(..., create_perfetto_trace=True)` wrote."""
  files = sorted(glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True), key=os.path.getmtime)
  if not files:
    raise UserError(f'jax.profiler wrote no trace under {trace_dir}')
  with gzip.open(files[-1], 'rt') as f:
    trace = json.load(f)
  return trace['traceEvents'] if isinstance(trace, dict) else trace


def run(config: Any, *, steps: int, warmup: int, mask_rate: float, top: int, trace_dir: str) -> dict[str, Any]:
  """`warmup` steps (the first compiles), `steps` untraced and `steps` traced, all on the same program."""
  config = config.copy_and_resolve_references()
  trainer = train_bench.build_jax_trainer(config)
  model_cfg, train_cfg = trainer.model_cfg, trainer.train_cfg
  data = RandomBatches(config.data, model_cfg, train_cfg.batch_size)
  batches = [next(data) for _ in range(warmup + 2 * steps)]
  num_visual = model_cfg.num_visual_tokens(batches[0]['frames'].shape[1])
  plan = train_bench.mask_plan(0, config.seed, num_visual, train_cfg.masking, mask_rate)

  def timed(batch) -> float:
    began = time.perf_counter()
    trainer(batch, plan)
    return time.perf_counter() - began

  for batch in batches[:warmup]:
    timed(batch)
  untraced = [timed(batch) for batch in batches[warmup:warmup + steps]]
  os.makedirs(trace_dir, exist_ok=True)
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    traced = [timed(batch) for batch in batches[warmup + steps:]]
  summary = summarise_events(read_trace(trace_dir), steps, top)
  return {'command': 'profile', 'device': devices.describe(),
          'setup': {'batch_size': train_cfg.batch_size, 'num_frames': batches[0]['frames'].shape[1],
                    'text_len': batches[0]['input_ids'].shape[1], 'mask_rate': plan.rho, 'n_keep': plan.n_keep,
                    'n_slots': plan.n_slots, 'mvm': train_cfg.mvm_weight > 0, 'warmup': warmup, 'steps': steps},
          'untraced_step_s': untraced, 'traced_step_s': traced, 'trace_dir': trace_dir, **summary}


def table(result: dict[str, Any]) -> str:
  ms = lambda seconds: report.ms(statistics.median(seconds))
  execution, matmul = result['execution_wall_ms_per_step'], result['matmul_wall_ms_per_step']
  rows = [('device', f"{result['device']['device_kind']} x{result['device']['device_count']} "
                     f"({devices.describe_host(result['device'])})"),
          ('setup', ', '.join(f'{k}={v}' for k, v in result['setup'].items())),
          ('step median, untraced / traced', f"{ms(result['untraced_step_s'])} / {ms(result['traced_step_s'])}"),
          ('XLA program wall time per step (any operation running)', f'{execution:,.1f} ms'),
          ('matmuls\' wall time per step', f"{matmul:,.1f} ms ({100 * (result['matmul_share_of_execution'] or 0):.1f}% "
                                           f"of the program), the rest {execution - matmul:,.1f} ms"),
          ('operations\' thread time per step (all threads)', f"{result['op_thread_ms_per_step']:,.1f} ms in "
                                                             f"{result['kinds']} kinds")]
  header = ('operation kind', 'thread ms / step', 'share', 'count / step', 'matmul')
  ops = [(op['kind'], f"{op['thread_ms_per_step']:,.1f}", f"{100 * op['share']:.1f}%", f"{op['count_per_step']:g}",
          'yes' if op['matmul'] else '') for op in result['top_ops']]
  return (report.markdown_table(rows) + '\n\n' + report.markdown_columns(header, ops) +
          f"\n\ntrace: {result['trace_dir']} (ui.perfetto.dev or TensorBoard's profile plugin)")
