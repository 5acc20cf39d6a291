"""`benchmark generate`: greedy decoding after a [visual tokens : prompt] prefix, with random weights.

Both sides start from the same prefix shape, given as embeddings (B x P x D, P = frames x K + prompt
length; the vision towers are not part of this benchmark), generate exactly N tokens (EOS banned before N)
and are timed end to end for N new tokens and for 1:
    prefill latency      = time(1 new token)          (prefix through the LLM, first token)
    decode tokens/s      = B x (N - 1) / (time(N) - time(1))
JAX: generate.decode, the whole loop in one jit (compile time measured on the first calls, reported apart).
PyTorch: LlamaForCausalLM.generate(inputs_embeds, do_sample=False, min_new_tokens = max_new_tokens).
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any, Callable

import jax
import numpy as np

from stllm_jax import generate
from stllm_jax.benchmark import devices, flops, report
from stllm_jax.convert import hf
from stllm_jax.models import layers
from stllm_jax.models.llama import Llama
from stllm_jax.models.stllm import STLLMConfig

EOS, PAD = 2, 0


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
  """(first call's seconds, the next `repeats` calls' seconds)."""
  began = time.perf_counter()
  fn()
  first = time.perf_counter() - began
  times = []
  for _ in range(repeats):
    began = time.perf_counter()
    fn()
    times.append(time.perf_counter() - began)
  return first, times


def jax_generator(model_cfg: STLLMConfig, params: Any, embeddings: np.ndarray, new_tokens: int) -> Callable:
  llm = Llama(model_cfg.llm, layers.as_dtype(model_cfg.dtype))
  config = generate.GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, stop_strings=())
  ids = generate.SpecialIds(eos=EOS, pad=PAD)
  decode = jax.jit(functools.partial(generate.decode, llm, config=config, ids=ids))
  mask = np.ones(embeddings.shape[:2], np.int32)
  key = jax.random.key(0)
  return lambda: jax.block_until_ready(decode(params, embeddings, mask, key))


def torch_generator(model_cfg: STLLMConfig, embeddings: np.ndarray, new_tokens: int, threads: int) -> Callable:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  config = transformers.LlamaConfig(**{k: v for k, v in hf.hf_llama_config(model_cfg.llm).items() if k != 'model_type'})
  dtype = torch.bfloat16 if model_cfg.dtype == 'bfloat16' else torch.float32
  lm = transformers.LlamaForCausalLM(config).to(dtype).eval()
  embeds = torch.from_numpy(embeddings).to(dtype)
  mask = torch.ones(embeddings.shape[:2], dtype=torch.long)

  def run():
    with torch.no_grad():
      out = lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens, do_sample=False, num_beams=1, eos_token_id=EOS, pad_token_id=PAD)
    assert out.shape[1] == new_tokens, out.shape
  return run


def rates(first_1: float, times_1: list[float], first_n: float, times_n: list[float], batch: int,
          new_tokens: int) -> dict[str, Any]:
  prefill_s, total_s = float(np.median(times_1)), float(np.median(times_n))
  decode_s = total_s - prefill_s
  return {'prefill_s': prefill_s, 'total_s': total_s, 'prefill_spread': report.spread(times_1),
          'total_spread': report.spread(times_n),
          'decode_tokens_per_s': batch * (new_tokens - 1) / decode_s if decode_s > 0 else None,
          'first_calls_s': {'one_token': first_1, 'n_tokens': first_n}}


def run(config: Any, *, frames: int, new_tokens: int, batch: int, prompt_len: int, repeats: int,
        against: str | None, threads: int | None = None) -> dict[str, Any]:
  from stllm_jax.benchmark.train_bench import validated  # pylint: disable=g-import-not-at-top
  from stllm_jax.models import stllm  # pylint: disable=g-import-not-at-top
  model_cfg, _ = validated(config)
  threads = threads or len(os.sched_getaffinity(0))
  prefix = model_cfg.num_visual_tokens(frames) + prompt_len
  embeddings = (0.02 * np.random.default_rng(0).standard_normal((batch, prefix, model_cfg.llm.width))).astype(np.float32)
  params = stllm.init_params(model_cfg, jax.random.key(config.seed))['llm']
  measured = {}
  for name, make in (('jax', lambda n: jax_generator(model_cfg, params, embeddings, n)),
                     ('torch', lambda n: torch_generator(model_cfg, embeddings, n, threads))):
    if name == 'torch' and against != 'torch':
      continue
    first_1, times_1 = timed(make(1), repeats)
    first_n, times_n = timed(make(new_tokens), repeats)
    measured[name] = rates(first_1, times_1, first_n, times_n, batch, new_tokens)
  jax_side = measured['jax']
  jax_side['compile_s'] = (jax_side['first_calls_s']['one_token'] - jax_side['prefill_s']
                           + jax_side['first_calls_s']['n_tokens'] - jax_side['total_s'])
  result = {'command': 'generate', 'device': devices.describe(),
            'setup': {'batch': batch, 'frames': frames, 'prefix_len': prefix, 'prompt_len': prompt_len,
                      'new_tokens': new_tokens, 'repeats': repeats, 'dtype': model_cfg.dtype,
                      'torch_threads': threads if against else None},
            'prefill_flops': flops.prefill_flops(model_cfg, batch, prefix), **measured}
  if 'torch' in measured:  # None where time(N) <= time(1): too few tokens for the timer's noise
    both = measured['torch']['decode_tokens_per_s'] and jax_side['decode_tokens_per_s']
    result['decode_speedup_over_torch'] = (jax_side['decode_tokens_per_s'] / measured['torch']['decode_tokens_per_s']
                                           if both else None)
    result['prefill_speedup_over_torch'] = measured['torch']['prefill_s'] / jax_side['prefill_s']
  return result


def table(result: dict[str, Any]) -> str:
  rows = [('device', f"{result['device']['device_kind']} ({devices.describe_host(result['device'])})"),
          ('setup', ', '.join(f'{k}={v}' for k, v in result['setup'].items() if v is not None))]
  for name in ('jax', 'torch'):
    if name in result:
      side = result[name]
      label = 'stllm_jax' if name == 'jax' else 'Hugging Face generate'
      rows += [(f'{label}: prefill latency (1 new token)', report.ms(side['prefill_s'])),
               (f'{label}: decode', report.rate(side['decode_tokens_per_s'], 'tokens/s'))]
  rows.append(('stllm_jax compile (first calls minus steady)', report.ms(result['jax']['compile_s'])))
  if 'decode_speedup_over_torch' in result:
    speedup = result['decode_speedup_over_torch']
    rows += [('decode tokens/s, stllm_jax / Hugging Face',
              'n/a (time(N) <= time(1): use more --new-tokens)' if speedup is None else f'{speedup:.2f}x'),
             ('prefill latency, Hugging Face / stllm_jax', f"{result['prefill_speedup_over_torch']:.2f}x")]
  return report.markdown_table(rows)
