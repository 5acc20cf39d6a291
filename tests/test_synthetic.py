"""The synthetic set: reversed twins really are frame-reversed, answers, MVBench layout, tokenizers,
determinism, and a tiny ST-LLM forward pass on a pipeline batch of it."""

import filecmp
import json
import os

import jax
import numpy as np
import pytest
import transformers

from stllm_jax import configlib
from stllm_jax.data import annotations, pipeline
from stllm_jax.demo import synthetic
from stllm_jax.models import stllm

import data_helpers as helpers

SMALL = dict(seed=3, train_pairs=3, test_pairs=2, num_frames=12, size=48, fps=6)


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('synthetic'))
  return out, synthetic.build(out, **SMALL)


def read_json(*parts):
  with open(os.path.join(*parts), encoding='utf-8') as f:
    return json.load(f)


def centroid(frame):
  """(y, x) of the non-background pixels."""
  ys, xs = np.nonzero(np.abs(frame.astype(int) - synthetic.BACKGROUND).sum(-1) > 60)
  return np.array([ys.mean(), xs.mean()])


def test_layout_and_build_time(built, report):
  out, info = built
  for path in ('train.json', 'test.json', 'info.json', 'tokenizers/llm/tokenizer.json',
               'tokenizers/qformer/tokenizer.json', 'mvbench/tasks.json', 'mvbench/json/moving_direction.json',
               'mvbench/json/moving_attribute.json'):
    assert os.path.isfile(os.path.join(out, path)), path
  assert len(os.listdir(os.path.join(out, 'videos'))) == info['videos'] == 10
  assert info['seconds'] < 60
  report('data: synthetic set build time', f'{info["videos"]} videos (small test build): {info["seconds"]:.1f} s')


def test_reversed_twins_are_frame_reversed_with_opposite_direction(built):
  out, _ = built
  rows = read_json(out, 'train.json') + read_json(out, 'test.json')
  direction_of = {}
  for row in rows:
    answer = row['QA'][1]['a']
    if answer.startswith('It moves '):
      direction_of[row['video']] = answer[len('It moves '):-1]
  assert len(direction_of) == 10
  for split, pairs in (('train', 3), ('test', 2)):
    for pair in range(pairs):
      a = helpers.decode_all(os.path.join(out, 'videos', f'{split}_{pair:04d}_a.mp4'))
      b = helpers.decode_all(os.path.join(out, 'videos', f'{split}_{pair:04d}_b.mp4'))
      assert a.shape == (12, 48, 48, 3)
      np.testing.assert_array_equal(b, a[::-1])  # exactly the same frames, in reverse order
      assert not np.array_equal(a, a[::-1])
      dir_a, dir_b = direction_of[f'{split}_{pair:04d}_a.mp4'], direction_of[f'{split}_{pair:04d}_b.mp4']
      assert synthetic.OPPOSITE[dir_a] == dir_b
      dy, dx = centroid(a[-1]) - centroid(a[0])  # the answer is the true motion
      assert dir_a == ({True: 'right', False: 'left'}[dx > 0] if abs(dx) > abs(dy)
                       else {True: 'down', False: 'up'}[dy > 0])


def test_rows_are_videochat2_format_with_both_question_forms(built):
  out, _ = built
  rows = read_json(out, 'train.json')
  assert len(rows) == 12  # 6 videos x (direction row + attribute row)
  forms = set()
  for raw in rows:
    row = annotations.parse_row(raw)
    assert os.path.isfile(os.path.join(out, 'videos', row.video))
    for qa in row.qa:
      if '\nOptions:\n' in qa.question:
        letter, option = qa.answer[1], qa.answer[4:]
        assert qa.answer == f'({letter}) {option}' and f'({letter}) {option}' in qa.question
        forms.add('multiple-choice')
      else:
        assert qa.instruction == '' and qa.answer.startswith('It ')
        forms.add('open')
  assert forms == {'multiple-choice', 'open'}
  twin_rows = [r for r in rows if r['video'].endswith('_b.mp4') and 'direction' in r['QA'][0]['q']]
  assert twin_rows  # each direction question has its reversed twin


def test_mvbench_layout(built):
  out, _ = built
  tasks = read_json(out, 'mvbench', 'tasks.json')
  assert set(tasks) == {'Moving Direction', 'Moving Attribute'}
  for task in tasks.values():
    entries = read_json(out, 'mvbench', task['json'])
    assert len(entries) == 4  # the 4 test videos
    for entry in entries:
      assert set(entry) == {'video', 'question', 'candidates', 'answer'}
      assert entry['answer'] in entry['candidates']
      assert os.path.isfile(os.path.join(out, 'mvbench', task['prefix'], entry['video']))


def test_tokenizers_fit_the_tiny_model(built):
  out, info = built
  llm = transformers.AutoTokenizer.from_pretrained(os.path.join(out, 'tokenizers', 'llm'), local_files_only=True)
  qformer = transformers.AutoTokenizer.from_pretrained(os.path.join(out, 'tokenizers', 'qformer'),
                                                       local_files_only=True)
  assert llm.convert_tokens_to_ids('</s>') == 2 and llm.convert_tokens_to_ids('[PAD]') == len(llm) - 1
  assert qformer.convert_tokens_to_ids('[DEC]') == len(qformer) - 1
  assert len(llm) <= 256 and len(qformer) <= 128
  assert info['llm_vocab'] == len(llm) and info['qformer_vocab'] == len(qformer)
  ids = llm('###Human: Which direction does the red circle move? ###Assistant: ', add_special_tokens=False)
  assert llm.convert_tokens_to_ids('<unk>') not in ids['input_ids']


def test_build_is_deterministic(built, tmp_path):
  out, _ = built
  again = str(tmp_path / 'again')
  synthetic.build(again, **SMALL)
  for path in ('train.json', 'test.json', 'mvbench/json/moving_direction.json', 'tokenizers/llm/tokenizer.json',
               'tokenizers/qformer/tokenizer.json', 'videos/train_0001_a.mp4', 'videos/test_0000_b.mp4'):
    assert filecmp.cmp(os.path.join(out, path), os.path.join(again, path), shallow=False), path
  other = str(tmp_path / 'other')
  synthetic.build(other, **dict(SMALL, seed=4))
  assert not filecmp.cmp(os.path.join(out, 'train.json'), os.path.join(other, 'train.json'), shallow=False)


def test_command_line(tmp_path, capsys):
  synthetic.main(['--out', str(tmp_path / 'cli'), '--train-pairs', '1', '--test-pairs', '1', '--frames', '4',
                  '--size', '32'])
  assert 'wrote 4 videos' in capsys.readouterr().out
  assert read_json(tmp_path / 'cli', 'info.json')['command'].startswith('python -m stllm_jax.demo.synthetic --out')


def test_tiny_model_runs_on_a_synthetic_batch(built):
  out, _ = built
  model_config = configlib.load_config_file(os.path.join(os.path.dirname(__file__), '..', 'configs', 'tiny.py')).model
  data_config = synthetic.data_config(out, num_frames=4, image_size=model_config.vision.image_size, batch_size=2)
  batch = next(pipeline.make_train_iterator(data_config, 0, 1))
  assert batch['frames'].shape == (2, 4, 56, 56, 3)
  assert batch['input_ids'].max() < model_config.llm.vocab_size
  assert batch['qformer_input_ids'].max() < model_config.qformer.vocab_size
  assert batch['qformer_input_ids'].shape[1] <= model_config.qformer.max_positions
  model = stllm.STLLM(model_config)
  model_batch = {k: batch[k] for k in stllm.BATCH_KEYS}
  params = jax.jit(model.init)(jax.random.key(0), model_batch)
  logits = jax.jit(model.apply)(params, model_batch)
  k = model_config.qformer.num_query_tokens
  assert logits.shape == (2, 4 * k + batch['input_ids'].shape[1], model_config.llm.vocab_size)
  assert np.isfinite(np.asarray(logits)).all()


def test_question_forms_and_shape_sizes_are_chosen(tmp_path):
  out = str(tmp_path / 'open')
  info = synthetic.build(out, **dict(SMALL, train_pairs=2, test_pairs=1), radius_range=(0.2, 0.25),
                         train_forms=('open',))
  assert info['train_forms'] == ['open'] and info['radius_range'] == [0.2, 0.25]
  train_forms = {synthetic.question_form(qa) for row in read_json(out, 'train.json') for qa in row['QA']}
  test_forms = {synthetic.question_form(qa) for row in read_json(out, 'test.json') for qa in row['QA']}
  assert train_forms == {'open'} and test_forms == set(synthetic.QUESTION_FORMS)
  frames = synthetic.moving_shape_frames('square', 'red', 'left', 4, 48, np.random.default_rng(0), (0.2, 0.25))
  side = (np.abs(frames[0].astype(int) - synthetic.BACKGROUND).sum(-1) > 60).any(0).sum()  # square's width
  assert 2 * 0.85 * int(48 * 0.2) <= side <= 2 * 0.85 * int(48 * 0.25) + 1
  with pytest.raises(ValueError, match='train_forms'):
    synthetic.build(str(tmp_path / 'bad'), **SMALL, train_forms=('essay',))
