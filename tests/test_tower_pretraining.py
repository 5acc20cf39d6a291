"""Tower pretraining (the demo's stand-in for the towers' pretraining): labels from the synthetic set's facts,
batches, learning, the weights directory it writes for config.init.checkpoint, reuse and stale settings."""

import dataclasses
import os

import jax
import numpy as np
import pytest

from stllm_jax import checkpoints, loading, sharding
from stllm_jax.demo import run as demo, tower_pretraining
from stllm_jax.configlib import load_config_file
from stllm_jax.data import conversation
from stllm_jax.demo import synthetic
from stllm_jax.errors import UserError
from stllm_jax.models import stllm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def demo_set(tmp_path_factory):
  """A small synthetic set and the demo config pointing at it."""
  data_dir = str(tmp_path_factory.mktemp('towers') / 'data')
  config = load_config_file(os.path.join(ROOT, 'configs', 'demo.py'))
  synthetic.build(data_dir, seed=1, train_pairs=4, test_pairs=1, num_frames=16, size=64,
                  llm_vocab_size=config.demo.llm_vocab_size, qformer_vocab_size=config.demo.qformer_vocab_size,
                  radius_range=tuple(config.demo.radius_range), train_forms=('open',))
  config.data.llm_tokenizer = os.path.join(data_dir, 'tokenizers', 'llm')
  config.data.qformer_tokenizer = os.path.join(data_dir, 'tokenizers', 'qformer')
  return data_dir, config


def frame_set(data_dir, config, split='train'):
  facts = synthetic.read_facts(data_dir, split)
  tokenizer = conversation.load_qformer_tokenizer(config.data.qformer_tokenizer)
  return facts, tower_pretraining.load_frame_set(data_dir, facts, 64, demo.tower_texts, tokenizer,
                                                 config.data.qformer_max_length)


def test_centres_in_the_facts_are_where_the_decoded_shape_is(demo_set):
  data_dir, config = demo_set
  facts, frames = frame_set(data_dir, config)
  assert frames.frames.shape == (8, 16, 64, 64, 3) and frames.centres.shape == (8, 16, 2)
  foreground = (np.abs(frames.frames.astype(int) - synthetic.BACKGROUND).sum(-1) > 30)  # [N, T, S, S]
  yy, xx = np.mgrid[0:64, 0:64]
  count = foreground.sum((2, 3))
  centroid = np.stack([(foreground * yy).sum((2, 3)) / count, (foreground * xx).sum((2, 3)) / count], -1)
  pixels = (frames.centres + 1) * 32  # back from [-1, 1]
  # Circles and squares are symmetric about their centre; the triangle's centroid sits below its centre.
  symmetric = np.asarray([f['shape'] != 'triangle' for f in facts])
  assert np.abs(centroid - pixels)[symmetric].max() < 1.0
  assert np.abs(centroid[..., 1] - pixels[..., 1]).max() < 1.0  # every shape is symmetric left-right
  # Twins: the same centres in reverse order; labels follow the facts.
  np.testing.assert_array_equal(frames.centres[1], frames.centres[0][::-1])
  assert [synthetic.SHAPES[i] for i in frames.shapes] == [f['shape'] for f in facts]
  assert [list(synthetic.COLOURS)[i] for i in frames.colours] == [f['colour'] for f in facts]


def test_the_tower_texts_are_the_questions_texts_and_do_not_give_the_shape_away():
  fact = dict(shape='square', colour='red', direction='left')
  asked = [conversation.qformer_text('', question) for _, question, _ in demo.questions(fact)]
  texts = demo.tower_texts(fact)
  assert set(asked) <= set(texts) and len(texts) == len(set(texts))
  # The same texts whatever the shape: the towers must find it in the pixels.
  for shape in synthetic.SHAPES:
    assert demo.tower_texts(dict(fact, shape=shape)) == texts
  assert demo.tower_texts(dict(fact, colour='blue')) == texts  # no question names the colour
  # Each shape-naming question once per shape, plus the one that names none.
  assert len(texts) == 2 * len(synthetic.SHAPES) + 1


def test_every_video_carries_its_tower_texts(demo_set):
  data_dir, config = demo_set
  facts, frames = frame_set(data_dir, config)
  tokenizer = conversation.load_qformer_tokenizer(config.data.qformer_tokenizer)
  assert frames.qformer_input_ids.shape[:2] == (8, len(demo.tower_texts(facts[0])))
  for n in (0, 5):
    for q, text in enumerate(demo.tower_texts(facts[n])):
      length = frames.qformer_attention_mask[n, q].sum()
      assert tokenizer.decode(frames.qformer_input_ids[n, q, :length], skip_special_tokens=True) == text.lower()
  batch = tower_pretraining.sample_frames(frames, np.random.default_rng(0), 5)
  assert batch['frames'].shape == (5, 1, 64, 64, 3) and batch['frames'].dtype == np.uint8
  length = config.data.qformer_max_length
  assert batch['qformer_input_ids'].shape == batch['qformer_attention_mask'].shape == (5, length)
  assert batch['centres'].shape == (5, 2) and np.abs(batch['centres']).max() <= 1


def test_pretraining_lowers_the_loss_and_trains_only_the_towers(demo_set):
  data_dir, config = demo_set
  _, frames = frame_set(data_dir, config)
  cfg = tower_pretraining.TowerPretrainConfig(steps=120, batch_size=16)
  model = stllm.STLLM(stllm.model_config(config.model))
  before = stllm.init_params(config.model, jax.random.key(config.seed))
  params, head = tower_pretraining.pretrain(config, cfg, frames, log=lambda _: None)
  batch = tower_pretraining.sample_frames(frames, np.random.default_rng(9), 64)
  untrained_head = jax.tree_util.tree_map(np.zeros_like, head)
  loss = lambda p, h: float(tower_pretraining.losses(model, cfg, dict(model=p, head=h), batch)[0])
  assert loss(params, head) < 0.7 * loss(before, untrained_head)
  # The head reads every one of a frame's K visual tokens alone.
  centre, shape_logits, colour_logits = tower_pretraining.frame_outputs(model, dict(model=params, head=head), batch)
  k = config.model.qformer.num_query_tokens
  assert centre.shape == (64, k, 2) and shape_logits.shape == (64, k, len(synthetic.SHAPES))
  assert colour_logits.shape == (64, k, len(synthetic.COLOURS))
  for name in params:
    changed = any(np.abs(np.asarray(a) - np.asarray(b)).max() > 0 for a, b in
                  zip(jax.tree_util.tree_leaves(params[name]), jax.tree_util.tree_leaves(before[name])))
    assert changed == (name in tower_pretraining.TOWERS), name


def test_the_weights_directory_starts_a_run_and_is_reused(demo_set, tmp_path, monkeypatch):
  data_dir, config = demo_set
  cfg = tower_pretraining.TowerPretrainConfig(steps=2, batch_size=4)
  out = str(tmp_path / 'towers')
  messages = []
  record = tower_pretraining.ensure_towers(config, cfg, data_dir, out, demo.tower_texts, messages.append)
  assert checkpoints.is_weights_dir(out) and any('held-out frames' in m for m in messages)
  assert set(record['held_out']) == {'shape_accuracy', 'colour_accuracy', 'centre_error_px', 'frames'}
  assert record['held_out']['frames'] == 2 * 16
  # config.init.checkpoint takes it strictly (every model param is there, the MVM head is fresh).
  config.init.checkpoint = out
  model_cfg = stllm.model_config(config.model)
  shardings = sharding.param_shardings(stllm.abstract_variables(model_cfg), sharding.make_mesh('fsdp=1'))
  params = loading.initial_params(config, model_cfg, shardings)
  stored = checkpoints.load_stored_params(out)
  np.testing.assert_array_equal(np.asarray(params['vision']['pos_embed']), np.asarray(stored['vision']['pos_embed']))
  # Same settings: reused, not trained again; other settings: refused with what to do.
  again = tower_pretraining.ensure_towers(config, cfg, data_dir, out, demo.tower_texts, messages.append)
  assert again['seconds'] == record['seconds']
  with pytest.raises(UserError, match='other settings'):
    tower_pretraining.ensure_towers(config, dataclasses.replace(cfg, lr=1e-4), data_dir, out, demo.tower_texts)
  # Towers of another version of the pretraining, with the same config: refused too.
  monkeypatch.setattr(tower_pretraining, 'VERSION', tower_pretraining.VERSION + 1)
  with pytest.raises(UserError, match='older version'):
    tower_pretraining.ensure_towers(config, cfg, data_dir, out, demo.tower_texts)
