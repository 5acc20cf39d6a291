"""`benchmark gpu-report`: what one GPU session should measure, in one command, one table and one JSON.

    python -m stllm_jax.benchmark gpu-report --out DIR            # one GPU (A100 / H100 / H200), under 8 minutes
    python -m stllm_jax.benchmark gpu-report --out DIR --smoke    # the same code with tiny shapes (CPU, CI)

Run from the repository root (the slice starts from configs/stllm_7b.py). Every weight is random and made on the
device; nothing is downloaded. Parts, in the order they run (the table groups them by kind):
  parity     logits of the train slice (below, batch 1) computed in bfloat16 with XLA attention, then with cuDNN
             attention, against float32 compute (XLA attention, matmuls at 'highest' precision: no TF32); the same
             float32 params; relative L2 error and top-1 agreement over the real (unpadded) positions
  train      the jitted train step (`step.train_step`, as training runs it) of a 7B-shaped slice: the QA recipe of
             configs/stllm_7b.py (full EVA-ViT-g, 3-layer BT-Adapter, Q-Former with its dropout, bfloat16
             compute, float32 params and Adam) with 4 full-width Vicuna-7B layers instead of 32; 16 frames (512
             visual tokens, 256 kept at mask rate 0.5), text 256, Q-Former text 64, MVM on, batch 2, one device.
             Variants (attention x LLM remat), in run order: xla/full, cudnn/full, decode (below), cudnn/minimal,
             xla/minimal. Median step time over the steps after the compiling one, tokens/s (kept visual + text),
             analytic model FLOPs / time, MFU against the device's bf16 peak. The params carry on from variant to
             variant (each starts a fresh optimizer state); only speed is compared.
  decode     full-size Vicuna-7B (32 layers, bf16 weights) greedy decoding (`generate.decode`) after a prefix of
             16 x 32 visual embeddings + 32 prompt tokens, at batch 1 and 8: decode tokens/s = B (N - 1) /
             (time(N) - time(1)) for N = 64 new tokens, against the memory-bandwidth limit B x HBM bandwidth /
             bytes of weights read per token (every parameter but the input embedding table)

Time budget on one H100 SXM, estimated (no GPU has run this yet; compiles dominate):
  start-up, slice params on the device (init compile)                 ~30 s
  parity: three forward compiles and runs                             ~90 s
  train: per variant, compile ~60 s + 8 steps of ~0.2 s               ~75 s each, 300 s for four
  decode: 7B params on the device ~20 s; per batch two compiles of    ~60 s
          ~15 s and 2 x 3 timed calls of 0.1-0.5 s
  total ~8 min at these estimates: a global deadline (--deadline-s, default 420 s) skips any part whose estimate
  (the H100 one above, then what the same part took here) no longer fits, so the report ends in time with what
  it has; a part that fails (e.g. cuDNN refusing a shape) records its one-line error and the report goes on.
  The JSON is rewritten after every part, so even a killed run leaves what it measured.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import os
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from stllm_jax import configlib, defaults, generate, masking
from stllm_jax import params as params_lib
from stllm_jax.benchmark import devices, flops, generate_bench, report
from stllm_jax.benchmark.train_bench import JaxTrainer, step_flops, trainer_from_params, validated
from stllm_jax.data.random_batches import RandomBatches
from stllm_jax.models import stllm
from stllm_jax.models.llama import Llama, LlamaConfig

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), 'configs')
MASK_RATE = 0.5
TRAIN_VARIANTS = (('xla', 'full'), ('cudnn', 'full'), ('cudnn', 'minimal'), ('xla', 'minimal'))  # (attention, remat)
DECODE_BATCHES = (1, 8)
# Seconds each part is expected to take on one H100 (see the docstring); what a part took here replaces its estimate.
H100_ESTIMATE_S = {'slice': 30.0, 'parity': 90.0, 'train': 75.0, 'decode_params': 20.0, 'decode': 30.0}


@dataclasses.dataclass(frozen=True)
class Shapes:
  """The sizes of one report: `REAL` (a 7B-shaped slice on one GPU) or `SMOKE` (tiny, for CI on CPU)."""
  llm_layers: int  # LLaMA layers of the train slice
  frames: int
  text_len: int
  qformer_text_len: int
  batch: int  # train batch (parity takes its first sample)
  steps: int  # train steps per variant; the first compiles
  prompt_len: int  # decode: text tokens after the frames' visual tokens
  new_tokens: int
  repeats: int  # timed decode calls per token count


REAL = Shapes(llm_layers=4, frames=16, text_len=256, qformer_text_len=64, batch=2, steps=8, prompt_len=32,
              new_tokens=64, repeats=3)
SMOKE = Shapes(llm_layers=1, frames=2, text_len=8, qformer_text_len=4, batch=2, steps=2, prompt_len=4,
               new_tokens=16, repeats=2)
# The smoke model: one block or layer per tower (one BT-Adapter layer pair), head dims cuDNN would take.
SMOKE_ARCHITECTURE = {
    'vision': dict(image_size=28, patch_size=14, width=64, depth=1, num_heads=4, mlp_dim=128),
    'qformer': dict(width=64, num_layers=1, num_heads=4, mlp_dim=128, vocab_size=128, max_positions=64,
                    num_query_tokens=8),
    'llm': dict(vocab_size=256, width=64, num_layers=1, num_heads=4, num_kv_heads=4, mlp_dim=128, max_positions=512),
}


# ----------------------------------------------------------------------------------------- configs


def slice_config(shapes: Shapes, smoke: bool) -> ml_collections.ConfigDict:
  """configs/stllm_7b.py (the QA recipe) with `shapes.llm_layers` LLaMA layers on random batches, one device,
  no accumulation; with `smoke` the towers are tiny (SMOKE_ARCHITECTURE, one adapter layer pair)."""
  config = configlib.load_config_file(os.path.join(CONFIGS, 'stllm_7b.py'))
  if smoke:
    for tower, fields in SMOKE_ARCHITECTURE.items():
      config.model[tower].update(fields)
    config.model.vision.bt_adapter.update(depth=1, max_frames=shapes.frames)
  config.model.llm.num_layers = shapes.llm_layers
  config.mesh = 'fsdp=1'
  config.init.checkpoint = ''
  config.train.update(batch_size=shapes.batch, grad_accum_steps=1, steps=shapes.steps)
  config.data = defaults.random_data(num_frames=shapes.frames, text_buckets=(shapes.text_len,),
                                     qformer_text_len=shapes.qformer_text_len)
  return config


def variant_config(config: ml_collections.ConfigDict, attention: str, remat: str) -> ml_collections.ConfigDict:
  variant = config.copy_and_resolve_references()
  variant.model.attention_impl = attention
  variant.model.llm.remat_policy = remat
  return variant


def decode_llm_config(smoke: bool) -> LlamaConfig:
  """Vicuna-7B (the defaults) with bf16 weights; tiny with `smoke`."""
  return LlamaConfig(**(SMOKE_ARCHITECTURE['llm'] if smoke else {}), param_dtype='bfloat16')


# ----------------------------------------------------------------------------------------- budget


@dataclasses.dataclass
class Budget:
  """A global deadline and what each part is expected to take (updated by what it took)."""
  deadline_s: float
  began: float = dataclasses.field(default_factory=time.perf_counter)
  estimates: dict[str, float] = dataclasses.field(default_factory=lambda: dict(H100_ESTIMATE_S))

  def left_s(self) -> float:
    return self.deadline_s - (time.perf_counter() - self.began)

  def run(self, part: str, fn: Callable[[], dict]) -> dict:
    """fn()'s measurements and its wall time; {'skipped': why} when the part's estimate no longer fits in what is
    left, {'error': what went wrong} when it raises."""
    left, need = self.left_s(), self.estimates[part]
    if left < need:
      return {'skipped': f'{left:.0f} s left of the {self.deadline_s:.0f} s deadline, {part} needs about {need:.0f} s'}
    began = time.perf_counter()
    try:
      result = fn()
    except Exception as error:  # pylint: disable=broad-except  # one failing part must not end the session's report
      result = {'error': one_line(error)}
    self.estimates[part] = time.perf_counter() - began
    return {**result, 'wall_s': self.estimates[part]}


def keep_params(held: dict, make: Callable[[], Any]) -> dict:
  """held['params'] = make(): a part whose only measurement is its wall time."""
  held['params'] = make()
  return {}


def one_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0] if text else ""}'[:400]


# ----------------------------------------------------------------------------------------- parity


def logits_parity(config: ml_collections.ConfigDict, params: Any, batch: dict[str, np.ndarray]) -> dict:
  """bf16 logits (XLA, then cuDNN attention) against float32 ones, same params, over the real positions."""
  forward = lambda attention, dtype: jax.jit(stllm.STLLM(model_variant(config, attention, dtype)).apply)
  with jax.default_matmul_precision('highest'):  # float32 matmuls as float32 (GPUs default to TF32)
    reference = forward('xla', 'float32')({'params': params}, batch)  # [1, Nv + L, V]
  real = np.concatenate([np.ones((1, reference.shape[1] - batch['attention_mask'].shape[1]), bool),
                         batch['attention_mask'].astype(bool)], axis=1)  # [1, Nv + L]
  result = {'positions': int(real.sum())}
  for attention in ('xla', 'cudnn'):
    try:
      logits = forward(attention, 'bfloat16')({'params': params}, batch)
      result[f'bf16_{attention}'] = compare_logits(logits, reference, real)
    except Exception as error:  # pylint: disable=broad-except  # e.g. no cuDNN here: the other row still counts
      result[f'bf16_{attention}'] = {'error': one_line(error)}
  return result


def model_variant(config: ml_collections.ConfigDict, attention: str, dtype: str) -> stllm.STLLMConfig:
  model = config.model.copy_and_resolve_references()
  model.update(attention_impl=attention, dtype=dtype)
  return stllm.model_config(model)


def compare_logits(logits: jax.Array, reference: jax.Array, real: np.ndarray) -> dict:
  """Relative L2 error and top-1 agreement of logits [B, L, V] against reference, at the `real` [B, L] positions."""
  logits, reference = np.asarray(logits, np.float64)[real], np.asarray(reference, np.float64)[real]  # [n, V]
  return {'relative_error': float(np.linalg.norm(logits - reference) / np.linalg.norm(reference)),
          'top1_agreement': float(np.mean(logits.argmax(-1) == reference.argmax(-1)))}


# ----------------------------------------------------------------------------------------- train


def train_variant(config: ml_collections.ConfigDict, held: dict, host_batch: dict[str, np.ndarray], steps: int) -> dict:
  """`steps` train steps of `config` on one batch from held['params'], which then holds the params after them.

  The train state takes over the trainable params (the steps donate it): no second copy stays on the device.
  """
  trainer = trainer_from_params(config, held['params'])
  held['params'] = None
  try:
    times, losses, plan = timed_steps(trainer, host_batch, steps)
  finally:
    held['params'] = params_lib.merge_params(trainer.state.params, trainer.frozen)
  model_cfg, train_cfg = trainer.model_cfg, trainer.train_cfg
  spread = report.spread(times[1:])  # the first step compiles
  model_flops = step_flops(model_cfg, train_cfg, host_batch, plan.n_slots)['total']
  tokens = host_batch['frames'].shape[0] * (plan.n_keep + host_batch['input_ids'].shape[1])
  peak = devices.describe()['peak_bf16_tflops']
  result = {'step_time': spread, 'first_step_s': times[0], 'compile_s': times[0] - spread['median_s'],
            'tokens_per_step': tokens, 'tokens_per_s': tokens / spread['median_s'], 'flops_per_step': model_flops,
            'n_keep': plan.n_keep, 'n_slots': plan.n_slots, 'losses': losses,
            **flops.achieved(model_flops, spread['median_s'], peak)}
  return result


def timed_steps(trainer: JaxTrainer, host_batch: dict[str, np.ndarray], steps: int
                ) -> tuple[list[float], list[float], masking.MaskPlan]:
  """(seconds of each step, its loss, the masking all of them use: one fixed rate, so one program)."""
  num_visual = trainer.model_cfg.num_visual_tokens(host_batch['frames'].shape[1])
  plan = masking.fixed_rate_plan(MASK_RATE, num_visual, trainer.train_cfg.masking)
  times, losses = [], []
  for _ in range(steps):
    began = time.perf_counter()
    metrics = trainer(host_batch, plan)
    times.append(time.perf_counter() - began)
    losses.append(float(metrics['loss']))
  return times, losses, plan


def run_train(budget: Budget, config: ml_collections.ConfigDict, held: dict, host_batch: dict,
              variants: tuple[tuple[str, str], ...], steps: int, results: list[dict]) -> None:
  """Each (attention, remat) variant in turn from held['params'], appending to `results`."""
  for attention, remat in variants:
    measure = lambda a=attention, r=remat: train_variant(variant_config(config, a, r), held, host_batch, steps)
    results.append({'attention': attention, 'remat': remat, **budget.run('train', measure)})
    gc.collect()  # the finished variant's optimizer state leaves the device before the next one's


# ----------------------------------------------------------------------------------------- decode


def decode_params(llm_cfg: LlamaConfig) -> Any:
  """Random bf16 LLM weights, created on the device by one jitted init (nothing on the host)."""
  ids = jnp.zeros((1, 1), jnp.int32)
  init = lambda key: nn.meta.unbox(Llama(llm_cfg, jnp.bfloat16).init(key, ids, ids + 1, method='forward_ids'))
  return jax.jit(init)(jax.random.key(0))['params']


def weight_bytes_per_token(params: Any) -> int:
  """Bytes of weights one decode step reads: every parameter but the input embedding table (one row of it)."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  return sum(leaf.size * leaf.dtype.itemsize for path, leaf in leaves if 'embed' not in jax.tree_util.keystr(path))


def decode_rate(llm_cfg: LlamaConfig, params: Any, batch: int, prefix_len: int, shapes: Shapes) -> dict:
  """Greedy decode tokens/s at `batch` after `prefix_len` random embeddings (made on the device)."""
  llm = Llama(llm_cfg, jnp.bfloat16)
  embeddings = jax.jit(lambda key: 0.02 * jax.random.normal(key, (batch, prefix_len, llm_cfg.width), jnp.bfloat16))(
      jax.random.key(1))  # [B, P, D]
  mask = jnp.ones((batch, prefix_len), jnp.int32)
  ids = generate.SpecialIds(eos=generate_bench.EOS, pad=generate_bench.PAD)

  def generator(new_tokens: int) -> Callable[[], Any]:
    config = generate.GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, stop_strings=())
    decode = jax.jit(functools.partial(generate.decode, llm, config=config, ids=ids))
    return lambda: jax.block_until_ready(decode(params, embeddings, mask, jax.random.key(2)))

  first_1, times_1 = generate_bench.timed(generator(1), shapes.repeats)
  first_n, times_n = generate_bench.timed(generator(shapes.new_tokens), shapes.repeats)
  rates = generate_bench.rates(first_1, times_1, first_n, times_n, batch, shapes.new_tokens)
  weight_bytes = weight_bytes_per_token(params)
  bandwidth = devices.describe()['hbm_bandwidth_gbps']
  limit = batch * bandwidth * 1e9 / weight_bytes if bandwidth else None
  kv_bytes = (2 * llm_cfg.num_layers * batch * (prefix_len + shapes.new_tokens // 2) * llm_cfg.num_kv_heads
              * llm_cfg.attention_head_dim * 2)  # keys and values read per step, at the mean decode position
  measured = rates['decode_tokens_per_s']
  return {'batch': batch, 'prefix_len': prefix_len, **rates, 'weight_bytes_per_token': weight_bytes,
          'kv_cache_bytes_per_step': kv_bytes, 'bandwidth_limit_tokens_per_s': limit,
          'fraction_of_limit': measured / limit if measured and limit else None}


def run_decode(budget: Budget, llm_cfg: LlamaConfig, prefix_len: int, shapes: Shapes, results: list[dict]) -> None:
  """The LLM's params on the device, then decode rates at each of DECODE_BATCHES, appended to `results`."""
  held = {}
  made = budget.run('decode_params', lambda: keep_params(held, lambda: decode_params(llm_cfg)))
  if 'params' not in held:
    results.append({'batch': ', '.join(map(str, DECODE_BATCHES)), **made})
    return
  for batch in DECODE_BATCHES:
    results.append({'batch': batch, **budget.run('decode', lambda b=batch: decode_rate(
        llm_cfg, held['params'], b, prefix_len, shapes))})


# ----------------------------------------------------------------------------------------- the report


def run(out_dir: str, smoke: bool, deadline_s: float) -> dict[str, Any]:
  """Every part within `deadline_s`; writes DIR/gpu_report.json after each part and returns the result."""
  budget = Budget(deadline_s)
  shapes = SMOKE if smoke else REAL
  config = slice_config(shapes, smoke)
  model_cfg, _ = validated(config)
  llm_cfg = decode_llm_config(smoke)
  prefix_len = model_cfg.num_visual_tokens(shapes.frames) + shapes.prompt_len
  result = {'command': 'gpu-report', 'smoke': smoke, 'device': devices.describe(), 'shapes': dataclasses.asdict(shapes),
            'deadline_s': deadline_s, 'slice': slice_summary(model_cfg, shapes),
            'decode_model': {'layers': llm_cfg.num_layers, 'width': llm_cfg.width, 'prefix_len': prefix_len,
                             'new_tokens': shapes.new_tokens},
            'parity': {}, 'train': [], 'decode': []}
  path = os.path.join(out_dir, 'gpu_report.json')
  save = lambda: report.write_json({**result, 'elapsed_s': time.perf_counter() - budget.began,
                                    'peak_memory_bytes': devices.peak_memory_bytes()}, path)
  host_batch = next(RandomBatches(config.data, model_cfg, shapes.batch))
  held = {}  # the slice's params: the train states take them over in turn
  result['slice_params'] = budget.run('slice', lambda: keep_params(
      held, lambda: stllm.init_params(model_cfg, jax.random.key(config.seed))))
  if 'params' in held:
    parity_batch = {k: v[:1] for k, v in host_batch.items() if k in stllm.BATCH_KEYS}
    result['parity'] = budget.run('parity', lambda: logits_parity(config, held['params'], parity_batch))
    save()
    run_train(budget, config, held, host_batch, TRAIN_VARIANTS[:2], shapes.steps, result['train'])
    save()
    run_decode(budget, llm_cfg, prefix_len, shapes, result['decode'])
    save()
    run_train(budget, config, held, host_batch, TRAIN_VARIANTS[2:], shapes.steps, result['train'])
    held.clear()
  result['elapsed_s'] = time.perf_counter() - budget.began
  result['peak_memory_bytes'] = devices.peak_memory_bytes()
  save()
  return result


def slice_summary(model_cfg: stllm.STLLMConfig, shapes: Shapes) -> dict:
  num_visual = model_cfg.num_visual_tokens(shapes.frames)
  return {'llm_layers': model_cfg.llm.num_layers, 'llm_width': model_cfg.llm.width,
          'vit_depth': model_cfg.vision.depth, 'vit_width': model_cfg.vision.width,
          'bt_adapter_depth': model_cfg.vision.bt_adapter.depth, 'frames': shapes.frames, 'visual_tokens': num_visual,
          'mask_rate': MASK_RATE, 'text_len': shapes.text_len, 'qformer_text_len': shapes.qformer_text_len,
          'batch': shapes.batch, 'dtype': model_cfg.dtype, 'param_dtype': model_cfg.llm.param_dtype}


def table(result: dict[str, Any]) -> str:
  """The report as one markdown table: parity, train variants, decode, time."""
  d, s = result['device'], result['slice']
  peak = f"{d['peak_bf16_tflops']:,.0f} TFLOP/s" if d['peak_bf16_tflops'] else 'n/a'
  bandwidth = f"{d['hbm_bandwidth_gbps']:,.0f} GB/s" if d['hbm_bandwidth_gbps'] else 'n/a'
  rows = [('device', f"{d['device_kind']} ({d['platform']}; bf16 peak {peak}, HBM {bandwidth})"),
          ('train slice', f"QA recipe (configs/stllm_7b.py) with LLaMA {s['llm_layers']} x {s['llm_width']} "
                          f"(layers x width); EVA-ViT {s['vit_depth']} x {s['vit_width']} + BT-Adapter "
                          f"{s['bt_adapter_depth']}; {s['frames']} frames ({s['visual_tokens']} visual tokens, mask rate "
                          f"{s['mask_rate']}), text {s['text_len']}, Q-Former text {s['qformer_text_len']}, batch "
                          f"{s['batch']}, MVM on, {s['dtype']} compute, {s['param_dtype']} params"
                          + (' (smoke shapes)' if result['smoke'] else ''))]
  rows.append(('slice params made on the device', _not_measured(result['slice_params'])
               or f"in {result['slice_params']['wall_s']:.0f} s (jitted init)"))
  parity = result['parity']
  for attention in ('xla', 'cudnn'):
    rows.append((f'logits, bf16 with {attention} attention vs float32', _parity_text(parity, f'bf16_{attention}')))
  for r in result['train']:
    rows.append((f"train step, {r['attention']} attention, LLM remat {r['remat']}", _train_text(r)))
  m = result['decode_model']
  for r in result['decode']:
    rows.append((f"decode, LLaMA {m['layers']} x {m['width']} bf16, batch {r['batch']}", _decode_text(r)))
  memory = result.get('peak_memory_bytes')
  rows += [('peak device memory', report.gib(memory) if memory is not None else 'n/a (no memory_stats on this platform)'),
           ('wall time', f"{result['elapsed_s']:.0f} s (deadline {result['deadline_s']:.0f} s)")]
  return report.markdown_table(rows)


def _not_measured(r: dict) -> str | None:
  if 'skipped' in r:
    return f"skipped: {r['skipped']}"
  if 'error' in r:
    return f"failed: {r['error']}"
  return None


def _parity_text(parity: dict, key: str) -> str:
  outcome = _not_measured(parity) or (key not in parity and 'not run')
  if outcome:
    return outcome
  r = parity[key]
  return _not_measured(r) or (f"relative error {r['relative_error']:.2e}, top-1 agreement "
                              f"{100 * r['top1_agreement']:.1f} % ({parity['positions']} positions)")


def _train_text(r: dict) -> str:
  outcome = _not_measured(r)
  if outcome:
    return outcome
  s = r['step_time']
  mfu = 'n/a' if r['mfu'] is None else f"{100 * r['mfu']:.1f} %"
  return (f"{report.ms(s['median_s'])} median (p10 {report.ms(s['p10_s'])} / p90 {report.ms(s['p90_s'])}, "
          f"n={s['n']}), {report.rate(r['tokens_per_s'], 'tokens/s')}, {r['tflops_per_s']:.2f} TFLOP/s, MFU {mfu}, "
          f"compile {r['compile_s']:.0f} s")


def _decode_text(r: dict) -> str:
  outcome = _not_measured(r)
  if outcome:
    return outcome
  measured = report.rate(r['decode_tokens_per_s'], 'tokens/s')
  weights = f"{r['weight_bytes_per_token'] / 1e9:.2f} GB of weights per step"
  if r['bandwidth_limit_tokens_per_s'] is None:
    return f'{measured}; bandwidth limit n/a (no HBM bandwidth for this device; {weights})'
  fraction = 'n/a' if r['fraction_of_limit'] is None else f"{100 * r['fraction_of_limit']:.0f} %"
  return (f"{measured} = {fraction} of the HBM limit {r['bandwidth_limit_tokens_per_s']:,.0f} tokens/s ({weights}; "
          f"the KV cache adds {r['kv_cache_bytes_per_step'] / 1e9:.2f} GB per step)")
