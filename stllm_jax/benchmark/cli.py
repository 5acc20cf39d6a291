"""Command line of the benchmark: `python -m stllm_jax.benchmark {train,profile,generate,plan} --config configs/X.py ...`,
`python -m stllm_jax.benchmark gpu-report --out DIR [--smoke]` (no config: see gpu_report.py) and
`python -m stllm_jax.benchmark attention [--shape B,T,H,hd --mask causal]` (no config: attention_bench.py).

Every command prints a markdown table and writes its JSON (`--out`, default runs/benchmark/<command>-<config>-<time>.json;
gpu-report: DIR/gpu_report.json and DIR/gpu_report.md). Config fields can be overridden as in training:
`--config.train.batch_size=4`.
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import sys
import time
from typing import Any

from stllm_jax import host_memory
from stllm_jax.benchmark import attention_bench
from stllm_jax.benchmark import isa_cap
from stllm_jax.errors import UserError, exit_with

COMMANDS = ('train', 'profile', 'generate', 'plan', 'gpu-report', 'attention')
DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  parser = argparse.ArgumentParser(prog='python -m stllm_jax.benchmark', description=__doc__.split('\n\n')[0])
  sub = parser.add_subparsers(dest='command', metavar='{' + ','.join(COMMANDS) + '}')
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument('--config', required=True, help='config file, e.g. configs/bench_small.py')
  common.add_argument('--out', default='', help='JSON result file (default under runs/benchmark/)')
  common.add_argument('--threads', type=int, default=0, help='torch threads (default: the cores this process may use)')
  train = sub.add_parser('train', parents=[common], help='time the train step')
  train.add_argument('--steps', type=int, default=10)
  train.add_argument('--mask', choices=('on', 'off', 'both'), default='on',
                     help='dynamic masking; off: every visual token; both: each batch masked, then unmasked (A/B)')
  train.add_argument('--mask-rate', type=float, default=None, help='one fixed mask rate instead of the random ones')
  train.add_argument('--against', choices=('torch',), default=None, help='alternate with the PyTorch reference')
  add_cpu_isa_argument(train)
  profile = sub.add_parser('profile', parents=[common], help='trace the train step: time by operation kind, the '
                                                             'matmuls\' share')
  profile.add_argument('--steps', type=int, default=3, help='steps timed untraced, then as many traced (default 3)')
  profile.add_argument('--warmup', type=int, default=2, help='steps before them; the first compiles (default 2)')
  profile.add_argument('--mask', choices=('on', 'off'), default='on', help='off: every visual token')
  profile.add_argument('--mask-rate', type=float, default=0.5, help='the fixed mask rate (default 0.5)')
  profile.add_argument('--top', type=int, default=15, help='operation kinds listed (default 15)')
  profile.add_argument('--trace-dir', default='', help='where the trace is kept (default under runs/benchmark/)')
  add_cpu_isa_argument(profile)
  gen = sub.add_parser('generate', parents=[common], help='time prefill and greedy decoding')
  gen.add_argument('--frames', type=int, default=4)
  gen.add_argument('--new-tokens', type=int, default=64)
  gen.add_argument('--batch', type=int, default=1)
  gen.add_argument('--prompt-len', type=int, default=32, help='text tokens after the visual tokens')
  gen.add_argument('--repeats', type=int, default=3)
  gen.add_argument('--against', choices=('torch',), default=None)
  add_cpu_isa_argument(gen)
  plan = sub.add_parser('plan', parents=[common], help='per-device memory of the train step, compiled ahead of time')
  plan.add_argument('--mesh', default='fsdp=8', help='e.g. fsdp=8 or data=2,fsdp=4')
  plan.add_argument('--batch-size', type=int, default=0, help='global batch (default: the config\'s)')
  plan.add_argument('--grad-accum', type=int, default=0, help='micro-batches per step (default: the config\'s)')
  plan.add_argument('--remat', default=None,
                    help='the LLM\'s remat policy, several separated by commas (one plan each), or all; policies: '
                         + ', '.join(remat_policy_names()))
  plan.add_argument('--frames', type=int, default=0, help='default: the config\'s (16 for the 7B configs)')
  plan.add_argument('--text-len', type=int, default=0, help='default: the longest text bucket')
  plan.add_argument('--qformer-text-len', type=int, default=0, help='default: the longest Q-Former text bucket')
  gpu = sub.add_parser('gpu-report', help='parity, train-step speed and decode speed on one GPU, in under 8 minutes')
  gpu.add_argument('--out', required=True, help='directory for gpu_report.json and gpu_report.md')
  gpu.add_argument('--smoke', action='store_true', help='tiny shapes (runs on CPU in about a minute)')
  gpu.add_argument('--deadline-s', type=float, default=420.0,
                   help='parts that would end after this many seconds are skipped (default 420)')
  attention = sub.add_parser('attention', help='attention implementations side by side, forward + backward')
  attention.add_argument('--shape', default='8,192,8,64',
                         help='batch,tokens,heads,head_dim (default: bench_small\'s LLM)')
  attention.add_argument('--mask', choices=attention_bench.MASKS, default='causal',
                         help='causal: + key lengths, as the LLM trains; padding: key padding, as the Q-Former')
  attention.add_argument('--dtype', choices=('float32', 'bfloat16', 'float16'), default='float32')
  attention.add_argument('--rounds', type=int, default=7, help='alternating rounds (default 7)')
  attention.add_argument('--out', default='', help='JSON result file (default under runs/benchmark/)')
  if not argv or argv[0] not in COMMANDS + ('-h', '--help'):
    raise UserError(f'unknown subcommand {argv[0] if argv else "(none)"!r}: use one of {", ".join(COMMANDS)}, '
                    f'e.g. python -m stllm_jax.benchmark train --config configs/bench_small.py')
  args, rest = parser.parse_known_args(argv)
  overrides = [a for a in rest if a.startswith('--config.')]
  unknown = [a for a in rest if not a.startswith('--config.')]
  if unknown:
    raise UserError(f'unknown arguments {unknown}; see python -m stllm_jax.benchmark {args.command} --help')
  return args, overrides


def remat_policy_names() -> list[str]:
  from stllm_jax.models import layers  # pylint: disable=g-import-not-at-top
  return list(layers.REMAT_POLICIES)


def remat_policies(text: str | None) -> list[str | None]:
  """--remat 'full,minimal' -> ['full', 'minimal']; 'all' -> every policy; None -> [None] (the config's)."""
  if text is None:
    return [None]
  known = remat_policy_names()
  names = known if text == 'all' else [name.strip() for name in text.split(',')]
  unknown = [name for name in names if name not in known]
  if unknown or not names:
    raise UserError(f'unknown --remat {", ".join(unknown) or text!r}: choose among {", ".join(known)} (or all)')
  return names


def load_config(path: str, overrides: list[str]) -> Any:
  from stllm_jax import configlib  # pylint: disable=g-import-not-at-top
  try:
    config = configlib.load_config_file(path)
  except (FileNotFoundError, AttributeError) as err:
    raise UserError(str(err)) from None
  for override in overrides:
    apply_override(config, override)
  return config


def apply_override(config: Any, override: str) -> None:
  """'--config.train.lr=1e-5' -> config.train.lr = 1e-5, parsed as the field's current type."""
  key, sep, text = override[len('--config.'):].partition('=')
  if not sep:
    raise UserError(f'bad override {override!r}: write --config.a.b=value')
  *parents, name = key.split('.')
  node = config
  try:
    for part in parents:
      node = node[part]
    current = node[name]
  except (KeyError, AttributeError, TypeError):
    raise UserError(f'bad override {override!r}: the config has no field {key!r}') from None
  node[name] = parse_value(text, current, override)


def parse_value(text: str, current: Any, override: str) -> Any:
  if isinstance(current, bool):
    if text.lower() not in ('true', 'false', '1', '0'):
      raise UserError(f'bad override {override!r}: expected true or false')
    return text.lower() in ('true', '1')
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise UserError(f'bad override {override!r}: {text!r} is not a {type(current).__name__}') from None
  if isinstance(current, float) and isinstance(value, int):
    value = float(value)
  if isinstance(current, tuple) and isinstance(value, list):
    value = tuple(value)
  return value


def mesh_device_count(spec: str) -> int:
  """Devices a mesh spec names explicitly ('fsdp=8' -> 8); -1 axes count as 1."""
  from stllm_jax import sharding  # pylint: disable=g-import-not-at-top
  try:
    sizes = sharding.parse_mesh(spec, num_devices=10 ** 6)  # only the syntax is checked here
  except ValueError as err:
    raise UserError(str(err)) from None
  if any(v < 1 for v in sizes.values()):
    raise UserError(f'bad mesh spec {spec!r}: axis sizes must be >= 1')
  return math.prod(v for v in sizes.values() if v != 10 ** 6)


def reexec_with_devices(needed: int, argv: list[str]) -> None:
  """Starts this command again with `needed` simulated CPU devices, when fewer exist."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.device_count() >= needed:
    return
  flags = os.environ.get('XLA_FLAGS', '')
  if DEVICE_COUNT_FLAG in flags or jax.devices()[0].platform != 'cpu':
    raise UserError(f'the mesh needs {needed} devices, but {jax.device_count()} are available')
  env = dict(os.environ, XLA_FLAGS=f'{flags} {DEVICE_COUNT_FLAG}={needed}'.strip())
  os.execve(sys.executable, [sys.executable, '-m', 'stllm_jax.benchmark', *argv], env)


def default_out(command: str, config_path: str) -> str:
  name = os.path.splitext(os.path.basename(config_path))[0]
  return os.path.join('runs', 'benchmark', f'{command}-{name}-{time.strftime("%Y%m%d-%H%M%S")}.json')


def run_plan(args: argparse.Namespace, config: Any) -> dict:
  """One memory plan, or with several --remat policies one per policy (`plans`, in the order given)."""
  from stllm_jax.benchmark import devices  # pylint: disable=g-import-not-at-top
  policies = remat_policies(args.remat)
  plans = [plan_one(args, config, policy) for policy in policies]
  if len(plans) == 1:
    return {'command': 'plan', 'device': devices.describe(), **plans[0]}
  return {'command': 'plan', 'device': devices.describe(), 'remat_policies': policies, 'plans': plans}


def plan_one(args: argparse.Namespace, config: Any, remat_policy: str | None) -> dict:
  """The memory plan of the config's train step with the LLM's `remat_policy` (None: the config's)."""
  from stllm_jax import sharding  # pylint: disable=g-import-not-at-top
  from stllm_jax.benchmark import plan  # pylint: disable=g-import-not-at-top
  from stllm_jax.benchmark.train_bench import validated  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  if args.batch_size:
    config.train.batch_size = args.batch_size
  if args.grad_accum:
    config.train.grad_accum_steps = args.grad_accum
  if remat_policy:
    config.model.llm.remat_policy = remat_policy
  data = config.data
  if data.get('source') == 'random':
    model_cfg, train_cfg = validated(config)
  else:  # a real-data config: the plan needs only shapes
    random_like = config.copy_and_resolve_references()
    random_like.data = {'source': 'random'}
    model_cfg, train_cfg = validated(random_like)
  frames = args.frames or data.get('num_frames') or _first_dataset_frames(data) or 16
  text_len = args.text_len or max(data.text_buckets)
  qformer_len = args.qformer_text_len or data.get('qformer_text_len') or max(data.qformer_buckets)
  if train_cfg.batch_size % train_cfg.grad_accum_steps:
    raise UserError(f'batch size {train_cfg.batch_size} is not a multiple of grad accumulation {train_cfg.grad_accum_steps}')
  try:
    mesh = sharding.make_mesh(args.mesh)
  except ValueError as err:
    raise UserError(str(err)) from None
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  micro = train_cfg.batch_size // train_cfg.grad_accum_steps
  if micro % shards:
    raise UserError(f'micro-batch {micro} (batch {train_cfg.batch_size} / accumulation {train_cfg.grad_accum_steps}) '
                    f'is not a multiple of data x fsdp = {shards}')
  return plan.memory_plan(model_cfg, train_cfg, mesh, num_frames=frames, text_len=text_len,
                          qformer_text_len=qformer_len)


def _first_dataset_frames(data: Any) -> int:
  datasets = data.get('datasets') or {}
  entries = datasets.values() if hasattr(datasets, 'values') else datasets
  for entry in entries:
    return entry.get('num_frames', 0)
  return 0


def plan_table(result: dict) -> str:
  if 'plans' in result:
    return remat_comparison_table(result)
  from stllm_jax.benchmark import report  # pylint: disable=g-import-not-at-top
  m = result['memory_analysis'] or {}
  g = report.gib
  rows = [('host', f"{result['device']['host_cpu']}, {result['device']['device_count']} simulated "
                   f"{result['device']['platform']} devices"),
          ('setup', f"mesh {result['mesh']}, batch {result['batch_size']}, accumulation {result['grad_accum_steps']} "
                    f"(micro-batch {result['micro_batch_per_device']:g} per device), LLM remat {result['remat_llm']}, "
                    f"{result['num_frames']} frames, n_keep {result['n_keep']} of {result['num_visual']}, "
                    f"text {result['text_len']}, Q-Former text {result['qformer_text_len']}, MVM {result['mvm']}, "
                    f"compute {result['dtype']}, params {result['param_dtype']}"),
          ('lower / compile time', f"{result['lower_s']:.1f} s / {result['compile_s']:.1f} s"),
          ('trainable params (total / per device)', f"{g(result['trainable_params_total_bytes'])} / "
                                                    f"{g(result['trainable_params_bytes_per_device'])}"),
          ('frozen params (total / per device)', f"{g(result['frozen_params_total_bytes'])} / "
                                                 f"{g(result['frozen_params_bytes_per_device'])}"),
          ('optimizer state per device', g(result['optimizer_state_bytes_per_device'])),
          ('gradients per device', g(result['gradients_bytes_per_device'])),
          ('XLA arguments / outputs / aliased', f"{g(m.get('argument_bytes'))} / {g(m.get('output_bytes'))} / "
                                                f"{g(m.get('alias_bytes'))}"),
          ('XLA temporaries (activations, gradients, workspace)', g(m.get('temp_bytes'))),
          ('XLA generated code', g(m.get('generated_code_bytes'))),
          ('estimate per device (args + outputs - aliased + temp + code)', g(result['estimate_bytes_per_device'])),
          ('fits 40 GiB / 80 GiB per device', f"{_yes(result['fits']['40GiB'])} / {_yes(result['fits']['80GiB'])}")]
  return report.markdown_table(rows) + ('\n(memory from XLA:CPU memory_analysis with simulated devices: an estimate '
                                        'of the GPU/TPU program, not a measurement)')


def remat_comparison_table(result: dict) -> str:
  """One row per remat policy: what XLA keeps per device and whether it fits."""
  from stllm_jax.benchmark import report  # pylint: disable=g-import-not-at-top
  first = result['plans'][0]
  setup = (f"{result['device']['device_count']} simulated {result['device']['platform']} devices, mesh {first['mesh']}, "
           f"batch {first['batch_size']}, accumulation {first['grad_accum_steps']} (micro-batch "
           f"{first['micro_batch_per_device']:g} per device), {first['num_frames']} frames, n_keep {first['n_keep']} "
           f"of {first['num_visual']}, text {first['text_len']}, MVM {first['mvm']}, compute {first['dtype']}")
  g = lambda b: f'{b / report.GIB:.2f}' if b is not None else 'n/a'
  rows = [(p['remat_llm'], g((p['memory_analysis'] or {}).get('temp_bytes')), g(p['estimate_bytes_per_device']),
           _yes(p['fits']['40GiB']), _yes(p['fits']['80GiB']), f"{p['compile_s']:.0f}") for p in result['plans']]
  header = ('LLM remat', 'XLA temporaries GiB', 'estimate GiB per device', 'fits 40 GiB', 'fits 80 GiB', 'compile s')
  return (f'{setup}\n\n' + report.markdown_columns(header, rows) + '\n(memory from XLA:CPU memory_analysis with '
          'simulated devices: an estimate of the GPU/TPU program, not a measurement)')


def _yes(flag: bool) -> str:
  return 'yes' if flag else 'no'


def run_gpu_report(args: argparse.Namespace, argv: list[str]) -> dict:
  """gpu_report.run, then its table printed and written beside its JSON."""
  # Before the GPU client starts: the slice's params, Adam state and gradients need more than JAX's default 75%
  # of a 40 GB card.
  os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.95')
  from stllm_jax.benchmark import gpu_report  # pylint: disable=g-import-not-at-top
  from stllm_jax.benchmark import report  # pylint: disable=g-import-not-at-top
  result = gpu_report.run(args.out, args.smoke, args.deadline_s)
  result['argv'] = ['python', '-m', 'stllm_jax.benchmark', *argv]
  report.write_json(result, os.path.join(args.out, 'gpu_report.json'))
  text = gpu_report.table(result)
  with open(os.path.join(args.out, 'gpu_report.md'), 'w') as f:
    f.write(f"`python -m stllm_jax.benchmark {' '.join(argv)}`\n\n{text}\n")
  print(text)
  print(f"\nwritten: {os.path.join(args.out, 'gpu_report.json')}, {os.path.join(args.out, 'gpu_report.md')}")
  return result


def run_attention(args: argparse.Namespace, argv: list[str]) -> dict:
  from stllm_jax.benchmark import report  # pylint: disable=g-import-not-at-top
  result = attention_bench.run(attention_bench.parse_shape(args.shape), args.mask, args.dtype, args.rounds,
                               min_round_s=0.25)
  result['argv'] = ['python', '-m', 'stllm_jax.benchmark', *argv]
  path = args.out or os.path.join('runs', 'benchmark', f'attention-{time.strftime("%Y%m%d-%H%M%S")}.json')
  report.write_json(result, path)
  print(attention_bench.table(result))
  print(f'\nwritten: {path}')
  return result


def run_profile(args: argparse.Namespace, config: Any) -> tuple[dict, str]:
  if args.steps < 1 or args.warmup < 1 or args.top < 1:
    raise UserError(f'--steps {args.steps} --warmup {args.warmup} --top {args.top}: give at least 1 each '
                    '(the first warm-up step compiles)')
  if not 0.0 <= args.mask_rate < 1.0:
    raise UserError(f'--mask-rate {args.mask_rate}: give a rate in [0, 1)')
  if args.mask == 'off':
    config.train.masking.enabled = False
  from stllm_jax.benchmark import profile_bench  # pylint: disable=g-import-not-at-top
  trace_dir = args.trace_dir or os.path.splitext(default_out('trace', args.config))[0]
  result = profile_bench.run(config, steps=args.steps, warmup=args.warmup, mask_rate=args.mask_rate, top=args.top,
                             trace_dir=trace_dir)
  return result, profile_bench.table(result)


def add_cpu_isa_argument(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--cpu-isa', choices=isa_cap.CHOICES, default='host',
                      help='avx2: XLA, its YNNPACK matmuls and PyTorch all limited to AVX2, as on a CPU without AVX-512 '
                           '(x86-64 Linux)')


def main(argv: list[str] | None = None) -> dict:
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    args, overrides = parse_args(argv)
    if args.command == 'plan':
      reexec_with_devices(mesh_device_count(args.mesh), argv)
    if args.command == 'gpu-report':
      return run_gpu_report(args, argv)
    if args.command == 'attention':
      return run_attention(args, argv)
    config = load_config(args.config, overrides)
    host_memory.set_up_malloc(config.get('host_malloc', host_memory.DEFAULT_MODE))  # JAX and PyTorch alike
    if args.command in ('train', 'profile', 'generate'):
      isa_cap.apply(args.cpu_isa)  # before JAX compiles and torch is imported
    if args.command == 'train':
      if args.steps < 2:
        raise UserError(f'--steps {args.steps}: give at least 2 (the first step compiles; times come from the rest)')
      from stllm_jax.benchmark import train_bench  # pylint: disable=g-import-not-at-top
      result = train_bench.run(config, steps=args.steps, mask=args.mask, mask_rate=args.mask_rate,
                               against=args.against, threads=args.threads or None)
      text = train_bench.table(result)
    elif args.command == 'profile':
      result, text = run_profile(args, config)
    elif args.command == 'generate':
      from stllm_jax.benchmark import generate_bench  # pylint: disable=g-import-not-at-top
      result = generate_bench.run(config, frames=args.frames, new_tokens=args.new_tokens, batch=args.batch,
                                  prompt_len=args.prompt_len, repeats=args.repeats, against=args.against,
                                  threads=args.threads or None)
      text = generate_bench.table(result)
    else:
      result = run_plan(args, config)
      text = plan_table(result)
  except UserError as error:
    exit_with(error)
  result['argv'] = ['python', '-m', 'stllm_jax.benchmark', *argv]
  result['config_file'] = args.config
  path = args.out or default_out(args.command, args.config)
  from stllm_jax.benchmark import report  # pylint: disable=g-import-not-at-top
  report.write_json(result, path)
  print(text)
  print(f'\nwritten: {path}')
  return result
