"""Generation: prefill `[V : prompt]` into a static-size KV cache, then decode, the whole loop in one jit.

    requests (frames, Q-Former text, prompt ids) --visual_tokens (per video)--> V [Nv, D]
      --left-padded prefix [pad... V prompt] [B, P] (P from a bucket)--> prefill into KVCache(S = P + N)
      --decode loop (lax.while_loop: greedy | sampling | beam search)--> token ids [B, N]
      --decode text, cut at the stop string--> answers

Prefixes are left-padded: every row's last prompt token sits in slot P - 1, so all rows decode into the
same cache slot; positions count real tokens only (visual tokens start at position 0), and padding is
masked as a key. A padded batch therefore computes what each sample computes alone.

The decode loop follows Hugging Face `generate` semantics (checked against it in tests/test_generate.py):
  greedy / sampling: repetition penalty on the logits of tokens generated so far (scores < 0 are multiplied,
    others divided), then temperature, top-k, top-p; a row stops at EOS or at a stop sequence, later
    slots hold the pad id.
  beam search: log-softmax, then the repetition penalty on the log-probs; 2 x beams candidates per step;
    a candidate ending in EOS (or a stop sequence, or at max_new_tokens) is scored sum(log p) / length ** length_penalty
    and kept among the `num_beams` best finished; HF's default early-stopping heuristic ends the search.
Only generated tokens count for the repetition penalty (as in Hugging Face generate given inputs_embeds only,
which is how the original calls it). With `context_limit`, a longer context loses its first (visual) tokens before
anything runs, as the released chat and QA scripts cut theirs; the cut is returned, never silent.

API
    GenerationConfig                         decoding settings (frozen, hashable: part of the jit key)
    context_cut(tokens, config)              how many first tokens a context loses to config.context_limit
    sample(...), beam_search(...)            the two loops `decode` dispatches to (num_beams 1 / > 1)
    SpecialIds(eos, pad, stop_sequences)     token ids the loop needs; special_ids(tokenizer, stop_strings)
    decode(llm, llm_params, embeddings, mask, rng, config, ids) -> (tokens [B, N], lengths [B])   (pure, jittable)
    VideoGenerator(model_config, params, llm_tokenizer, qformer_tokenizer)
        .generate(requests, config, seed, on_tokens=None) -> (list[Generation], GenerationStats)

Streaming: given `on_step`, the loops call it on the host after every step (a `jax.debug.callback` inside the
loop) with the step count and the ids so far; `VideoGenerator.generate(..., on_tokens=f)` compiles that variant
once per shape bucket beside the silent one, and hands `f` each request's ids so far (beam search: the best open
beam's, which a later step may replace). Without it nothing is called and the program is the silent one.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from stllm_jax.data import conversation
from stllm_jax.models import layers, stllm
from stllm_jax.models.layers import Array
from stllm_jax.models.llama import KVCache, Llama, init_cache

NEG_INF = -1.0e9  # what Hugging Face's beam search adds to rule a candidate out
PREFIX_BUCKET = 128  # prompt lengths (visual + text) are rounded up to a multiple of this
# Host side of streaming: (steps done, ids [B, N] of which the first `steps` per row are generated so far).
StepCallback = Callable[[Any, Any], None]


# ----------------------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  max_new_tokens: int = 100
  num_beams: int = 1  # 1: greedy or sampling; > 1: beam search
  do_sample: bool = False
  temperature: float = 1.0
  top_k: int = 0  # 0 = off
  top_p: float = 1.0
  repetition_penalty: float = 1.0  # 1.0 = off
  length_penalty: float = 1.0  # beam search: score = sum(log p) / length ** length_penalty
  min_new_tokens: int = 0  # EOS is banned before this many tokens
  stop_strings: tuple[str, ...] = (conversation.SEPARATOR,)
  # > 0: a context (visual + text tokens) longer than context_limit - max_new_tokens loses its first tokens (visual
  # ones), as the released chat and QA scripts' max_length=2000 cuts it; `Generation.context_cut` says how many.
  context_limit: int = 0

  def validate(self) -> None:
    if self.max_new_tokens < 1:
      raise ValueError(f'max_new_tokens must be >= 1, got {self.max_new_tokens}')
    if self.num_beams < 1:
      raise ValueError(f'num_beams must be >= 1, got {self.num_beams}')
    if self.num_beams > 1 and self.do_sample:
      raise ValueError('beam search with sampling is not supported: use num_beams=1 with do_sample')
    if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
      raise ValueError(f'need temperature > 0, 0 < top_p <= 1, top_k >= 0; got {self.temperature}, {self.top_p}, '
                       f'{self.top_k}')
    if self.repetition_penalty <= 0:
      raise ValueError(f'repetition_penalty must be > 0, got {self.repetition_penalty}')
    if self.context_limit < 0 or 0 < self.context_limit <= self.max_new_tokens:
      raise ValueError(f'context_limit must be 0 (no cut) or more than max_new_tokens={self.max_new_tokens}, got '
                       f'{self.context_limit}')


def context_cut(context_tokens: int, config: GenerationConfig) -> int:
  """Tokens the released scripts drop from the start of a context of `context_tokens` (visual + text): those past
  context_limit - max_new_tokens (none without a limit)."""
  if not config.context_limit:
    return 0
  return max(0, context_tokens + config.max_new_tokens - config.context_limit)


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  eos: int
  pad: int
  stop_sequences: tuple[tuple[int, ...], ...] = ()  # a row stops when its last tokens equal one of these


def stop_token_sequences(tokenizer, stop_strings: Sequence[str]) -> tuple[tuple[int, ...], ...]:
  """Token sequences that spell each stop string, alone or glued to what precedes it ('###' is one token
  in Vicuna, or '##' + '#'). The text is cut at the stop string afterwards anyway: these only end the loop early."""
  found = set()
  for stop in stop_strings:
    for context in ('', ' ', '\n', '.', 'a', ')'):
      ids = tokenizer(context + stop, add_special_tokens=False)['input_ids']
      for start in range(len(ids) - 1, -1, -1):  # the shortest suffix that still spells the stop string
        if stop in tokenizer.decode(ids[start:]):
          found.add(tuple(ids[start:]))
          break
  return tuple(sorted(found))


def special_ids(tokenizer, stop_strings: Sequence[str] = (conversation.SEPARATOR,)) -> SpecialIds:
  return SpecialIds(eos=tokenizer.convert_tokens_to_ids(conversation.EOS_TOKEN), pad=tokenizer.pad_token_id,
                    stop_sequences=stop_token_sequences(tokenizer, stop_strings))


# ----------------------------------------------------------------------------------------- the LLM


def prefill(llm: Llama, params: Any, embeddings: Array, mask: Array, cache_length: int
            ) -> tuple[Array, KVCache, Array, Array]:
  """Left-padded prefix embeddings [B, P, D], mask [B, P] -> (logits of the last slot [B, V], cache,
  slot mask [B, S], position of the next token [B])."""
  batch, length = mask.shape
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)  # real tokens count from 0
  slot_mask = jnp.zeros((batch, cache_length), jnp.int32).at[:, :length].set(mask)
  cache = init_cache(llm.config, batch, cache_length, llm.dtype)
  hidden, cache = llm.apply({'params': params}, embeddings, slot_mask, positions, cache)
  logits = llm.apply({'params': params}, hidden[:, -1:], method='logits')[:, 0]
  return logits, cache, slot_mask, positions[:, -1] + 1


def decode_step(llm: Llama, params: Any, tokens: Array, slot_mask: Array, positions: Array, cache: KVCache
                ) -> tuple[Array, KVCache]:
  """One token per row (ids [B], at `positions` [B]) into the cache -> (next logits [B, V], cache)."""
  embeddings = llm.apply({'params': params}, tokens[:, None], method='embed_tokens')
  hidden, cache = llm.apply({'params': params}, embeddings, slot_mask, positions[:, None], cache)
  return llm.apply({'params': params}, hidden, method='logits')[:, 0], cache


# ----------------------------------------------------------------------------------------- score processing


def apply_repetition_penalty(scores: Array, seen: Array, penalty: float) -> Array:
  """Scores of tokens already generated (`seen` bool [B, V]) lose: negative ones x penalty, others / penalty."""
  if penalty == 1.0:
    return scores
  penalised = jnp.where(scores < 0, scores * penalty, scores / penalty)
  return jnp.where(seen, penalised, scores)


def ban_eos_before(scores: Array, step: Array, min_new_tokens: int, eos: int) -> Array:
  if min_new_tokens <= 0:
    return scores
  return scores.at[:, eos].set(jnp.where(step < min_new_tokens, -jnp.inf, scores[:, eos]))


def top_k_top_p_filter(logits: Array, top_k: int, top_p: float) -> Array:
  """Logits outside the top k, and outside the smallest set whose probability reaches top_p, become -inf."""
  if top_k > 0:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_probs = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), order, axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # [B, V], 0 for the most likely token
    keep_sorted = mass_before < top_p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return logits


def ends_with_stop(window: Array, stop_sequences: tuple[tuple[int, ...], ...]) -> Array:
  """window int [..., M]: the last M tokens (-1 before the first) -> bool [...]: it ends with a stop sequence."""
  hit = jnp.zeros(window.shape[:-1], bool)
  for sequence in stop_sequences:
    tail = window[..., window.shape[-1] - len(sequence):]
    hit |= jnp.all(tail == jnp.asarray(sequence, window.dtype), axis=-1)
  return hit


def _window_size(ids: SpecialIds) -> int:
  return max([len(s) for s in ids.stop_sequences] + [1])


# ----------------------------------------------------------------------------------------- decode loops


def decode(llm: Llama, params: Any, embeddings: Array, mask: Array, rng: Array, config: GenerationConfig,
           ids: SpecialIds, on_step: StepCallback | None = None) -> tuple[Array, Array]:
  """Generates after left-padded prefixes: embeddings [B, P, D], mask [B, P] -> (tokens int32 [B, N] with
  the pad id after each row's end, lengths int32 [B] counting the closing EOS / stop tokens). `on_step`, if
  given, is called on the host after every step (see the module docstring)."""
  if config.num_beams > 1:
    return beam_search(llm, params, embeddings, mask, rng, config, ids, on_step)
  return sample(llm, params, embeddings, mask, rng, config, ids, on_step)


def sample(llm: Llama, params: Any, embeddings: Array, mask: Array, rng: Array, config: GenerationConfig,
           ids: SpecialIds, on_step: StepCallback | None = None) -> tuple[Array, Array]:
  """Greedy (or sampled, with `do_sample`) decoding; arguments and results as `decode`."""
  batch, prefix = mask.shape
  steps, window = config.max_new_tokens, _window_size(ids)
  logits, cache, slot_mask, positions = prefill(llm, params, embeddings, mask, prefix + steps)
  rows = jnp.arange(batch)
  state = dict(step=jnp.zeros((), jnp.int32), logits=logits, cache=cache, slot_mask=slot_mask, positions=positions,
               tokens=jnp.full((batch, window + steps), -1, jnp.int32),  # `window` leading -1s for the stop check
               lengths=jnp.zeros(batch, jnp.int32), finished=jnp.zeros(batch, bool),
               seen=jnp.zeros(logits.shape, bool), rng=rng)

  def running(s):
    return (s['step'] < steps) & ~jnp.all(s['finished'])

  def body(s):
    t = s['step']
    scores = apply_repetition_penalty(s['logits'], s['seen'], config.repetition_penalty)
    scores = ban_eos_before(scores, t, config.min_new_tokens, ids.eos)
    rng, key = jax.random.split(s['rng'])
    if config.do_sample:
      scores = top_k_top_p_filter(scores / config.temperature, config.top_k, config.top_p)
      token = jax.random.categorical(key, scores).astype(jnp.int32)
    else:
      token = jnp.argmax(scores, axis=-1).astype(jnp.int32)
    token = jnp.where(s['finished'], ids.pad, token)
    tokens = s['tokens'].at[:, window + t].set(token)
    recent = jax.lax.dynamic_slice_in_dim(tokens, t + 1, window, axis=1)  # [B, window], ending at this token
    ended = (token == ids.eos) | ends_with_stop(recent, ids.stop_sequences)
    lengths = jnp.where(s['finished'], s['lengths'], t + 1)
    if on_step is not None:
      jax.debug.callback(on_step, t + 1, tokens[:, window:], ordered=True)
    slot_mask = s['slot_mask'].at[:, prefix + t].set(1)
    logits, cache = decode_step(llm, params, token, slot_mask, s['positions'], s['cache'])
    return dict(step=t + 1, logits=logits, cache=cache, slot_mask=slot_mask, positions=s['positions'] + 1,
                tokens=tokens, lengths=lengths, finished=s['finished'] | ended,
                seen=s['seen'].at[rows, token].set(True), rng=rng)

  state = jax.lax.while_loop(running, body, state)
  tokens = state['tokens'][:, window:]
  tokens = jnp.where(jnp.arange(steps)[None] < state['lengths'][:, None], tokens, ids.pad)
  return tokens, state['lengths']


def _gather_beams(x: Array, beam_index: Array) -> Array:
  """x [B, K, ...], beam_index [B, J] -> [B, J, ...]."""
  return jnp.take_along_axis(x, beam_index.reshape(beam_index.shape + (1,) * (x.ndim - 2)), axis=1)


def beam_search(llm: Llama, params: Any, embeddings: Array, mask: Array, rng: Array, config: GenerationConfig,
                ids: SpecialIds, on_step: StepCallback | None = None) -> tuple[Array, Array]:
  """Beam search with `config.num_beams` beams (1 works too); returns the best finished hypothesis per row.
  `on_step` sees the best open beam of each row."""
  del rng  # deterministic
  batch, prefix = mask.shape
  beams, steps, window = config.num_beams, config.max_new_tokens, _window_size(ids)
  candidates = 2 * beams  # HF: max(2, 1 + number of EOS ids) x beams
  logits, cache, slot_mask, positions = prefill(llm, params, embeddings, mask, prefix + steps)
  vocab = logits.shape[-1]
  expand = lambda x, axis=0: jnp.repeat(x, beams, axis=axis)  # [B, ...] -> [B * beams, ...]
  cache = KVCache(expand(cache.key, 1), expand(cache.value, 1), cache.index)
  flat_rows = jnp.arange(batch * beams)
  top_beams = jnp.arange(candidates) < beams  # only the best `beams` candidates may finish

  state = dict(
      step=jnp.zeros((), jnp.int32), logits=expand(logits), cache=cache, slot_mask=expand(slot_mask),
      positions=expand(positions), seen=jnp.zeros((batch * beams, vocab), bool),
      running=jnp.full((batch, beams, window + steps), -1, jnp.int32),
      running_scores=jnp.tile(jnp.where(jnp.arange(beams) == 0, 0.0, NEG_INF), (batch, 1)),
      finished=jnp.full((batch, beams, window + steps), -1, jnp.int32),
      finished_scores=jnp.full((batch, beams), NEG_INF), finished_lengths=jnp.zeros((batch, beams), jnp.int32),
      is_finished=jnp.zeros((batch, beams), bool), improvable=jnp.ones((batch,), bool),
      all_hit=jnp.zeros((), bool))

  def running(s):
    return (s['step'] < steps) & jnp.any(s['improvable']) & ~s['all_hit']

  def body(s):
    t = s['step']
    log_probs = jax.nn.log_softmax(s['logits'].astype(jnp.float32), axis=-1)
    log_probs = apply_repetition_penalty(log_probs, s['seen'], config.repetition_penalty)
    log_probs = ban_eos_before(log_probs, t, config.min_new_tokens, ids.eos)
    totals = (log_probs.reshape(batch, beams, vocab) + s['running_scores'][..., None]).reshape(batch, -1)
    top_scores, top_index = jax.lax.top_k(totals, candidates)  # [B, C]
    parent, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
    sequences = _gather_beams(s['running'], parent).at[:, :, window + t].set(token)  # [B, C, W + N]
    recent = jax.lax.dynamic_slice_in_dim(sequences, t + 1, window, axis=2)
    hits = (token == ids.eos) | ends_with_stop(recent, ids.stop_sequences) | (t + 1 >= steps)

    # the best `beams` candidates that go on
    open_scores = top_scores + hits * NEG_INF
    keep = jax.lax.top_k(open_scores, beams)[1]  # [B, beams]
    new_running = _gather_beams(sequences, keep)
    new_running_scores = _gather_beams(open_scores, keep)
    new_parent = _gather_beams(parent, keep)  # [B, beams], index among the previous beams
    if on_step is not None:
      jax.debug.callback(on_step, t + 1, new_running[:, 0, window:], ordered=True)

    # candidates that just finished join the finished list if they beat its worst
    normalised = top_scores / ((t + 1).astype(jnp.float32) ** config.length_penalty)
    normalised += (~s['improvable'])[:, None] * NEG_INF
    normalised += ~(hits & top_beams[None]) * NEG_INF
    merged_scores = jnp.concatenate([s['finished_scores'], normalised], axis=1)
    best = jax.lax.top_k(merged_scores, beams)[1]
    finished = _gather_beams(jnp.concatenate([s['finished'], sequences], axis=1), best)
    finished_scores = _gather_beams(merged_scores, best)
    finished_lengths = _gather_beams(jnp.concatenate(
        [s['finished_lengths'], jnp.full((batch, candidates), t + 1, jnp.int32)], axis=1), best)
    is_finished = _gather_beams(jnp.concatenate([s['is_finished'], hits & top_beams[None]], axis=1), best)

    # HF's default (early_stopping=False) heuristic: can the best open beam still beat a finished one?
    best_possible = new_running_scores[:, :1] / ((t + 1).astype(jnp.float32) ** config.length_penalty)
    worst_finished = jnp.where(is_finished, jnp.min(finished_scores, axis=1, keepdims=True), NEG_INF)
    improvable = s['improvable'] & jnp.any(best_possible > worst_finished, axis=1)

    # move the caches of the surviving beams into place and feed their new tokens
    source = (jnp.arange(batch)[:, None] * beams + new_parent).reshape(-1)  # [B * beams]
    reorder = lambda x, axis: jnp.take(x, source, axis=axis)
    cache = KVCache(reorder(s['cache'].key, 1), reorder(s['cache'].value, 1), s['cache'].index)
    new_tokens = new_running[:, :, window + t].reshape(-1)
    seen = reorder(s['seen'], 0).at[flat_rows, new_tokens].set(True)
    slot_mask = s['slot_mask'].at[:, prefix + t].set(1)
    logits, cache = decode_step(llm, params, new_tokens, slot_mask, s['positions'], cache)
    return dict(step=t + 1, logits=logits, cache=cache, slot_mask=slot_mask, positions=s['positions'] + 1, seen=seen,
                running=new_running, running_scores=new_running_scores, finished=finished,
                finished_scores=finished_scores, finished_lengths=finished_lengths, is_finished=is_finished,
                improvable=improvable, all_hit=jnp.all(hits))

  state = jax.lax.while_loop(running, body, state)
  tokens, lengths = state['finished'][:, 0, window:], state['finished_lengths'][:, 0]
  tokens = jnp.where(jnp.arange(steps)[None] < lengths[:, None], tokens, ids.pad)
  return tokens, lengths


# ----------------------------------------------------------------------------------------- prefixes


def assemble_prefix(llm: Llama, params: Any, visual: Array, num_visual: Array, text_ids: Array, text_lengths: Array
                    ) -> tuple[Array, Array]:
  """Left-padded `[pad... V text]` rows.

  visual [B, P, D] (row b's Nv_b tokens first), num_visual [B], text_ids [B, P] (row b's ids first),
  text_lengths [B] -> (embeddings [B, P, D], mask int32 [B, P]).
  """
  batch, length = text_ids.shape
  start = length - num_visual - text_lengths  # [B]: the first real slot
  slot = jnp.arange(length)[None] - start[:, None]  # [B, P]: index within the real part
  is_visual = (slot >= 0) & (slot < num_visual[:, None])
  is_text = slot >= num_visual[:, None]
  def take(x, index):  # x [B, P, ...] at index [B, P] (clipped: slots outside the part are masked anyway)
    index = jnp.clip(index, 0, length - 1)
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)

  text = llm.apply({'params': params}, take(text_ids, slot - num_visual[:, None]), method='embed_tokens')
  embeddings = jnp.where(is_visual[..., None], take(visual, slot).astype(text.dtype), text)
  return embeddings, (is_visual | is_text).astype(jnp.int32)


def prefix_bucket(length: int, bucket: int = PREFIX_BUCKET) -> int:
  return -(-length // bucket) * bucket


# ----------------------------------------------------------------------------------------- videos -> text


@dataclasses.dataclass(frozen=True)
class Request:
  frames: np.ndarray  # [T, S, S, 3]: uint8 RGB (inference.InferenceVideo's) or float CLIP-normalised
  qformer_text: str  # what the Q-Former reads
  prompt_ids: np.ndarray  # int32 [n]: the text after the visual tokens ('</s>###Human: ... ###Assistant: ...')


@dataclasses.dataclass(frozen=True)
class Generation:
  text: str  # the answer, cut at the stop string and stripped
  token_ids: np.ndarray  # int32 [n]: generated ids, the closing EOS / stop tokens included
  prompt_tokens: int  # visual + text tokens before the answer (after the cut)
  context_cut: int = 0  # visual tokens cut from the start of the context to fit config.context_limit


@dataclasses.dataclass
class GenerationStats:
  new_tokens: int = 0  # generated tokens, summed over the batch
  seconds: float = 0.0  # prefill + decoding (compilation excluded)
  visual_seconds: float = 0.0  # vision + Q-Former + projection
  compile_seconds: float = 0.0  # programs compiled during the call (0 once warm)

  @property
  def tokens_per_second(self) -> float:
    return self.new_tokens / self.seconds if self.seconds else 0.0

  def add(self, other: GenerationStats) -> None:
    for field in dataclasses.fields(self):
      setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


class VideoGenerator:
  """An ST-LLM ready to answer: params on device, tokenizers, and compiled programs by shape."""

  def __init__(self, model_config: Any, params: Any, llm_tokenizer, qformer_tokenizer):
    self.config = cfg = stllm.model_config(model_config)
    self.params = params
    self.llm_tokenizer = llm_tokenizer
    self.qformer_tokenizer = qformer_tokenizer
    # Q-Former text: left-truncated to 256 tokens (LAVIS), or to the model's positions if fewer
    longest = min(conversation.QFORMER_MAX_LENGTH, cfg.qformer.max_positions)
    self.qformer_buckets = tuple(b for b in (32, 64, 128) if b < longest) + (longest,)
    self.llm = Llama(cfg.llm, layers.as_dtype(cfg.dtype), stllm.ATTENTION_IMPLS[cfg.attention_impl])
    self._compiled: dict[Any, Any] = {}
    self._token_listener: Callable[[list[np.ndarray]], None] | None = None  # of the streaming call running now

  @property
  def max_positions(self) -> int:
    return self.config.llm.max_positions

  def _program(self, key: Any, fn, *args) -> tuple[Any, float]:
    """The program of fn for these args, compiled once per `key`: (compiled, seconds spent compiling now)."""
    if key in self._compiled:
      return self._compiled[key], 0.0
    began = time.perf_counter()
    self._compiled[key] = jax.jit(fn).lower(*args).compile()
    return self._compiled[key], time.perf_counter() - began

  def visual_tokens(self, frames: np.ndarray, qformer_text: str, length: int, skip: int = 0
                    ) -> tuple[Array, int, float]:
    """One video [T, S, S, 3] -> (its visual tokens from the `skip`-th on, padded to `length` rows [1, length, D],
    their number, compile seconds)."""
    ids, _ = conversation.encode_qformer_text(self.qformer_tokenizer, qformer_text, max(self.qformer_buckets))
    qids, qmask = conversation.pad_batch([ids], self.qformer_buckets, self.qformer_tokenizer.pad_token_id)
    batch = dict(frames=frames[None], qformer_input_ids=qids, qformer_attention_mask=qmask)
    cfg = self.config

    def encode(params, batch, skip):
      tokens = stllm.STLLM(cfg).apply({'params': params}, batch, method='visual_tokens')  # [1, Nv, D]
      tokens = jnp.pad(tokens, ((0, 0), (0, length), (0, 0)))  # [1, Nv + length, D]
      return jax.lax.dynamic_slice_in_dim(tokens, skip, length, axis=1)

    args = (self.params, batch, np.int32(skip))
    program, compile_seconds = self._program(('visual', frames.shape, frames.dtype.name, qids.shape, length), encode,
                                             *args)
    return program(*args), cfg.num_visual_tokens(frames.shape[0]) - skip, compile_seconds

  def _hand_over_tokens(self, steps: Any, tokens: Any) -> None:
    """The streaming programs' host callback: each row's first `steps` ids to the listener of the running call."""
    self._token_listener([row[:int(steps)] for row in np.asarray(tokens)])

  def generate(self, requests: Sequence[Request], config: GenerationConfig, seed: int = 0,
               on_tokens: Callable[[list[np.ndarray]], None] | None = None
               ) -> tuple[list[Generation], GenerationStats]:
    """Answers for a batch of requests (one compiled program per batch size x prefix bucket x config, and one
    more where `on_tokens` streams). `on_tokens`, if given, is called after every decoding step with each
    request's generated ids so far (int32 arrays; beam search: the best open beam's, which may still change);
    not thread-safe: one call at a time per generator."""
    config.validate()
    stats = GenerationStats()
    full_visual = [self.config.num_visual_tokens(r.frames.shape[0]) for r in requests]
    cuts = [context_cut(nv + len(r.prompt_ids), config) for nv, r in zip(full_visual, requests)]
    for nv, cut, request in zip(full_visual, cuts, requests):
      if cut > nv:
        raise ValueError(f'the text alone ({len(request.prompt_ids)} tokens) does not fit context_limit='
                         f'{config.context_limit} with max_new_tokens={config.max_new_tokens}: ask a shorter question')
    num_visual = [nv - cut for nv, cut in zip(full_visual, cuts)]
    prompt_lengths = [nv + len(r.prompt_ids) for nv, r in zip(num_visual, requests)]
    longest = max(prompt_lengths)
    if longest + config.max_new_tokens > self.max_positions:
      raise ValueError(f'a prompt of {longest} tokens (visual + text) plus max_new_tokens={config.max_new_tokens} '
                       f'exceeds llm.max_positions={self.max_positions}: use fewer frames, a shorter conversation '
                       'or fewer new tokens')
    length = prefix_bucket(longest)
    began = time.perf_counter()
    visual = []
    for request, cut in zip(requests, cuts):
      padded, _, compile_seconds = self.visual_tokens(request.frames, request.qformer_text, length, cut)
      visual.append(padded)
      stats.compile_seconds += compile_seconds
    visual = jax.block_until_ready(jnp.concatenate(visual, axis=0))
    stats.visual_seconds = time.perf_counter() - began - stats.compile_seconds

    text_ids = np.full((len(requests), length), self.llm_tokenizer.pad_token_id, np.int32)
    for row, request in enumerate(requests):
      text_ids[row, :len(request.prompt_ids)] = request.prompt_ids
    text_lengths = np.asarray([len(r.prompt_ids) for r in requests], np.int32)
    ids = special_ids(self.llm_tokenizer, config.stop_strings)
    llm = self.llm
    streaming = on_tokens is not None
    on_step = self._hand_over_tokens if streaming else None

    def run(llm_params, visual, num_visual, text_ids, text_lengths, rng):
      embeddings, mask = assemble_prefix(llm, llm_params, visual, num_visual, text_ids, text_lengths)
      return decode(llm, llm_params, embeddings, mask, rng, config, ids, on_step)

    args = (self.params['llm'], visual, np.asarray(num_visual, np.int32), text_ids, text_lengths,
            jax.random.key(seed))
    program, compile_seconds = self._program(('generate', len(requests), length, config, ids, streaming), run,
                                             *args)
    stats.compile_seconds += compile_seconds
    began = time.perf_counter()
    self._token_listener = on_tokens
    try:
      tokens, lengths = (np.asarray(x) for x in program(*args))
    finally:
      self._token_listener = None
    stats.seconds = time.perf_counter() - began
    stats.new_tokens = int(lengths.sum())
    results = []
    for row, n in enumerate(lengths):
      generated = tokens[row, :n]
      results.append(Generation(conversation.answer_text(self.llm_tokenizer, generated, config.stop_strings),
                                generated, prompt_lengths[row], cuts[row]))
    return results, stats


# ----------------------------------------------------------------------------------------- loading


def load_generator(checkpoint: str, llm_tokenizer: str = '', qformer_tokenizer: str = '') -> VideoGenerator:
  """A VideoGenerator from a weights directory or a training workdir (see loading.load_model); tokenizers
  from the checkpoint unless given. Anything unusable raises UserError naming it."""
  from stllm_jax import checkpoints, loading  # pylint: disable=g-import-not-at-top
  from stllm_jax.data.errors import DataError  # pylint: disable=g-import-not-at-top
  from stllm_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(checkpoint):
    raise UserError(f'checkpoint {checkpoint} does not exist (give a weights directory from `python -m '
                    'stllm_jax.convert` or a training workdir)')
  if not checkpoints.is_weights_dir(checkpoint) and not os.path.isdir(os.path.join(checkpoint, 'checkpoints')):
    raise UserError(f'checkpoint {checkpoint} is neither a weights directory (with {checkpoints.MODEL_JSON} and '
                    f'{checkpoints.PARAMS_DIR}/) nor a training workdir (with checkpoints/)')
  try:
    loaded = loading.load_model(checkpoint)
  except UserError:
    raise
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise UserError(f'checkpoint {checkpoint} cannot be loaded: {type(e).__name__}: {str(e).splitlines()[0]}') from e
  llm_dir = llm_tokenizer or loaded.llm_tokenizer
  qformer_dir = qformer_tokenizer or loaded.qformer_tokenizer
  for name, directory in (('--llm-tokenizer', llm_dir), ('--qformer-tokenizer', qformer_dir)):
    if not directory:
      raise UserError(f'checkpoint {checkpoint} names no tokenizer; give {name} DIR (a local Hugging Face tokenizer '
                      'directory)')
  try:
    llm_tok = conversation.load_llm_tokenizer(llm_dir)
    qformer_tok = conversation.load_qformer_tokenizer(qformer_dir)
  except DataError as e:
    raise UserError(str(e)) from e
  model_cfg = stllm.model_config(loaded.model_config)
  for what, tok, vocab in (('LLM', llm_tok, model_cfg.llm.vocab_size), ('Q-Former', qformer_tok,
                                                                       model_cfg.qformer.vocab_size)):
    if len(tok) > vocab:
      raise UserError(f'the {what} tokenizer has {len(tok)} ids but the model only {vocab}: wrong tokenizer for '
                      f'{checkpoint}')
  return VideoGenerator(loaded.model_config, loaded.params, llm_tok, qformer_tok)
