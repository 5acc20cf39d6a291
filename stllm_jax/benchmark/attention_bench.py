"""`python -m stllm_jax.benchmark attention`: the attention implementations of `layers.attention` side by side.

Times one attention call, forward and backward (the gradient of a scalar of its output with respect to queries,
keys and values), for each implementation that can run here ('explicit' and jax.nn's 'xla' everywhere, 'cudnn'
on NVIDIA GPUs in bfloat16 / float16), alternating them round by round so that a host whose speed drifts treats
them alike. This is how `model.attention_impl='auto'` was chosen on CPUs (BENCHMARK.md, "Attention and RoPE on
CPUs"); it answers the same question on another machine.
"""

from __future__ import annotations

import time
from typing import Any

from stllm_jax.errors import UserError

MASKS = ('none', 'causal', 'padding')  # nothing; causal + key lengths (LLM training); key padding (Q-Former)


def parse_shape(text: str) -> tuple[int, int, int, int]:
  """'8,192,8,64' -> (batch, tokens, heads, head_dim)."""
  try:
    shape = tuple(int(v) for v in text.split(','))
  except ValueError:
    shape = ()
  if len(shape) != 4 or min(shape) < 1:
    raise UserError(f'--shape {text!r}: give batch,tokens,heads,head_dim as four positive integers, e.g. 8,192,8,64')
  return shape


def attention_mask(kind: str, batch: int, tokens: int) -> Any:
  """The mask a tower builds for `kind`, over rows whose last eighth is padding."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from stllm_jax.models import llama  # pylint: disable=g-import-not-at-top
  from stllm_jax.models.layers import AttentionMask  # pylint: disable=g-import-not-at-top
  if kind == 'none':
    return None
  real = jnp.broadcast_to(jnp.arange(tokens) < tokens - tokens // 8, (batch, tokens)).astype(jnp.int32)  # [B, T]
  if kind == 'causal':
    return llama.causal_mask(real, padding_last=True)  # as the LLM trains: causal + key lengths
  return AttentionMask(key_mask=real)  # as the Q-Former's text padding


def implementations(query: Any) -> list[str]:
  """'explicit' and 'xla', and 'cudnn' where `layers.check_cudnn` accepts `query` on this machine."""
  from stllm_jax.models import layers  # pylint: disable=g-import-not-at-top
  try:
    layers.check_cudnn(query)
  except ValueError:
    return ['explicit', 'xla']
  return ['explicit', 'xla', 'cudnn']


def run(shape: tuple[int, int, int, int], mask: str, dtype: str, rounds: int, min_round_s: float) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from stllm_jax.benchmark import devices, report  # pylint: disable=g-import-not-at-top
  from stllm_jax.models import layers  # pylint: disable=g-import-not-at-top
  if rounds < 1:
    raise UserError(f'--rounds {rounds}: give at least 1')
  batch, tokens, heads, head_dim = shape
  keys = jax.random.split(jax.random.key(0), 3)
  query, key, value = (jax.random.normal(k, shape, layers.as_dtype(dtype)) for k in keys)
  attention_mask_ = attention_mask(mask, batch, tokens)
  steps = {}
  for name in implementations(query):
    loss = lambda q, k, v, name=name: jnp.sum(jnp.tanh(layers.attention(q, k, v, attention_mask_, name)
                                                       .astype(jnp.float32)))
    steps[name] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    jax.block_until_ready(steps[name](query, key, value))  # compile
  calls = {}
  for name, step in steps.items():  # calls per timing so that one lasts about min_round_s
    start = time.perf_counter()
    jax.block_until_ready(step(query, key, value))
    calls[name] = max(1, int(min_round_s / max(time.perf_counter() - start, 1e-6)))
  seconds = {name: [] for name in steps}
  for _ in range(rounds):
    for name, step in steps.items():
      start = time.perf_counter()
      for _ in range(calls[name]):
        out = step(query, key, value)
      jax.block_until_ready(out)
      seconds[name].append((time.perf_counter() - start) / calls[name])
  timings = {name: report.spread(s) for name, s in seconds.items()}
  fastest = min(timings, key=lambda name: timings[name]['median_s'])
  return {'command': 'attention', 'device': devices.describe(), 'shape': list(shape), 'mask': mask, 'dtype': dtype,
          'rounds': rounds, 'calls_per_round': calls, 'forward_backward': timings, 'fastest': fastest,
          'flops_per_call': 12 * batch * heads * tokens * tokens * head_dim}  # q.k and p.v; 4 more in the backward


def table(result: dict) -> str:
  from stllm_jax.benchmark import devices, report  # pylint: disable=g-import-not-at-top
  b, t, h, d = result['shape']
  device = result['device']
  where = f"{device['platform']} x{device['device_count']} ({devices.describe_host(device)})"
  best = result['forward_backward'][result['fastest']]['median_s']
  rows = []
  for name, spread in result['forward_backward'].items():
    rows.append((name, report.ms(spread['median_s']), f"{report.ms(spread['p10_s'])} / {report.ms(spread['p90_s'])}",
                 f"{result['flops_per_call'] / spread['median_s'] / 1e9:,.1f} GFLOP/s",
                 f"{spread['median_s'] / best:.2f}"))
  header = ('implementation', 'forward + backward, median', 'p10 / p90', 'attention matmuls', 'vs fastest')
  return (f'{where}; batch {b}, {t} tokens, {h} heads of {d}, mask {result["mask"]}, {result["dtype"]}; '
          f'{result["rounds"]} alternating rounds\n\n' + report.markdown_columns(header, rows))
