"""The built-in demo: a shortened run of the real command (all three models, tables, JSON, PNG, chat on its
workdir), the accuracy bookkeeping on hand-made answers, and why mean pooling cannot see direction."""

import ast
import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import jax_env

from stllm_jax import chat, configlib, train
from stllm_jax.configlib import load_config_file
from stllm_jax.data import inference
from stllm_jax.demo import run as demo, synthetic
from stllm_jax.errors import UserError
from stllm_jax.models import stllm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(ROOT, 'configs', 'demo.py')
SHORT = ['--config.train.steps=3', '--config.train.log_every=1', '--config.demo.towers.steps=2',
         '--config.demo.towers.batch_size=4', '--config.demo.train_pairs=6',
         '--config.demo.test_pairs=2', '--config.demo.test_frames=(8,)', '--config.demo.eval_batch_size=4',
         '--config.data.num_workers=0']


@pytest.fixture(scope='module')
def short_demo(tmp_path_factory):
  """`python -m stllm_jax.demo` (configs/demo.py by default) with the ablation, shortened (evaluated at the
  training frame count only; test_claim_tables_show_every_model_and_frame_count has two), run where a user would
  (data/demo relative to the working directory)."""
  cwd = tmp_path_factory.mktemp('demo')
  env = jax_env.subprocess_env()
  result = subprocess.run([sys.executable, '-m', 'stllm_jax.demo', '--workdir=runs/demo',
                           '--config.demo.ablation=True', *SHORT], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  return cwd, result


def test_short_demo_trains_evaluates_and_reports_every_model(short_demo):
  cwd, result = short_demo
  workdir = cwd / 'runs' / 'demo'
  results = json.loads((workdir / demo.RESULTS_JSON).read_text())
  assert [r['name'] for r in results['runs']] == [demo.MAIN, *demo.VARIANTS]
  assert results['train_frames'] == 8 and results['test_frames'] == [8]
  for run in results['runs']:
    assert run['steps'] == 3
    assert set(run['accuracy']) == {'8'}
    for acc in run['accuracy'].values():
      assert set(acc) == {'direction', 'shape', 'colour', 'all'} and all(0 <= v <= 1 for v in acc.values())
  assert (workdir / 'ablation' / 'mean_pool' / 'checkpoints').is_dir()
  assert (workdir / demo.RESULTS_PNG).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert (cwd / 'data' / 'demo' / 'info.json').is_file()
  assert (workdir / demo.TOWERS_DIR / 'model.json').is_file() and results['towers']['steps'] == 2
  assert 'initial weights from runs/demo/towers' in result.stdout + result.stderr
  for title in ('Claim 1', 'Claim 2', demo.MAIN_TITLE, *(v.title for v in demo.VARIANTS.values())):
    assert title in result.stdout
  # Each model answered every open question about each test video (2 pairs of twins) at the one frame count.
  answers = json.loads((workdir / demo.EVAL_JSON).read_text())['answers']
  assert len(answers) == 2 * 2 * len(demo.QUESTION_KINDS) and {a['frames'] for a in answers} == {8}


def test_rerun_resumes_and_reuses_the_evaluations(short_demo, monkeypatch):
  """The same demo again (in-process): nothing is rebuilt, trained or evaluated again, and the saved tables
  are printed."""
  cwd, _ = short_demo
  monkeypatch.chdir(cwd)
  before = (cwd / 'runs' / 'demo' / demo.EVAL_JSON).stat().st_mtime_ns
  overrides = dict(arg[len('--config.'):].split('=', 1) for arg in SHORT)
  config = demo.with_overrides(load_config_file(DEMO_CONFIG), {k: ast.literal_eval(v) for k, v in overrides.items()})
  lines = []
  demo.run(config, 'runs/demo', train.train, log=lines.append)
  assert not any('writing the synthetic set' in line for line in lines)  # the data was there
  assert (cwd / 'runs' / 'demo' / demo.EVAL_JSON).stat().st_mtime_ns == before  # same step: not evaluated again
  assert any('Claim 2' in line for line in lines)


def test_the_trainer_points_the_demo_config_to_the_demo(tmp_path):
  """The trainer does not run the demo (its towers, data and evaluation): one line says what does."""
  with pytest.raises(UserError, match=r"the built-in demo's config: run it with python -m stllm_jax.demo"):
    train.train_command(load_config_file(DEMO_CONFIG), str(tmp_path / 'run'))


def test_chat_answers_about_a_synthetic_video_from_the_demo_workdir(short_demo, capsys, monkeypatch):
  cwd, _ = short_demo
  monkeypatch.chdir(cwd)  # the workdir names its tokenizers relative to where the demo ran
  video = os.path.join('data', 'demo', 'videos', 'test_0000_a.mp4')
  chat.main(['--checkpoint', 'runs/demo', '--video', video, '--prompt', 'What shape is the moving object?',
             '--max-new-tokens', '6'])
  out = capsys.readouterr().out
  assert out.count('ST-LLM: ') == 1 and 'tokens/s' in out


# ----------------------------------------------------------------------------------------- bookkeeping


def test_predicted_class_needs_exactly_one_class_word():
  assert demo.predicted_class('It moves left.', 'direction') == 'left'
  assert demo.predicted_class('LEFT', 'direction') == 'left'
  assert demo.predicted_class('It moves left, then right.', 'direction') is None
  assert demo.predicted_class('It moves.', 'direction') is None
  assert demo.predicted_class('It is a circle.', 'shape') == 'circle'
  assert demo.predicted_class('It is a circles', 'shape') is None  # whole words only
  assert demo.predicted_class('It is red.', 'colour') == 'red'


def test_accuracies_and_twin_pairs_on_hand_made_answers():
  def record(kind, pair, correct, frames=8):
    return dict(kind=kind, pair=pair, correct=correct, frames=frames)
  records = [record('direction', 0, True), record('direction', 0, True),    # pair 0: both twins right
             record('direction', 1, True), record('direction', 1, False),   # pair 1: one right
             record('shape', 0, True), record('shape', 1, False), record('colour', 0, False),
             record('direction', 2, True, frames=4)]                          # another frame count
  acc = demo.accuracies(records[:7])
  assert acc == {'direction': 0.75, 'shape': 0.5, 'colour': 0.0, 'all': 4 / 7}
  assert demo.twins_told_apart(records, 8) == 0.5
  assert np.isnan(demo.twins_told_apart(records, 4))  # a pair needs both twins


def test_claim_tables_show_every_model_and_frame_count():
  acc = {'direction': 0.5, 'shape': 1.0, 'colour': 0.75, 'all': 0.75}
  results = {'runs': [dict(title='model A', accuracy={'4': acc, '8': acc}, twins_told_apart=0.25),
                      dict(title='model B', accuracy={'4': acc, '8': {**acc, 'direction': 0.125}},
                           twins_told_apart=0.0)]}
  text = demo.claim_tables(results, 8, (4, 8))
  assert '| model A |  50.0 |  25.0 | 100.0 |  75.0 |' in text
  assert '| model B |  12.5 |   0.0 | 100.0 |  75.0 |' in text
  assert '| model B | 75.0 / 50.0 | 75.0 / 12.5 |' in text


def test_bad_demo_settings_are_named():
  config = load_config_file(DEMO_CONFIG)
  config.demo.test_frames = (0, 8)
  with pytest.raises(UserError, match='demo.test_frames'):
    demo.demo_config(config)
  config = load_config_file(DEMO_CONFIG)
  config.demo.data_dir = '/elsewhere'
  with pytest.raises(UserError, match='not in demo.data_dir'):
    demo.demo_config(config)
  with pytest.raises(KeyError, match='no such key'):
    demo.with_overrides(load_config_file(DEMO_CONFIG), {'train.masking.enable': False})


def test_variants_change_only_what_they_say():
  config = load_config_file(DEMO_CONFIG)
  config.demo.ablation = True
  runs = {name: cfg for name, _, cfg, _ in demo.planned_runs(config, 'runs/demo')}
  assert runs['mean_pool'].model.video_input == 'mean' and not runs['mean_pool'].train.masking.enabled
  assert runs['no_masking'].model.video_input == 'all' and runs['no_masking'].train.mvm_weight == 0
  assert runs[demo.MAIN].train.masking.enabled and runs[demo.MAIN].train.mvm_weight == config.train.mvm_weight > 0
  assert configlib.to_dict(runs['no_masking'].model) == configlib.to_dict(config.model)
  # Every model starts from the same pretrained towers, frozen as in the paper.
  assert {cfg.init.checkpoint for cfg in runs.values()} == {os.path.join('runs/demo', demo.TOWERS_DIR)}
  assert all(tuple(cfg.train.frozen) == ('vision/.*', 'ln_vision/.*', 'qformer/.*') for cfg in runs.values())


# ----------------------------------------------------------------------------------------- mean pooling


def test_mean_pooled_tokens_of_reversed_twins_are_identical(tmp_path):
  """With every frame of a twin pair, mean pooling gets the same visual tokens for both videos (so no
  direction can be read from them); the spatio-temporal tokens differ."""
  config = load_config_file(DEMO_CONFIG)
  synthetic.build(str(tmp_path), seed=3, train_pairs=1, test_pairs=1, num_frames=16, size=64,
                  llm_vocab_size=config.demo.llm_vocab_size, qformer_vocab_size=config.demo.qformer_vocab_size)
  frames = [inference.load_video_for_inference(str(tmp_path / 'videos' / f'test_0000_{twin}.mp4'), sampling='even',
                                               num_frames=16, image_size=64).frames for twin in 'ab']
  np.testing.assert_array_equal(frames[1], frames[0][::-1])  # decoded twins are exact reverses
  text = dict(qformer_input_ids=np.ones((2, 5), np.int32), qformer_attention_mask=np.ones((2, 5), np.int32))
  batch = dict(frames=np.stack(frames), **text)
  tokens = {}
  for mode in ('mean', 'all'):
    model_config = configlib.to_dict(config.model) | {'video_input': mode}
    params = stllm.init_params(model_config, jax.random.key(0))
    visual_tokens = jax.jit(functools.partial(stllm.STLLM(model_config).apply, method='visual_tokens'))
    tokens[mode] = np.asarray(visual_tokens({'params': params}, batch))
  np.testing.assert_allclose(tokens['mean'][0], tokens['mean'][1], rtol=0, atol=1e-6)
  assert np.abs(tokens['all'][0] - tokens['all'][1]).max() > 1e-2


# ------------------------------------------------------------------------------------------- seeds


def _results(seed, direction, names=(demo.MAIN, 'mean_pool'), data=None):
  """A demo_results.json as run.run writes it, with one direction accuracy for every frame count."""
  def run(name):
    acc = {str(t): {'direction': direction, 'shape': 1.0, 'colour': 0.5, 'all': (direction + 1.5) / 3} for t in (4, 8)}
    return dict(name=name, title=f'title of {name}', accuracy=acc, twins_told_apart=direction / 2)
  return dict(seed=seed, data=data or {'seed': 0}, train_frames=8, test_frames=[4, 8], runs=[run(n) for n in names])


def test_tables_over_seeds_give_the_mean_and_the_range(tmp_path, capsys):
  from stllm_jax.demo import seeds  # pylint: disable=g-import-not-at-top
  workdirs = []
  for seed, direction, names, data in ((0, 0.5, (demo.MAIN, 'mean_pool'), {'seed': 0, 'seconds': 2.9}),
                                       (1, 0.75, (demo.MAIN,), None), (2, 1.0, (demo.MAIN,), None)):
    workdirs.append(tmp_path / f'seed{seed}')  # the first run wrote the set (and timed it), the others reused it
    workdirs[-1].mkdir()
    (workdirs[-1] / demo.RESULTS_JSON).write_text(json.dumps(_results(seed, direction, names, data)))
  summary = seeds.main([*map(str, workdirs), '--out', str(tmp_path / 'seeds.json')])
  main, pooled = summary['runs']
  assert main['claim1']['direction'] == dict(mean=0.75, min=0.5, max=1.0, n=3)
  assert main['claim1']['both twins right']['mean'] == 0.375 and main['by_frames']['4']['direction']['max'] == 1.0
  assert pooled['seeds'] == [0] and pooled['claim1']['direction']['n'] == 1  # the ablation ran on seed 0 only
  out = capsys.readouterr().out
  assert 'over seeds 0, 1, 2' in out
  assert f'| title of {demo.MAIN} | 75.0 (50.0-100.0) | 37.5 (25.0-50.0) | 100.0 (100.0-100.0) |' in out
  assert '| title of mean_pool (seeds 0) | 50.0 | 25.0 | 100.0 | 50.0 |' in out
  assert json.loads((tmp_path / 'seeds.json').read_text())['seeds'] == [0, 1, 2]


@pytest.mark.parametrize('second, message', [
    (_results(0, 0.5), 'repeat a seed'),
    (_results(1, 0.5, data={'seed': 7}), 'different demos'),
    (None, 'does not exist: run the demo into'),
])
def test_tables_over_seeds_refuse_what_is_not_seeds_of_one_demo(tmp_path, capsys, second, message):
  from stllm_jax.demo import seeds  # pylint: disable=g-import-not-at-top
  for name, results in (('a', _results(0, 0.5)), ('b', second)):
    (tmp_path / name).mkdir()
    if results:
      (tmp_path / name / demo.RESULTS_JSON).write_text(json.dumps(results))
  with pytest.raises(SystemExit) as exit_info:
    seeds.main([str(tmp_path / 'a'), str(tmp_path / 'b')])
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err
