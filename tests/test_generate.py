"""Generation: KV cache, greedy / sampling / beam search against Hugging Face `generate`, padding, stops."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import inference_helpers
from conftest import hf_visual_tokens, random_batch, torch_images
from stllm_jax import generate
from stllm_jax.data import conversation, inference, transforms
from stllm_jax.generate import GenerationConfig, SpecialIds
from stllm_jax.models import llama, stllm
from stllm_jax.models.llama import Llama

EOS, PAD = 2, 0
IDS = SpecialIds(eos=EOS, pad=PAD)  # no stop sequences: Hugging Face runs without them
NEW_TOKENS = 12
HF_SECTION = 'generation against Hugging Face generate (token ids equal)'


def llm_of(cfg):
  return Llama(stllm.model_config(cfg).llm)


@functools.lru_cache(maxsize=None)
def _jitted_generate(cfg_key, config, ids, beam_search):
  cfg = stllm.model_config(cfg_key)
  llm = Llama(cfg.llm)
  strategy = generate.beam_search if beam_search else generate.decode

  def run(params, batch, num_visual, text_lengths, rng):
    visual = stllm.STLLM(cfg).apply({'params': params}, batch, method='visual_tokens')  # [B, Nv, D]
    length = batch['input_ids'].shape[1] + visual.shape[1]
    visual = jnp.pad(visual, ((0, 0), (0, length - visual.shape[1]), (0, 0)))
    text = jnp.pad(batch['input_ids'], ((0, 0), (0, length - batch['input_ids'].shape[1])))
    embeddings, mask = generate.assemble_prefix(llm, params['llm'], visual, num_visual, text, text_lengths)
    return strategy(llm, params['llm'], embeddings, mask, rng, config, ids)

  return jax.jit(run)


def ours(converted, batch, config, ids=IDS, seed=0, beam_search=False):
  """ST-LLM generation on a model batch (text right-padded, as the data pipeline gives it)."""
  cfg, params = converted
  b, t = batch['frames'].shape[:2]
  num_visual = np.full(b, stllm.model_config(cfg).num_visual_tokens(t), np.int32)
  lengths = batch['attention_mask'].sum(1).astype(np.int32)
  tokens, n = _jitted_generate(stllm.model_config(cfg), config, ids, beam_search)(
      params, batch, num_visual, lengths, jax.random.key(seed))
  return [list(np.asarray(tokens)[row, :n[row]]) for row in range(b)]


def hf_new_tokens(output, eos=EOS):
  """Hugging Face output rows -> lists of new tokens up to and including the first EOS."""
  rows = []
  for row in output.tolist():
    rows.append(row[:row.index(eos) + 1] if eos in row else row)
  return rows


def text_batch(rng, cfg, num_frames=1, text_len=7, batch_size=1):
  batch = random_batch(rng, stllm.model_config(cfg), batch_size, num_frames, text_len)
  batch['attention_mask'][:] = 1
  batch['qformer_attention_mask'][:] = 1
  batch['input_ids'] = rng.integers(3, 79, batch['input_ids'].shape).astype(np.int32)  # no EOS / image token
  return batch


# ----------------------------------------------------------------------------------------- the cache


def test_cached_forward_equals_full_forward(converted, rng):
  """Prefill 5 tokens, then 4 one at a time: logits equal the uncached forward, scanned (in a loop or unrolled
  into one body: `scan_unroll`) and unrolled."""
  cfg, params = converted
  llm_cfg = stllm.model_config(cfg).llm
  embeddings = rng.standard_normal((2, 9, llm_cfg.width)).astype(np.float32)
  mask = np.ones((2, 9), np.int32)
  mask[1, :3] = 0  # left padding in row 1
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
  for scan, unroll in ((True, 1), (True, llm_cfg.num_layers), (False, 1)):
    model = Llama(dataclasses.replace(llm_cfg, scan_layers=scan, scan_unroll=unroll))
    p = params['llm'] if scan else unstack_layers(params['llm'], llm_cfg.num_layers)
    full = model.apply({'params': p}, model.apply({'params': p}, embeddings, mask, positions), method='logits')

    @jax.jit
    def cached(p):
      cache = llama.init_cache(model.config, 2, 12)
      slots = jnp.zeros((2, 12), jnp.int32).at[:, :5].set(mask[:, :5])
      hidden, cache = model.apply({'params': p}, embeddings[:, :5], slots, positions[:, :5], cache)
      outs = [hidden]
      for i in range(5, 9):
        slots = slots.at[:, i].set(1)
        hidden, cache = model.apply({'params': p}, embeddings[:, i:i + 1], slots, positions[:, i:i + 1], cache)
        outs.append(hidden)
      return model.apply({'params': p}, jnp.concatenate(outs, 1), method='logits'), cache.index

    logits, index = cached(p)
    assert int(index) == 9
    np.testing.assert_allclose(np.asarray(logits)[mask == 1], np.asarray(full)[mask == 1], rtol=1e-5, atol=1e-5)


def unstack_layers(llm_params, num_layers):
  blocks = llm_params['blocks']['layers']
  unrolled = {f'layers_{i}': jax.tree_util.tree_map(lambda x, i=i: x[i], blocks) for i in range(num_layers)}
  return {**llm_params, 'blocks': unrolled}


def test_kv_cache_decoding_equals_recomputing_the_sequence(converted, rng):
  """Greedy with the cache == greedy that runs the whole sequence through the model at every step."""
  cfg, params = converted
  model = llm_of(cfg)
  embeddings = rng.standard_normal((2, 6, model.config.width)).astype(np.float32)
  mask = np.ones((2, 6), np.int32)
  mask[0, :2] = 0
  config = GenerationConfig(max_new_tokens=NEW_TOKENS, stop_strings=())
  tokens, lengths = jax.jit(lambda p: generate.decode(model, p, embeddings, mask, jax.random.key(0), config, IDS))(
      params['llm'])

  @jax.jit
  def next_token(p, embeds, m):
    positions = jnp.maximum(jnp.cumsum(m, 1) - 1, 0)
    logits = model.apply({'params': p}, model.apply({'params': p}, embeds, m, positions), method='logits')
    return jnp.argmax(logits[:, -1], -1)

  for row in range(2):
    embeds, m, expected = embeddings[row:row + 1], mask[row:row + 1], []
    for _ in range(NEW_TOKENS):
      token = int(next_token(params['llm'], embeds, m)[0])
      expected.append(token)
      if token == EOS:
        break
      embeds = np.concatenate([embeds, model.apply({'params': params['llm']}, np.array([[token]]),
                                                   method='embed_tokens')], 1)
      m = np.concatenate([m, np.ones((1, 1), np.int32)], 1)
    assert list(np.asarray(tokens)[row, :int(lengths[row])]) == expected


# ----------------------------------------------------------------------------------------- Hugging Face


def test_greedy_equals_hugging_face_instructblip_one_frame(hf_instructblip, converted, rng, report):
  batch = text_batch(rng, converted[0])
  k = hf_instructblip.config.num_query_tokens
  input_ids = torch.tensor(np.concatenate([np.full((1, k), 79), batch['input_ids']], 1)).long()
  with torch.no_grad():
    out = hf_instructblip.generate(
        pixel_values=torch_images(batch['frames'][:, 0]),
        qformer_input_ids=torch.tensor(batch['qformer_input_ids']).long(),
        qformer_attention_mask=torch.tensor(batch['qformer_attention_mask']).long(), input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids), max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1,
        eos_token_id=EOS, pad_token_id=PAD)
  expected = hf_new_tokens(out[:, input_ids.shape[1]:])
  got = ours(converted, batch, GenerationConfig(max_new_tokens=NEW_TOKENS, stop_strings=()))
  report(HF_SECTION, f'InstructBLIP 1 frame, greedy: {[int(t) for t in got[0]]}')
  assert got == expected


def hf_composite_generate(model, batch, eos=EOS, **kwargs):
  """Hugging Face reference for T frames: per-frame Q-Former tokens in time order, then LLaMA generate."""
  visual = hf_visual_tokens(model, batch)  # [B, T, K, D]
  visual = visual.reshape(visual.shape[0], -1, visual.shape[-1])
  with torch.no_grad():
    lm = model.language_model
    text = lm.get_input_embeddings()(torch.tensor(batch['input_ids']).long())
    embeds = torch.cat([visual, text], 1)
    out = lm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                      eos_token_id=eos, pad_token_id=PAD, **kwargs)
  return hf_new_tokens(out, eos)


@pytest.mark.parametrize('penalty', [1.0, 1.5])
def test_greedy_equals_hugging_face_several_frames(hf_instructblip, converted, rng, report, penalty):
  batch = text_batch(rng, converted[0], num_frames=3)
  expected = hf_composite_generate(hf_instructblip, batch, max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1,
                                   repetition_penalty=penalty)
  got = ours(converted, batch, GenerationConfig(max_new_tokens=NEW_TOKENS, repetition_penalty=penalty,
                                                stop_strings=()))
  report(HF_SECTION, f'3 frames, greedy, repetition penalty {penalty}: {[int(t) for t in got[0]]}')
  assert got == expected


def test_beam_search_equals_hugging_face(hf_instructblip, converted, rng, report):
  """The QA setting (beams, repetition penalty 1.5), 3 beams for speed."""
  batch = text_batch(rng, converted[0], num_frames=2)
  expected = hf_composite_generate(hf_instructblip, batch, max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=3,
                                   repetition_penalty=1.5, length_penalty=1.0)
  got = ours(converted, batch, GenerationConfig(max_new_tokens=NEW_TOKENS, num_beams=3, repetition_penalty=1.5,
                                                stop_strings=()))
  report(HF_SECTION, f'2 frames, 3 beams, penalty 1.5: {[int(t) for t in got[0]]}')
  assert got == expected


def test_beam_search_with_eos_equals_hugging_face(hf_instructblip, converted, rng):
  """A model whose EOS is likely: finished hypotheses, length normalisation and early stopping all matter."""
  batch = text_batch(rng, converted[0], num_frames=1)
  greedy = ours(converted, batch, GenerationConfig(max_new_tokens=NEW_TOKENS, stop_strings=()))[0]
  eos = int(greedy[3])  # a token the model produces: treat it as EOS so that beams finish early
  expected = hf_composite_generate(hf_instructblip, batch, eos=eos, max_new_tokens=NEW_TOKENS, do_sample=False,
                                   num_beams=4, length_penalty=1.0)
  got = ours(converted, batch, GenerationConfig(max_new_tokens=NEW_TOKENS, num_beams=4, stop_strings=()),
             SpecialIds(eos=eos, pad=PAD))
  assert got == expected
  assert len(got[0]) < NEW_TOKENS and got[0][-1] == eos  # a finished hypothesis won


# ----------------------------------------------------------------------------------------- settings, padding


def test_one_beam_equals_greedy(converted, rng):
  batch = text_batch(rng, converted[0], num_frames=2, batch_size=2)
  config = GenerationConfig(max_new_tokens=NEW_TOKENS, stop_strings=())
  assert ours(converted, batch, config, beam_search=True) == ours(converted, batch, config)


@pytest.mark.parametrize('beams', [1, 3])
def test_padded_batch_equals_each_sample_alone(converted, rng, beams):
  batch = text_batch(rng, converted[0], num_frames=2, text_len=9, batch_size=3)
  batch['attention_mask'][1, 4:] = 0  # shorter prompts (right-padded, as the pipeline pads)
  batch['attention_mask'][2, 6:] = 0
  batch['input_ids'][batch['attention_mask'] == 0] = PAD
  config = GenerationConfig(max_new_tokens=NEW_TOKENS, num_beams=beams, repetition_penalty=1.3, stop_strings=())
  together = ours(converted, batch, config)
  for row in range(3):
    n = int(batch['attention_mask'][row].sum())
    alone = {k: v[row:row + 1] for k, v in batch.items()}
    alone['input_ids'], alone['attention_mask'] = alone['input_ids'][:, :n], alone['attention_mask'][:, :n]
    assert ours(converted, alone, config) == [together[row]], row


def test_sampling_is_seeded_and_tiny_top_p_is_greedy(converted, rng):
  batch = text_batch(rng, converted[0], batch_size=2)
  greedy = ours(converted, batch, GenerationConfig(max_new_tokens=NEW_TOKENS, stop_strings=()))
  nucleus = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=True, top_p=1e-6, stop_strings=())
  assert ours(converted, batch, nucleus, seed=3) == greedy
  hot = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=True, temperature=5.0, stop_strings=())
  first, again, other = (ours(converted, batch, hot, seed=s) for s in (1, 1, 2))
  assert first == again
  assert first != other


def test_a_video_as_uint8_or_as_normalised_floats_gives_the_same_visual_tokens():
  paths = inference_helpers.build()
  generator = generate.load_generator(paths.checkpoint)
  loaded = inference.load_video_with_policy(paths.video, inference.FramePolicy('middle', 4),
                                            generator.config.vision.image_size)
  assert loaded.frames.dtype == np.uint8
  length = generator.config.num_visual_tokens(4)
  tokens = {}
  for name, frames in (('floats', transforms.normalize(loaded.frames)), ('uint8', loaded.frames)):  # same shape
    tokens[name], count, _ = generator.visual_tokens(frames, 'What moves?', length)
    assert count == length
  np.testing.assert_allclose(tokens['uint8'], tokens['floats'], rtol=0, atol=1e-5)


@pytest.mark.parametrize('beams', [1, 3])
def test_streaming_hands_over_every_step_and_answers_the_same(beams):
  paths = inference_helpers.build()
  generator = generate.load_generator(paths.checkpoint)
  loaded = inference.load_video_with_policy(paths.video, inference.FramePolicy('middle', 4),
                                            generator.config.vision.image_size)
  tok = generator.llm_tokenizer
  requests = [generate.Request(loaded.frames, q, conversation.encode_turns(tok, conversation.chat_turns([], q)))
              for q in ('What moves?', 'Which colour is the moving shape?')]
  config = GenerationConfig(max_new_tokens=10, num_beams=beams, repetition_penalty=1.3, min_new_tokens=1)
  silent, _ = generator.generate(requests, config)
  steps = []
  streamed, _ = generator.generate(requests, config, on_tokens=steps.append)
  assert [r.token_ids.tolist() for r in streamed] == [r.token_ids.tolist() for r in silent]
  assert steps and all([len(ids) for ids in step] == [k + 1, k + 1] for k, step in enumerate(steps))
  if beams == 1:  # greedy: each step extends the last, and the last holds the answers
    assert len(steps) == max(len(r.token_ids) for r in streamed)
    for row, result in enumerate(streamed):
      assert steps[-1][row][:len(result.token_ids)].tolist() == result.token_ids.tolist()
      assert all(step[row].tolist() == steps[-1][row][:k + 1].tolist() for k, step in enumerate(steps))
  _, stats = generator.generate(requests, config, on_tokens=lambda ids: None)
  assert stats.compile_seconds == 0  # the streaming program is kept like the silent one


def test_top_k_top_p_filter():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keep = lambda **kw: np.isfinite(np.asarray(generate.top_k_top_p_filter(logits, **kw)))[0].tolist()
  assert keep(top_k=0, top_p=0.8) == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8
  assert keep(top_k=0, top_p=0.81) == [True, True, True, False]
  assert keep(top_k=1, top_p=1.0) == [True, False, False, False]


def test_min_new_tokens_bans_eos(converted, rng):
  batch = text_batch(rng, converted[0])
  greedy = ours(converted, batch, GenerationConfig(max_new_tokens=4, stop_strings=()))[0]
  eos = int(greedy[0])  # the first token the model picks
  got = ours(converted, batch, GenerationConfig(max_new_tokens=4, min_new_tokens=1, stop_strings=()),
             SpecialIds(eos=eos, pad=PAD))[0]
  assert got[0] != eos and len(got) >= 2


@pytest.mark.parametrize('beams', [1, 3])
def test_min_new_tokens_equals_hugging_face(hf_instructblip, converted, rng, beams):
  """MVBench's decoding (the released min_length=1 with inputs_embeds in transformers 4.28: EOS cannot be the
  first new token) against `generate(min_new_tokens=1)`, with the model's own first choice made the EOS."""
  batch = text_batch(rng, converted[0], num_frames=2)
  eos = int(ours(converted, batch, GenerationConfig(max_new_tokens=1, num_beams=beams, stop_strings=()),
                 beam_search=beams > 1)[0][0])
  expected = hf_composite_generate(hf_instructblip, batch, eos=eos, max_new_tokens=NEW_TOKENS, do_sample=False,
                                   num_beams=beams, min_new_tokens=1)
  got = ours(converted, batch, GenerationConfig(max_new_tokens=NEW_TOKENS, num_beams=beams, min_new_tokens=1,
                                                stop_strings=()), SpecialIds(eos=eos, pad=PAD), beam_search=beams > 1)
  assert got == expected and got[0][0] != eos


# ----------------------------------------------------------------------------------------- stops and text


def test_stop_sequences_end_rows(converted, rng):
  batch = text_batch(rng, converted[0], batch_size=2)
  free = ours(converted, batch, GenerationConfig(max_new_tokens=NEW_TOKENS, stop_strings=()))
  stop = (int(free[0][2]), int(free[0][3]))  # row 0 emits this pair at steps 3-4
  got = ours(converted, batch, GenerationConfig(max_new_tokens=NEW_TOKENS, stop_strings=()),
             SpecialIds(eos=EOS, pad=PAD, stop_sequences=(stop,)))
  assert got[0] == free[0][:4]


def test_ends_with_stop():
  window = jnp.array([[-1, 5, 7], [7, 5, 7], [1, 2, 3]])
  assert np.asarray(generate.ends_with_stop(window, ((5, 7), (3,)))).tolist() == [True, True, True]
  assert np.asarray(generate.ends_with_stop(window, ((9, 5, 7),))).tolist() == [False, False, False]


def test_stop_token_sequences_and_answer_text(tmp_path):
  from data_helpers import make_tokenizers  # pylint: disable=g-import-not-at-top
  llm_dir, _ = make_tokenizers(str(tmp_path), ['###Human: what moves? ###Assistant: a red ball. ### done'] * 3)
  tok = conversation.load_llm_tokenizer(llm_dir)
  sequences = generate.stop_token_sequences(tok, ['###'])
  assert sequences and all('###' in tok.decode(list(s)) for s in sequences)
  ids = tok('a red ball.###Human: more', add_special_tokens=False)['input_ids']
  assert conversation.answer_text(tok, ids) == 'a red ball.'
  eos = tok.convert_tokens_to_ids('</s>')
  assert conversation.answer_text(tok, tok('Assistant: a red', add_special_tokens=False)['input_ids'] + [eos, 5]) \
      == 'a red'


# ----------------------------------------------------------------------------------------- speed


def test_tokens_per_second_next_to_hugging_face(hf_instructblip, converted, rng, report):
  """Greedy decoding of 64 tokens after 2 frames + 7 text tokens, batch 1 and 8, on the same tiny model (CPU;
  compilation excluded, best of 3). Reported, not asserted: timings on shared CPUs are noisy."""
  import time  # pylint: disable=g-import-not-at-top
  steps = 64
  for batch_size in (1, 8):
    batch = text_batch(rng, converted[0], num_frames=2, batch_size=batch_size)
    config = GenerationConfig(max_new_tokens=steps, min_new_tokens=steps, stop_strings=())

    def best_of_3(fn):
      fn()  # warm-up (and compilation)
      times = []
      for _ in range(3):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
      return min(times)

    ours_s = best_of_3(lambda: ours(converted, batch, config))
    hf_s = best_of_3(lambda: hf_composite_generate(hf_instructblip, batch, max_new_tokens=steps, min_new_tokens=steps,
                                                   do_sample=False))
    tokens = steps * batch_size
    report('generation speed, tiny InstructBLIP (2 frames, 64 new tokens, CPU, compile excluded)',
           f'batch {batch_size}: stllm_jax {tokens / ours_s:8.0f} tokens/s   Hugging Face {tokens / hf_s:8.0f} tokens/s '
           f'(torch {torch.get_num_threads()} threads)')
    assert all(len(row) == steps for row in ours(converted, batch, config))
