"""The built-in demo: a tiny ST-LLM trained from scratch on synthetic moving shapes, testing the paper's claims.

    python -m stllm_jax.demo [--config configs/demo.py] [--workdir runs/demo] [--config.demo.ablation=True]

`configs/demo.py` carries a `demo` section; `python -m stllm_jax.demo` hands it to `run`, which
  1. writes the synthetic set (synthetic.py: time-reversed twin videos) if it is not there yet;
  2. trains the config's model (ST-LLM: every spatio-temporal token, dynamic masking + MVM) in the workdir,
     and with `demo.ablation` also the variants of VARIANTS, each in WORKDIR/ablation/<name>;
  3. asks every trained model the open questions about each held-out test video (direction, shape, colour)
     at each of `demo.test_frames` frame counts, greedy decoding through the chat path (generate.py);
  4. prints two tables and writes WORKDIR/demo_results.json and WORKDIR/demo_results.png:
       claim 1  accuracy by question at the training frame count: spatio-temporal tokens vs mean pooling
                (mean pooling sees the same tokens for a video and its reversed twin: it cannot tell
                their directions apart);
       claim 2  accuracy by test frame count, with and without masking + MVM (the paper's Fig. 4).
Rerunning the command resumes unfinished training and reuses finished evaluations.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import ml_collections
import numpy as np
from tqdm import tqdm

from stllm_jax import checkpoints, configlib, generate
from stllm_jax.data import conversation, inference
from stllm_jax.demo import synthetic, tower_pretraining
from stllm_jax.errors import UserError
from stllm_jax.metrics import progress_bar

RESULTS_JSON = 'demo_results.json'
RESULTS_PNG = 'demo_results.png'
EVAL_JSON = 'demo_eval.json'  # per trained model: its answers and accuracies, reused while its step is unchanged
TOWERS_DIR = 'towers'  # in the workdir: the pretrained towers every model starts from (config.init.checkpoint)
QUESTION_KINDS = ('direction', 'shape', 'colour')
CLASSES = {'direction': tuple(synthetic.DIRECTIONS), 'shape': synthetic.SHAPES, 'colour': tuple(synthetic.COLOURS)}


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  """`config.demo`."""
  data_dir: str = 'data/demo'  # the synthetic set; written there if missing
  data_seed: int = 0
  train_pairs: int = 400  # time-reversed twin pairs (2 videos each) to train on
  test_pairs: int = 32  # held-out pairs to evaluate on
  video_frames: int = 16  # frames per synthetic video
  video_size: int = 64  # their height and width
  radius_range: tuple[float, float] = (1 / 6, 1 / 4)  # shape radius as a fraction of video_size
  train_forms: tuple[str, ...] = ('open',)  # question forms to train on ('open', 'multiple_choice')
  llm_vocab_size: int = 512  # tokenizers trained on the set's texts (at most this many ids)
  qformer_vocab_size: int = 256
  test_frames: tuple[int, ...] = (4, 6, 8, 12, 16)
  ablation: bool = False  # also train the VARIANTS (three models in all)
  eval_batch_size: int = 32
  max_new_tokens: int = 8  # answers are 'It moves left.' and the like
  # The stand-in for the towers' pretraining (tower_pretraining.py), written to WORKDIR/towers.
  towers: tower_pretraining.TowerPretrainConfig = dataclasses.field(
      default_factory=tower_pretraining.TowerPretrainConfig)


@dataclasses.dataclass(frozen=True)
class Variant:
  title: str
  overrides: Mapping[str, Any]  # dotted config keys -> values, applied to the demo config


# The models the ablation compares with the config as given (ST-LLM: all tokens, masking + MVM).
MAIN = 'st_llm'
VARIANTS = {
    'no_masking': Variant('all tokens, no masking / MVM', {'train.masking.enabled': False, 'train.mvm_weight': 0.0}),
    'mean_pool': Variant('mean pooling (baseline)', {'model.video_input': 'mean', 'train.masking.enabled': False,
                                                     'train.mvm_weight': 0.0}),
}
MAIN_TITLE = 'ST-LLM: all tokens, masking + MVM'


def demo_config(config: Any) -> DemoConfig:
  """`config.demo`, checked (UserError for a bad value or data paths outside demo.data_dir)."""
  try:
    cfg = configlib.from_dict(DemoConfig, config.demo, 'demo')
  except (TypeError, ValueError) as err:
    raise UserError(f'bad config: {err}') from None
  if not cfg.test_frames or min(cfg.test_frames) < 1:
    raise UserError(f'demo.test_frames must be positive frame counts, got {cfg.test_frames}')
  for name, entry in configlib.to_dict(config.data.datasets).items():
    if not os.path.abspath(entry['annotation']).startswith(os.path.abspath(cfg.data_dir) + os.sep):
      raise UserError(f'data.datasets.{name}.annotation {entry["annotation"]!r} is not in demo.data_dir '
                      f'{cfg.data_dir!r}: the demo writes its set there (change data_dir in configs/demo.py, '
                      'which derives the data paths from it)')
  return cfg


# ----------------------------------------------------------------------------------------- data


def ensure_data(cfg: DemoConfig, log: Callable[[str], None]) -> dict:
  """The synthetic set in cfg.data_dir, written if missing or made with other settings; returns its info."""
  wanted = dict(version=synthetic.VERSION, seed=cfg.data_seed, train_pairs=cfg.train_pairs, test_pairs=cfg.test_pairs,
                num_frames=cfg.video_frames, size=cfg.video_size, radius_range=list(cfg.radius_range),
                train_forms=list(cfg.train_forms))
  if os.path.isfile(os.path.join(cfg.data_dir, 'info.json')):
    info = synthetic.read_info(cfg.data_dir)
    if all(info.get(k) == v for k, v in wanted.items()):
      return info
    log(f'{cfg.data_dir} holds a synthetic set made with other settings: writing it anew')
  log(f'writing the synthetic set to {cfg.data_dir} ({2 * (cfg.train_pairs + cfg.test_pairs)} videos) ...')
  info = synthetic.build(cfg.data_dir, cfg.data_seed, cfg.train_pairs, cfg.test_pairs, cfg.video_frames,
                         cfg.video_size, llm_vocab_size=cfg.llm_vocab_size, qformer_vocab_size=cfg.qformer_vocab_size,
                         radius_range=cfg.radius_range, train_forms=cfg.train_forms)
  log(f'  done in {info["seconds"]:.1f} s: {info["videos"]} videos, tokenizers of {info["llm_vocab"]} / '
      f'{info["qformer_vocab"]} ids')
  return info


# ----------------------------------------------------------------------------------------- variants


def with_overrides(config: Any, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted keys replaced ('train.masking.enabled' -> False)."""
  config = ml_collections.ConfigDict(configlib.to_dict(config))
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split('.')
    node = config
    for name in parents:
      node = node[name]
    if leaf not in node:
      raise KeyError(f'override {dotted!r}: the config has no such key')
    node[leaf] = value
  return config


def planned_runs(config: Any, workdir: str) -> list[tuple[str, str, ml_collections.ConfigDict, str]]:
  """(name, title, config, workdir) of every model to train: the config itself, then the ablation's; each
  starts from the pretrained towers in WORKDIR/towers."""
  start = {'init.checkpoint': os.path.join(workdir, TOWERS_DIR)}
  runs = [(MAIN, MAIN_TITLE, with_overrides(config, start), workdir)]
  if demo_config(config).ablation:
    for name, variant in VARIANTS.items():
      runs.append((name, variant.title, with_overrides(config, {**variant.overrides, **start}),
                   os.path.join(workdir, 'ablation', name)))
  return runs


def tower_texts(fact: Mapping[str, str]) -> list[str]:
  """The Q-Former texts the towers are pretrained with on a video's frames: those of the open questions
  training asks (questions(fact)), with the shape named in every question that names one set to each shape
  in turn. Two of the three questions name the true shape, so without this the towers would read the
  shape off the text and not off the pixels (measured: shape 100% with a text that names it, 66% with one
  that does not, at 1,500 steps)."""
  return list(dict.fromkeys(conversation.qformer_text('', question) for shape in synthetic.SHAPES
                            for _, question, _ in questions(dict(fact, shape=shape))))  # distinct, in order


# ----------------------------------------------------------------------------------------- evaluation


def questions(fact: Mapping[str, str]) -> list[tuple[str, str, str]]:
  """(kind, question, true class) of the open questions about one test video, as the training set asks them."""
  return [('direction', f'In which direction does the {fact["shape"]} move?', fact['direction']),
          ('shape', 'What shape is the moving object?', fact['shape']),
          ('colour', f'What colour is the moving {fact["shape"]}?', fact['colour'])]


def predicted_class(answer: str, kind: str) -> str | None:
  """The one class word of `kind` the answer names ('It moves left.' -> 'left'); None if none or several."""
  words = set(re.findall(r'[a-z]+', answer.lower()))
  named = [c for c in CLASSES[kind] if c in words]
  return named[0] if len(named) == 1 else None


def accuracies(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """Share of correct answers per question kind and over all records ('all')."""
  result = {}
  for kind in QUESTION_KINDS:
    of_kind = [r['correct'] for r in records if r['kind'] == kind]
    if of_kind:
      result[kind] = float(np.mean(of_kind))
  result['all'] = float(np.mean([r['correct'] for r in records])) if records else float('nan')
  return result


def answer_questions(generator: generate.VideoGenerator, data_dir: str, facts: Sequence[Mapping[str, str]],
                     num_frames: int, batch_size: int, max_new_tokens: int, progress: tqdm) -> list[dict]:
  """Every open question about every test video, each video seen through the middles of `num_frames` equal
  segments (`even` sampling, as the demo's numbers were measured)."""
  tokenizer = generator.llm_tokenizer
  pending = []  # (record, request)
  for fact in facts:
    loaded = inference.load_video_for_inference(os.path.join(data_dir, 'videos', fact['video']), sampling='even',
                                                num_frames=num_frames, image_size=generator.config.vision.image_size)
    for kind, question, truth in questions(fact):
      prompt_ids = conversation.encode_turns(tokenizer, conversation.chat_turns([], question))
      record = dict(video=fact['video'], pair=fact['pair'], twin=fact['twin'], frames=num_frames, kind=kind,
                    question=question, truth=truth)
      pending.append((record, generate.Request(loaded.frames, question, prompt_ids)))
  config = generate.GenerationConfig(max_new_tokens=max_new_tokens)
  records = []
  for first in range(0, len(pending), batch_size):
    chunk = pending[first:first + batch_size]
    requests = [request for _, request in chunk]
    requests += [requests[-1]] * (batch_size - len(requests))  # one compiled program for every batch
    results, _ = generator.generate(requests, config)
    for (record, _), result in zip(chunk, results):
      predicted = predicted_class(result.text, record['kind'])
      records.append(dict(record, answer=result.text, predicted=predicted, correct=predicted == record['truth']))
    progress.update(len(chunk))
  return records


def evaluate_run(run_dir: str, cfg: DemoConfig, facts: Sequence[Mapping[str, str]], log: Callable[[str], None]
                 ) -> dict:
  """Accuracies of the model trained in `run_dir` at every test frame count (cached in run_dir/EVAL_JSON)."""
  cache_path = os.path.join(run_dir, EVAL_JSON)
  step = checkpoints.RunCheckpoints(run_dir).latest_step()
  settings = dict(step=step, test_frames=list(cfg.test_frames), videos=len(facts), max_new_tokens=cfg.max_new_tokens)
  if os.path.isfile(cache_path):
    with open(cache_path, encoding='utf-8') as f:
      cached = json.load(f)
    if cached.get('settings') == settings:
      return cached
  generator = generate.load_generator(run_dir)
  began = time.perf_counter()
  total = len(facts) * len(QUESTION_KINDS) * len(cfg.test_frames)
  by_frames, records = {}, []
  with progress_bar(total=total, desc=f'evaluate {os.path.basename(os.path.normpath(run_dir))}',
                    unit='question') as progress:
    for num_frames in cfg.test_frames:
      answered = answer_questions(generator, cfg.data_dir, facts, num_frames, cfg.eval_batch_size,
                                  cfg.max_new_tokens, progress)
      by_frames[str(num_frames)] = accuracies(answered)
      records += answered
  result = dict(settings=settings, accuracy=by_frames, seconds=time.perf_counter() - began, answers=records)
  with open(cache_path, 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=1)
  log(f'evaluated {run_dir} in {result["seconds"]:.0f} s ({total} questions)')
  return result


def twins_told_apart(records: Sequence[Mapping[str, Any]], num_frames: int) -> float:
  """Share of test twin pairs whose two direction answers are both right (a model blind to order scores 0
  on pairs it answers identically)."""
  answers = {}
  for r in records:
    if r['kind'] == 'direction' and r['frames'] == num_frames:
      answers.setdefault(r['pair'], []).append(r['correct'])
  pairs = [all(v) for v in answers.values() if len(v) == 2]
  return float(np.mean(pairs)) if pairs else float('nan')


# ----------------------------------------------------------------------------------------- reporting


def _percent(value: float) -> str:
  return '  n/a' if value != value else f'{100 * value:5.1f}'


def claim_tables(results: Mapping[str, Any], train_frames: int, test_frames: Sequence[int]) -> str:
  """The two claims as markdown tables (accuracy in %)."""
  key = str(train_frames)
  lines = [f'Claim 1: spatio-temporal tokens vs mean pooling (accuracy %, {train_frames} test frames = training)',
           '', '| model | direction | both twins right | shape | colour |', '|---|---|---|---|---|']
  for run in results['runs']:
    acc = run['accuracy'].get(key, {})
    lines.append(f'| {run["title"]} | {_percent(acc.get("direction", float("nan")))} | '
                 f'{_percent(run["twins_told_apart"])} | {_percent(acc.get("shape", float("nan")))} | '
                 f'{_percent(acc.get("colour", float("nan")))} |')
  lines.append(f'| chance | {_percent(0.25)} | {_percent(0.25 * 0.25)} | {_percent(1 / 3)} | {_percent(0.25)} |')
  header = ' | '.join(str(t) for t in test_frames)
  lines += ['', f'Claim 2: accuracy % (all questions / direction) by test frames (trained at {train_frames})', '',
            f'| model | {header} |', '|---|' + '---|' * len(test_frames)]
  for run in results['runs']:
    cells = []
    for t in test_frames:
      acc = run['accuracy'].get(str(t), {})
      cells.append(f'{_percent(acc.get("all", float("nan"))).strip()} / '
                   f'{_percent(acc.get("direction", float("nan"))).strip()}')
    lines.append(f'| {run["title"]} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def save_plot(results: Mapping[str, Any], path: str, train_frames: int, test_frames: Sequence[int]) -> None:
  """Accuracy against test frames, one line per model (all questions, and direction alone)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  for ax, kind, title in zip(axes, ('all', 'direction'), ('all questions', 'direction questions')):
    for run in results['runs']:
      values = [100 * run['accuracy'][str(t)].get(kind, float('nan')) for t in test_frames]
      ax.plot(test_frames, values, marker='o', label=run['title'])
    ax.axvline(train_frames, color='grey', linestyle=':', linewidth=1)
    ax.axhline(25, color='grey', linestyle='--', linewidth=1)
    ax.set(title=title, xlabel='test frames', xticks=list(test_frames), ylim=(0, 100))
    ax.grid(alpha=0.3)
  axes[0].set_ylabel('accuracy (%)')
  axes[1].legend(loc='center right', fontsize=8)
  fig.suptitle(f'Tiny ST-LLM on synthetic moving shapes (trained at {train_frames} frames; dashed: chance)')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


# ----------------------------------------------------------------------------------------- the whole demo


def run(config: Any, workdir: str, train: Callable[[Any, str], dict], log: Callable[[str], None] = print) -> dict:
  """Data, training of every planned model, evaluation, tables, JSON and plot; returns the results."""
  cfg = demo_config(config)
  began = time.perf_counter()
  info = ensure_data(cfg, log)
  facts = synthetic.read_facts(cfg.data_dir, 'test')
  train_frames = _train_frames(config)
  towers_dir = os.path.join(workdir, TOWERS_DIR)
  log(f'--- visual towers: {towers_dir}')
  towers = tower_pretraining.ensure_towers(config, cfg.towers, cfg.data_dir, towers_dir, tower_texts, log)
  runs = []
  for name, title, run_config, run_dir in planned_runs(config, workdir):
    log(f'--- {title}: training in {run_dir}')
    train_began = time.perf_counter()
    train(run_config, run_dir)
    train_seconds = time.perf_counter() - train_began
    evaluation = evaluate_run(run_dir, cfg, facts, log)
    runs.append(dict(name=name, title=title, workdir=run_dir, steps=evaluation['settings']['step'],
                     train_seconds_this_call=train_seconds, eval_seconds=evaluation['seconds'],
                     accuracy=evaluation['accuracy'], twins_told_apart=twins_told_apart(evaluation['answers'],
                                                                                         train_frames)))
  results = dict(seed=config.seed, data=info, towers=dict(held_out=towers['held_out'], seconds=towers['seconds'],
                                                          steps=cfg.towers.steps),
                 train_frames=train_frames, test_frames=list(cfg.test_frames), runs=runs,
                 wall_seconds=time.perf_counter() - began, command=' '.join(sys.argv))
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, RESULTS_JSON), 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=1)
  save_plot(results, os.path.join(workdir, RESULTS_PNG), train_frames, cfg.test_frames)
  log('')
  log(claim_tables(results, train_frames, cfg.test_frames))
  log('')
  log(f'{len(runs)} model(s) in {results["wall_seconds"]:.0f} s; results in {os.path.join(workdir, RESULTS_JSON)} '
      f'and {os.path.join(workdir, RESULTS_PNG)}')
  log(f'chat with it: python -m stllm_jax.chat --checkpoint {workdir} --video '
      f'{os.path.join(cfg.data_dir, "videos", facts[0]["video"])} --prompt "In which direction does the '
      f'{facts[0]["shape"]} move?"')
  return results


def _train_frames(config: Any) -> int:
  frames = {entry['num_frames'] for entry in configlib.to_dict(config.data.datasets).values()}
  if len(frames) != 1:
    raise ValueError(f'the demo trains on one frame count; config.data.datasets has {sorted(frames)}')
  return frames.pop()
