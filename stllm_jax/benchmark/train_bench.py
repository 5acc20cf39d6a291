"""`benchmark train`: the real jitted train step on random batches, timed step by step.

    RandomBatches (host) -> masking plan (rho, n_keep, n_slots) -> shard_batch -> jit(train_step) -> block_until_ready

A step during which the jit cache grew compiled a program: its time minus the steady median is counted as
compile time, and it is left out of the steady statistics. With `--against torch`, each step's batch also
goes through the PyTorch reference (torch_reference.py) right after the JAX step, so both see the same
shapes on the same host at the same time (A, B, A, B, ...).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import jax
import numpy as np

from stllm_jax import masking, sharding, step
from stllm_jax import params as params_lib
from stllm_jax import train as train_lib
from stllm_jax.benchmark import devices, flops, plan, report
from stllm_jax.data.random_batches import RandomBatches
from stllm_jax.errors import UserError
from stllm_jax.models import stllm


@dataclasses.dataclass
class JaxTrainer:
  config: Any
  model_cfg: stllm.STLLMConfig
  train_cfg: step.TrainConfig
  mesh: jax.sharding.Mesh
  state: Any
  frozen: Any
  jitted: Any

  def __call__(self, host_batch: dict[str, np.ndarray], plan: masking.MaskPlan) -> dict:
    batch = sharding.shard_batch({k: host_batch[k] for k in step.MODEL_BATCH_KEYS}, self.mesh)
    with sharding.activate(self.mesh):
      self.state, metrics = self.jitted(self.state, self.frozen, batch, np.int32(plan.n_keep), n_slots=plan.n_slots)
    return jax.block_until_ready(metrics)


def validated(config: Any) -> tuple[stllm.STLLMConfig, step.TrainConfig]:
  """(model config, train config) checked as training checks them, for a random-batch config."""
  model_cfg, train_cfg = train_lib.validated(config)
  if config.data.get('source') != 'random':
    raise UserError('the benchmark runs on random batches: the config needs config.data = defaults.random_data(...)')
  return model_cfg, train_cfg


def build_jax_trainer(config: Any) -> JaxTrainer:
  """Random params on the config's mesh, the train state and the jitted step (as train.py builds them)."""
  model_cfg, _ = validated(config)
  mesh = sharding.make_mesh(config.mesh)
  shardings = sharding.param_shardings(stllm.abstract_variables(model_cfg), mesh)
  return trainer_from_params(config, sharding.shard_params(stllm.init_params(model_cfg, jax.random.key(config.seed)),
                                                           shardings))


def trainer_from_params(config: Any, params: Any) -> JaxTrainer:
  """The train state (fresh optimizer state) and the jitted step for `params`, already placed on the config's mesh."""
  model_cfg, train_cfg = validated(config)
  mesh = sharding.make_mesh(config.mesh)
  shardings = sharding.param_shardings(stllm.abstract_variables(model_cfg), mesh)
  trainable, frozen = params_lib.split_params(params, train_cfg.frozen)
  schedule = step.make_schedule(train_cfg, max(train_cfg.steps, 1))
  tx = step.make_optimizer(train_cfg, schedule)
  state = step.init_state(trainable, tx, config.seed, params_lib.split_params(shardings, train_cfg.frozen)[0], mesh)
  state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
  jitted = jax.jit(functools.partial(step.train_step, model=stllm.STLLM(model_cfg), cfg=train_cfg, tx=tx,
                                     schedule=schedule),
                   static_argnames='n_slots', donate_argnames='state', out_shardings=(state_shardings, None))
  return JaxTrainer(config, model_cfg, train_cfg, mesh, state, frozen, jitted)


def mask_plan(step_index: int, seed: int, num_visual: int, cfg: masking.MaskingConfig,
              fixed_rate: float | None) -> masking.MaskPlan:
  """The run's random rate per step, or one fixed rate (padded to its bucket like any other)."""
  if fixed_rate is None or not cfg.enabled:
    return masking.step_mask_plan(step_index, seed, num_visual, cfg)
  return masking.fixed_rate_plan(fixed_rate, num_visual, cfg)


def unrolled_variant(config: Any) -> Any:
  """The same step with layers unrolled and no accumulation scan: XLA's cost analysis counts a loop body once."""
  variant = config.copy_and_resolve_references()
  variant.model.vision.scan_layers = False
  variant.model.llm.scan_layers = False
  variant.train.grad_accum_steps = 1
  return variant


def is_unrolled(config: Any) -> bool:
  return (not config.model.vision.scan_layers and not config.model.llm.scan_layers
          and config.train.grad_accum_steps == 1)


def xla_cost_and_memory(config: Any, mesh: jax.sharding.Mesh, host_batch: dict[str, np.ndarray],
                        mask: masking.MaskPlan) -> dict[str, Any]:
  """XLA's FLOPs and memory analysis of the step for one batch shape (compiled ahead of time from abstract
  inputs; the unrolled variant when the config scans layers or micro-batches)."""
  variant = config if is_unrolled(config) else unrolled_variant(config)
  model_cfg, train_cfg = validated(variant)
  b, t = host_batch['frames'].shape[:2]
  batch = plan.abstract_batch(model_cfg, mesh, b, t, host_batch['input_ids'].shape[1],
                              host_batch['qformer_input_ids'].shape[1])
  jitted, state, frozen = plan.abstract_step_inputs(model_cfg, train_cfg, mesh, batch)
  began = time.perf_counter()
  with sharding.activate(mesh):
    compiled = jitted.lower(state, frozen, batch, np.int32(mask.n_keep), n_slots=mask.n_slots).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {'program': 'the train step itself' if variant is config else
          'unrolled variant (scan_layers=False, grad_accum_steps=1; same FLOPs, other memory)',
          # cost_analysis counts one device's partition of the SPMD program: x devices for the whole step
          'xla_flops_per_device': float(cost.get('flops', float('nan'))),
          'xla_flops': float(cost.get('flops', float('nan'))) * mesh.size, 'compile_s': time.perf_counter() - began,
          'memory_analysis': devices.compiled_memory(compiled)}


def step_flops(model_cfg: stllm.STLLMConfig, train_cfg: step.TrainConfig, host_batch: dict, n_slots: int) -> dict:
  """The step's analytic FLOPs: the LLM computes every slot, padding included."""
  b, t = host_batch['frames'].shape[:2]
  return flops.train_step_flops(model_cfg, batch_size=b, num_frames=t, text_len=host_batch['input_ids'].shape[1],
                                qformer_text_len=host_batch['qformer_input_ids'].shape[1], n_keep=n_slots,
                                mvm=train_cfg.mvm_weight > 0)


def run(config: Any, *, steps: int, mask: str, mask_rate: float | None, against: str | None,
        threads: int | None = None) -> dict[str, Any]:
  """Runs `steps` train steps (JAX, or JAX and PyTorch alternating) and returns the measurements."""
  config = config.copy_and_resolve_references()
  if mask == 'off':
    config.train.masking.enabled = False
  if against == 'torch':
    config.train.mvm_weight = 0.0  # no MVM on either side of the A/B
  trainer = build_jax_trainer(config)
  model_cfg, train_cfg = trainer.model_cfg, trainer.train_cfg
  data = RandomBatches(config.data, model_cfg, train_cfg.batch_size)
  threads = threads or len(os.sched_getaffinity(0))
  reference = None
  if against == 'torch':
    from stllm_jax.benchmark.torch_reference import TorchTrainStep  # pylint: disable=g-import-not-at-top
    reference = TorchTrainStep(model_cfg, train_cfg, threads, seed=config.seed)
  records, cost = [], None
  for index in range(steps):
    host_batch = next(data)
    num_visual = model_cfg.num_visual_tokens(host_batch['frames'].shape[1])
    plan = mask_plan(index, config.seed, num_visual, train_cfg.masking, mask_rate)
    programs_before = step.compiled_programs(trainer.jitted)
    began = time.perf_counter()
    metrics = trainer(host_batch, plan)
    jax_s = time.perf_counter() - began
    record = {'rho': plan.rho, 'n_keep': plan.n_keep, 'n_slots': plan.n_slots,
              'text_len': host_batch['input_ids'].shape[1], 'jax_s': jax_s,
              'compiled': step.compiled_programs(trainer.jitted) > programs_before, 'loss': float(metrics['loss']),
              'flops': step_flops(model_cfg, train_cfg, host_batch, plan.n_slots)['total'],
              'tokens': host_batch['frames'].shape[0] * (plan.n_keep + host_batch['input_ids'].shape[1]),
              'frames': host_batch['frames'].shape[0] * host_batch['frames'].shape[1]}
    if mask == 'both':  # the same batch again, every visual token kept: the masked / unmasked A/B
      programs_before = step.compiled_programs(trainer.jitted)
      began = time.perf_counter()
      trainer(host_batch, masking.MaskPlan(0.0, num_visual, num_visual))
      record['unmasked_s'] = time.perf_counter() - began
      record['unmasked_compiled'] = step.compiled_programs(trainer.jitted) > programs_before
    if reference is not None:
      began = time.perf_counter()
      record['torch_loss'] = reference(host_batch, plan.n_keep)
      record['torch_s'] = time.perf_counter() - began
    records.append(record)
    if cost is None:
      cost = {'batch': {k: list(v.shape) for k, v in host_batch.items()}, 'n_keep': plan.n_keep,
              'n_slots': plan.n_slots, 'analytic': step_flops(model_cfg, train_cfg, host_batch, plan.n_slots)}
      cost.update(xla_cost_and_memory(config, trainer.mesh, host_batch, plan))
  return summarise(config, model_cfg, train_cfg, records, cost, mask, mask_rate, against, threads, trainer.jitted,
                   trainer.mesh.size)


def bucket_combinations(config: Any, model_cfg: stllm.STLLMConfig, train_cfg: step.TrainConfig) -> int:
  """(kept-token buckets) x (text buckets): the most train-step programs a run may compile."""
  num_visual = model_cfg.num_visual_tokens(config.data.num_frames)
  keep = len(masking.bucket_sizes(num_visual, train_cfg.masking)) if train_cfg.masking.enabled else 1
  return keep * len(config.data.text_buckets)


def summarise(config, model_cfg, train_cfg, records, cost, mask, mask_rate, against, threads, jitted,
              num_devices: int) -> dict[str, Any]:
  steady = [r for r in records[1:] if not (r['compiled'] or r.get('unmasked_compiled'))]
  jax_spread = report.spread([r['jax_s'] for r in steady])
  median = jax_spread['median_s']
  compile_s = sum(max(r['jax_s'] - median, 0.0) for r in records if r['compiled']) if median == median else None
  if mask == 'both' and compile_s is not None:
    unmasked_median = report.spread([r['unmasked_s'] for r in steady])['median_s']
    compile_s += sum(max(r['unmasked_s'] - unmasked_median, 0.0) for r in records if r['unmasked_compiled'])
  seconds = sum(r['jax_s'] for r in steady)
  info = devices.describe()
  result = {
      'command': 'train', 'device': info,
      'setup': {'batch_size': train_cfg.batch_size, 'grad_accum_steps': train_cfg.grad_accum_steps,
                'num_frames': config.data.num_frames, 'text_buckets': list(config.data.text_buckets),
                'mask': mask, 'fixed_mask_rate': mask_rate, 'mvm': train_cfg.mvm_weight > 0,
                'dtype': model_cfg.dtype, 'remat_llm': model_cfg.llm.remat_policy, 'steps': len(records),
                'torch_threads': threads if against else None},
      'compile_s': compile_s, 'compiled_programs': step.compiled_programs(jitted),
      'bucket_combinations': bucket_combinations(config, model_cfg, train_cfg),
      'step_time': jax_spread, 'tokens_per_s': sum(r['tokens'] for r in steady) / seconds if steady else None,
      'frames_per_s': sum(r['frames'] for r in steady) / seconds if steady else None,
      'flops_per_step_analytic_mean': float(np.mean([r['flops'] for r in steady])) if steady else None,
      'cost_check': {**cost, 'analytic_over_xla': cost['analytic']['total'] / cost['xla_flops']},
      'peak_memory_bytes': devices.peak_memory_bytes(),
      'steps_log': records,
  }
  peak = info['peak_bf16_tflops'] and info['peak_bf16_tflops'] * num_devices  # the mesh's devices together
  result.update(flops.achieved(sum(r['flops'] for r in steady), seconds, peak))
  result['mesh_devices'] = num_devices
  if mask == 'both':
    ratios = [r['jax_s'] / r['unmasked_s'] for r in steady]
    result['unmasked'] = {'step_time': report.spread([r['unmasked_s'] for r in steady]),
                          'masked_over_unmasked_median': float(np.median(ratios)) if ratios else None,
                          'masked_over_unmasked_spread': report.spread(ratios)}
  if against == 'torch':
    pairs = [r for r in steady if 'torch_s' in r]
    ratios = [r['jax_s'] / r['torch_s'] for r in pairs]
    quiet = quiet_ratios(pairs, 'jax_s', 'torch_s')
    result['torch'] = {'step_time': report.spread([r['torch_s'] for r in pairs]),
                       'jax_over_torch_median': float(np.median(ratios)) if ratios else None,
                       'jax_over_torch_spread': report.spread(ratios),
                       'jax_over_torch_quiet_median': float(np.median(quiet)) if quiet else None,
                       'quiet_pairs': len(quiet)}
  return result


def quiet_ratios(pairs: list[dict], a: str, b: str, slack: float = 1.2) -> list[float]:
  """a / b over the pairs where neither side ran more than `slack` x its own fastest step: on a shared
  host, the steps that other load did not slow down."""
  if not pairs:
    return []
  fastest_a, fastest_b = min(r[a] for r in pairs), min(r[b] for r in pairs)
  return [r[a] / r[b] for r in pairs if r[a] <= slack * fastest_a and r[b] <= slack * fastest_b]


def table(result: dict[str, Any]) -> str:
  s, cost = result['step_time'], result['cost_check']
  memory = result['peak_memory_bytes']
  analysis = cost.get('memory_analysis') or {}
  rows = [
      ('device', f"{result['device']['device_kind']} x{result['device']['device_count']} "
                 f"({devices.describe_host(result['device'])})"),
      ('setup', ', '.join(f'{k}={v}' for k, v in result['setup'].items() if v is not None)),
      ('compile time (sum over new shapes)', report.ms(result['compile_s'])),
      ('compiled train-step programs (bucket combinations)',
       f"{result['compiled_programs']} ({result['bucket_combinations']})"),
      ('step time median (p10 / p90), steady', f"{report.ms(s['median_s'])} ({report.ms(s['p10_s'])} / "
                                               f"{report.ms(s['p90_s'])}), n={s['n']}"),
      ('tokens/s (kept visual + text)', report.rate(result['tokens_per_s'], 'tokens/s')),
      ('frames/s', report.rate(result['frames_per_s'], 'frames/s')),
      ('model FLOPs per step (analytic, mean)', f"{result['flops_per_step_analytic_mean'] / 1e9:,.2f} GFLOP"),
      ('analytic vs XLA cost analysis (first shape)', f"{cost['analytic']['total'] / 1e9:,.2f} vs "
                                                      f"{cost['xla_flops'] / 1e9:,.2f} GFLOP, ratio "
                                                      f"{cost['analytic_over_xla']:.3f} ({cost['program']})"),
      ('achieved (analytic FLOPs / steady time)', f"{result['tflops_per_s']:.4f} TFLOP/s"),
      ('MFU', 'n/a (no bf16 peak for this device)' if result['mfu'] is None else f"{100 * result['mfu']:.1f} %"),
      ('peak device memory', report.gib(memory) if memory is not None else
       f"n/a (no memory_stats); compiled memory_analysis of {cost['program']}: "
       f"{report.gib(analysis.get('total_bytes'))} (args {report.gib(analysis.get('argument_bytes'))}, "
       f"temp {report.gib(analysis.get('temp_bytes'))})"),
  ]
  if 'unmasked' in result:
    u = result['unmasked']
    rows += [('unmasked step median (p10 / p90), same batches', f"{report.ms(u['step_time']['median_s'])} "
              f"({report.ms(u['step_time']['p10_s'])} / {report.ms(u['step_time']['p90_s'])})"),
             ('masked / unmasked step time (median of per-step ratios)', f"{u['masked_over_unmasked_median']:.3f}")]
  if 'torch' in result:
    t = result['torch']
    rows += [('PyTorch reference step median (p10 / p90)', f"{report.ms(t['step_time']['median_s'])} "
              f"({report.ms(t['step_time']['p10_s'])} / {report.ms(t['step_time']['p90_s'])})"),
             ('JAX / PyTorch step time (median of per-step ratios)', f"{t['jax_over_torch_median']:.3f}"),
             ('JAX / PyTorch, quiet steps only (both within 1.2x of their fastest)',
              'n/a' if t['jax_over_torch_quiet_median'] is None else
              f"{t['jax_over_torch_quiet_median']:.3f} (n={t['quiet_pairs']})")]
  return report.markdown_table(rows)
