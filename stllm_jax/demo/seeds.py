"""The demo's tables over several seeds: the mean and the range of each number.

    python -m stllm_jax.demo --workdir runs/demo_seed1 --config.seed=1     # one finished demo per seed
    python -m stllm_jax.demo.seeds runs/demo runs/demo_seed1 runs/demo_seed2 [--out runs/demo_seeds.json]

Each workdir's demo_results.json (written by `run.run`) must come from the same demo (data, frame counts,
models) with another seed; a model missing from some of them (the ablation run on only some seeds) is
shown over the seeds that have it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Mapping, Sequence

import numpy as np

from stllm_jax.demo import run as demo_run
from stllm_jax.errors import UserError, exit_with

SAME_DEMO_KEYS = ('data', 'train_frames', 'test_frames')  # what seeds of one demo share
TIMINGS = ('seconds',)  # in `data`: how long writing the set took, when that run wrote it


def read_results(workdir: str) -> dict:
  path = os.path.join(workdir, demo_run.RESULTS_JSON)
  if not os.path.isfile(path):
    raise UserError(f'{path} does not exist: run the demo into {workdir} first (python -m stllm_jax.demo '
                    f'--workdir {workdir} --config.seed=N)')
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def across_seeds(results: Sequence[Mapping[str, Any]]) -> dict:
  """{'seeds', 'train_frames', 'test_frames', 'runs': [{name, title, seeds, claim1: {column: stats},
  by_frames: {frames: {'all': stats, 'direction': stats}}}]} with stats = {'mean', 'min', 'max', 'n'}
  (fractions); runs in the order of the first results that have them."""
  if not results:
    raise UserError('give at least one demo workdir')
  seeds = [r['seed'] for r in results]
  if len(set(seeds)) != len(seeds):
    raise UserError(f'the workdirs repeat a seed ({seeds}): give one workdir per seed')
  for key in SAME_DEMO_KEYS:
    if any(_identity(r[key]) != _identity(results[0][key]) for r in results[1:]):
      raise UserError(f'the workdirs come from different demos ({key} differs): compare seeds of one demo only')
  names = []
  for r in results:
    names += [run['name'] for run in r['runs'] if run['name'] not in names]
  train_key = str(results[0]['train_frames'])
  runs = []
  for name in names:
    found = [(r['seed'], run) for r in results for run in r['runs'] if run['name'] == name]
    accuracy = lambda frames, kind: _stats([run['accuracy'][str(frames)][kind] for _, run in found])
    claim1 = {'direction': accuracy(train_key, 'direction'),
              'both twins right': _stats([run['twins_told_apart'] for _, run in found]),
              'shape': accuracy(train_key, 'shape'), 'colour': accuracy(train_key, 'colour')}
    by_frames = {str(t): {kind: accuracy(t, kind) for kind in ('all', 'direction')} for t in results[0]['test_frames']}
    runs.append(dict(name=name, title=found[0][1]['title'], seeds=[seed for seed, _ in found], claim1=claim1,
                     by_frames=by_frames))
  return dict(seeds=seeds, train_frames=results[0]['train_frames'], test_frames=results[0]['test_frames'],
              runs=runs)


def _identity(value: Any) -> Any:
  return {k: v for k, v in value.items() if k not in TIMINGS} if isinstance(value, dict) else value


def _stats(values: Sequence[float]) -> dict:
  values = np.asarray(values, np.float64)
  return dict(mean=float(values.mean()), min=float(values.min()), max=float(values.max()), n=int(values.size))


def cell(stats: Mapping[str, float]) -> str:
  """'90.6 (87.5-93.8)': the mean and the range in %; a single value alone."""
  mean = f'{100 * stats["mean"]:.1f}'
  return mean if stats['n'] == 1 else f'{mean} ({100 * stats["min"]:.1f}-{100 * stats["max"]:.1f})'


def seed_tables(summary: Mapping[str, Any]) -> str:
  """The demo's two tables as markdown, each number the mean (min-max) over the seeds."""
  def seeds_of(run):
    return '' if run['seeds'] == summary['seeds'] else f' (seeds {", ".join(map(str, run["seeds"]))})'
  lines = [f'Claim 1, accuracy % at {summary["train_frames"]} test frames (= training): mean (min-max) over seeds '
           f'{", ".join(map(str, summary["seeds"]))}', '',
           '| model | direction | both twins right | shape | colour |', '|---|---|---|---|---|']
  for run in summary['runs']:
    lines.append(f'| {run["title"]}{seeds_of(run)} | ' + ' | '.join(cell(s) for s in run['claim1'].values()) + ' |')
  frames = summary['test_frames']
  lines += ['', 'Claim 2, accuracy % (all questions / direction) by test frames: mean (min-max)', '',
            '| model | ' + ' | '.join(map(str, frames)) + ' |', '|---|' + '---|' * len(frames)]
  for run in summary['runs']:
    cells = [f'{cell(run["by_frames"][str(t)]["all"])} / {cell(run["by_frames"][str(t)]["direction"])}' for t in frames]
    lines.append(f'| {run["title"]}{seeds_of(run)} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(prog='python -m stllm_jax.demo.seeds', description=__doc__.split('\n\n')[0])
  parser.add_argument('workdirs', nargs='+', help='finished demo workdirs, one per seed')
  parser.add_argument('--out', help='also write the summary as JSON here')
  args = parser.parse_args(argv)
  try:
    summary = across_seeds([read_results(w) for w in args.workdirs])
  except UserError as error:
    exit_with(error)
  print(seed_tables(summary))
  if args.out:
    with open(args.out, 'w', encoding='utf-8') as f:
      json.dump(dict(summary, workdirs=list(args.workdirs)), f, indent=1)
    print(f'written: {args.out}')
  return summary


if __name__ == '__main__':
  main(sys.argv[1:])
