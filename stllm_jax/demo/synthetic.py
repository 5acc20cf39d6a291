"""A synthetic video QA set that only a model that sees frame order can fully solve.

    python -m stllm_jax.demo.synthetic --out DIR [--seed 0] [--train-pairs 48] [--test-pairs 16]

writes (deterministically from the seed, in seconds on a laptop):

    DIR/videos/*.mp4              one coloured shape moving across a dark frame (lossless H.264, PyAV)
    DIR/train.json, DIR/test.json VideoChat2 format: {"video", "QA": [{"i", "q", "a"}, ...]}
    DIR/{train,test}_facts.json   per video: shape, colour, direction, twin pair, the shape's centre (y, x) per frame
    DIR/tokenizers/llm/           LLaMA-style tokenizer (</s> = BOS/EOS, [PAD] last), trained on the texts
    DIR/tokenizers/qformer/       BERT-style WordPiece tokenizer with [DEC]
    DIR/mvbench/json/{moving_direction,moving_attribute}.json   MVBench layout: video, question,
    DIR/mvbench/video/synthetic/*.mp4                            candidates, answer (test videos)
    DIR/mvbench/tasks.json        task name -> json file, video prefix, data type, bound (like MVBench's list)
    DIR/info.json                 seed, counts, sizes, the command

Videos come in time-reversed twins: video `b` holds exactly the frames of video `a` in reverse order, and its
direction answer is the opposite (left <-> right, up <-> down). Shape and colour are the same in both, so
those questions can be answered from any frame, while a model that averages over frames sees the same input
for both twins and cannot beat chance on direction. Direction questions come in multiple-choice form
(`(B) right`) and open form (`It moves right.`), shape and colour likewise. Frames are encoded losslessly so
the decoded twins are exact reverses of each other.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from typing import Any

import av
import ml_collections
import numpy as np

from stllm_jax.data import conversation
from stllm_jax.demo import tiny_tokenizers

SHAPES = ('circle', 'square', 'triangle')
COLOURS = {'red': (230, 40, 40), 'green': (40, 200, 60), 'blue': (50, 90, 240), 'yellow': (240, 220, 40)}
DIRECTIONS = {'left': (0, -1), 'right': (0, 1), 'up': (-1, 0), 'down': (1, 0)}  # (dy, dx)
OPPOSITE = {'left': 'right', 'right': 'left', 'up': 'down', 'down': 'up'}
BACKGROUND = (30, 30, 30)
MC_INSTRUCTION = ('Carefully watch the video and pay attention to the movement of objects. '
                  'Select the best option that accurately addresses the question.')
RADIUS_RANGE = (1 / 10, 1 / 7)  # shape radius, as a fraction of the frame size
QUESTION_FORMS = ('multiple_choice', 'open')
VERSION = 2  # of the set's layout (2: per-frame centres in {train,test}_facts.json); in info.json
MVBENCH_TASKS = {'Moving Direction': 'moving_direction.json', 'Moving Attribute': 'moving_attribute.json'}


# ----------------------------------------------------------------------------------------- frames


def shape_mask(shape: str, size: int, radius: int, centre: tuple[float, float]) -> np.ndarray:
  """bool [size, size]: pixels covered by `shape` of `radius` at `centre` (y, x)."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  dy, dx = yy - centre[0], xx - centre[1]
  if shape == 'circle':
    return dy * dy + dx * dx <= radius * radius
  if shape == 'square':
    return (np.abs(dy) <= radius * 0.85) & (np.abs(dx) <= radius * 0.85)
  if shape == 'triangle':  # apex up
    return (dy <= radius * 0.8) & (dy >= -radius) & (np.abs(dx) <= (dy + radius) * 0.6)
  raise ValueError(f'unknown shape {shape!r}; choose one of {SHAPES}')


def moving_shape_path(direction: str, num_frames: int, size: int, rng: np.random.Generator,
                      radius_range: tuple[float, float] = RADIUS_RANGE) -> tuple[int, np.ndarray]:
  """(radius, float32 [num_frames, 2] centres (y, x) in pixels) of a shape crossing the frame in `direction`."""
  radius = int(rng.integers(int(size * radius_range[0]), int(size * radius_range[1]) + 1))
  margin = radius + 2
  dy, dx = DIRECTIONS[direction]
  across = float(rng.uniform(margin, size - margin))  # position on the axis perpendicular to the motion
  # The path covers a random part of the frame (at least half of it), so that where a subset of the frames
  # lies (e.g. without the last one) says nothing about the direction.
  span = size - 2 * margin
  length = float(rng.uniform(0.5, 1.0)) * span
  start = margin + float(rng.uniform(0.0, span - length))
  stop = start + length
  centres = np.empty((num_frames, 2), np.float32)
  for t in range(num_frames):
    along = start + (stop - start) * t / max(num_frames - 1, 1)
    centres[t] = (across, along if dx > 0 else size - along) if dx else (along if dy > 0 else size - along, across)
  return radius, centres


def render_frames(shape: str, colour: str, radius: int, centres: np.ndarray, size: int) -> np.ndarray:
  """uint8 [T, size, size, 3]: `shape` in `colour` at each of the centres [T, 2] on the dark background."""
  frames = np.empty((len(centres), size, size, 3), np.uint8)
  for t, centre in enumerate(centres):
    frames[t] = BACKGROUND
    frames[t][shape_mask(shape, size, radius, (float(centre[0]), float(centre[1])))] = COLOURS[colour]
  return frames


def moving_shape_frames(shape: str, colour: str, direction: str, num_frames: int, size: int,
                        rng: np.random.Generator, radius_range: tuple[float, float] = RADIUS_RANGE) -> np.ndarray:
  """uint8 [num_frames, size, size, 3]: the shape crossing the frame in `direction`."""
  radius, centres = moving_shape_path(direction, num_frames, size, rng, radius_range)
  return render_frames(shape, colour, radius, centres, size)


def write_mp4(path: str, frames: np.ndarray, fps: int) -> None:
  """Lossless H.264 (qp 0, one thread: byte-identical output for identical frames)."""
  container = av.open(path, mode='w')
  stream = container.add_stream('libx264', rate=fps, options={'qp': '0', 'preset': 'veryfast'})
  stream.width, stream.height = frames.shape[2], frames.shape[1]
  stream.pix_fmt = 'yuv444p'
  stream.codec_context.thread_count = 1
  for frame in frames:
    for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')):
      container.mux(packet)
  for packet in stream.encode():
    container.mux(packet)
  container.close()


# ----------------------------------------------------------------------------------------- questions


def multiple_choice(question: str, options: list[str], answer: str) -> tuple[str, str]:
  """(question with lettered options, '(X) answer') in VideoChat2's multiple-choice style."""
  letters = [chr(ord('A') + n) for n in range(len(options))]
  lines = '\n'.join(f'({letter}) {option}' for letter, option in zip(letters, options))
  return f'{question}\nOptions:\n{lines}', f'({letters[options.index(answer)]}) {answer}'


def _shuffled(rng: np.random.Generator, options) -> list[str]:
  options = list(options)
  return [options[n] for n in rng.permutation(len(options))]


def direction_qa(shape: str, colour: str, direction: str, rng: np.random.Generator) -> list[dict[str, str]]:
  q, a = multiple_choice(f'Which direction does the {colour} {shape} move?', _shuffled(rng, DIRECTIONS), direction)
  return [dict(i=MC_INSTRUCTION, q=q, a=a),
          dict(i='', q=f'In which direction does the {shape} move?', a=f'It moves {direction}.')]


def attribute_qa(shape: str, colour: str, rng: np.random.Generator) -> list[dict[str, str]]:
  shape_q, shape_a = multiple_choice('What shape is the moving object?', _shuffled(rng, SHAPES), shape)
  colour_q, colour_a = multiple_choice(f'What colour is the moving {shape}?', _shuffled(rng, COLOURS), colour)
  return [dict(i=MC_INSTRUCTION, q=shape_q, a=shape_a),
          dict(i='', q='What shape is the moving object?', a=f'It is a {shape}.'),
          dict(i=MC_INSTRUCTION, q=colour_q, a=colour_a),
          dict(i='', q=f'What colour is the moving {shape}?', a=f'It is {colour}.')]


# ----------------------------------------------------------------------------------------- the set


def _make_pair(rng: np.random.Generator, num_frames: int, size: int, radius_range: tuple[float, float]):
  shape = SHAPES[int(rng.integers(len(SHAPES)))]
  colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
  direction = list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
  radius, centres = moving_shape_path(direction, num_frames, size, rng, radius_range)
  return shape, colour, direction, centres, render_frames(shape, colour, radius, centres, size)


def question_form(qa: dict[str, str]) -> str:
  """'multiple_choice' (with the instruction and lettered options) or 'open'."""
  return 'multiple_choice' if qa['i'] else 'open'


def build_split(out: str, split: str, num_pairs: int, rng: np.random.Generator, num_frames: int, size: int,
                fps: int, radius_range: tuple[float, float] = RADIUS_RANGE,
                forms: tuple[str, ...] = QUESTION_FORMS) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """Writes a split's videos; returns (VideoChat2 rows with the question `forms` asked, per-video facts)."""
  rows, facts = [], []
  keep = lambda qas: [qa for qa in qas if question_form(qa) in forms]
  for pair in range(num_pairs):
    shape, colour, direction, centres, frames = _make_pair(rng, num_frames, size, radius_range)
    for twin, order, twin_direction in (('a', slice(None), direction), ('b', slice(None, None, -1),
                                                                          OPPOSITE[direction])):
      twin_frames = frames[order]
      name = f'{split}_{pair:04d}_{twin}.mp4'
      write_mp4(os.path.join(out, 'videos', name), twin_frames, fps)
      rows.append(dict(video=name, QA=keep(direction_qa(shape, colour, twin_direction, rng))))
      rows.append(dict(video=name, QA=keep(attribute_qa(shape, colour, rng))))
      facts.append(dict(video=name, shape=shape, colour=colour, direction=twin_direction, pair=pair, twin=twin,
                        centres=np.round(centres[order], 3).tolist()))
  return rows, facts


def read_info(data_dir: str) -> dict[str, Any]:
  """The settings and sizes `build` wrote to data_dir/info.json."""
  return _read_json(os.path.join(data_dir, 'info.json'))


def read_facts(data_dir: str, split: str) -> list[dict[str, Any]]:
  """The per-video facts `build` wrote for `split` ('train' or 'test')."""
  return _read_json(os.path.join(data_dir, f'{split}_facts.json'))


def _read_json(path: str) -> Any:
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} is missing: write the synthetic set (python -m stllm_jax.demo.synthetic) '
                            'with this version of the generator')
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def mvbench_tasks(facts: list[dict[str, Any]], rng: np.random.Generator) -> dict[str, list[dict[str, Any]]]:
  """MVBench-format questions about the test videos: task json name -> entries."""
  direction, attribute = [], []
  for fact in facts:
    direction.append(dict(video=fact['video'], question=f'Which direction does the {fact["colour"]} '
                          f'{fact["shape"]} move?', candidates=_shuffled(rng, DIRECTIONS), answer=fact['direction']))
    if fact['twin'] == 'a':
      attribute.append(dict(video=fact['video'], question=f'What colour is the moving {fact["shape"]}?',
                            candidates=_shuffled(rng, COLOURS), answer=fact['colour']))
    else:
      attribute.append(dict(video=fact['video'], question='What shape is the moving object?',
                            candidates=_shuffled(rng, SHAPES), answer=fact['shape']))
  return {MVBENCH_TASKS['Moving Direction']: direction, MVBENCH_TASKS['Moving Attribute']: attribute}


def text_corpus(rows: list[dict[str, Any]], tasks: dict[str, list[dict[str, Any]]]) -> list[str]:
  """Every text the tokenizers should cover compactly: prompts, answers, MVBench prompts."""
  corpus = [conversation.MVBENCH_SYSTEM, conversation.MVBENCH_QUESTION_END, conversation.MVBENCH_ANSWER_START]
  for row in rows:
    for qa in row['QA']:
      corpus += [conversation.human_turn(qa['i'], qa['q']), qa['a'], conversation.qformer_text(qa['i'], qa['q'])]
  for entries in tasks.values():
    for entry in entries:
      corpus.append(multiple_choice(entry['question'], entry['candidates'], entry['answer'])[0])
  return corpus


def _write_json(path: str, value: Any) -> None:
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(value, f, indent=1)


def build(out: str, seed: int = 0, train_pairs: int = 48, test_pairs: int = 16, num_frames: int = 16,
          size: int = 64, fps: int = 8, llm_vocab_size: int = 256, qformer_vocab_size: int = 128,
          radius_range: tuple[float, float] = RADIUS_RANGE,
          train_forms: tuple[str, ...] = QUESTION_FORMS) -> dict[str, Any]:
  """Writes the whole set under `out` (replacing what the generator wrote there before); returns info.

  `train_forms` picks the question forms of train.json (test.json always has both).
  """
  unknown = set(train_forms) - set(QUESTION_FORMS)
  if unknown or not train_forms:
    raise ValueError(f'train_forms must be a non-empty subset of {QUESTION_FORMS}, got {train_forms}')
  began = time.perf_counter()
  for sub in ('videos', 'tokenizers', 'mvbench'):
    shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
  os.makedirs(os.path.join(out, 'videos'))
  rng = np.random.default_rng(seed)
  train_rows, train_facts = build_split(out, 'train', train_pairs, rng, num_frames, size, fps, radius_range,
                                        tuple(train_forms))
  test_rows, test_facts = build_split(out, 'test', test_pairs, rng, num_frames, size, fps, radius_range)
  _write_json(os.path.join(out, 'train.json'), train_rows)
  _write_json(os.path.join(out, 'test.json'), test_rows)
  _write_json(os.path.join(out, 'train_facts.json'), train_facts)
  _write_json(os.path.join(out, 'test_facts.json'), test_facts)

  tasks = mvbench_tasks(test_facts, rng)
  video_dir = os.path.join(out, 'mvbench', 'video', 'synthetic')
  os.makedirs(video_dir)
  os.makedirs(os.path.join(out, 'mvbench', 'json'))
  for fact in test_facts:
    shutil.copyfile(os.path.join(out, 'videos', fact['video']), os.path.join(video_dir, fact['video']))
  for json_name, entries in tasks.items():
    _write_json(os.path.join(out, 'mvbench', 'json', json_name), entries)
  _write_json(os.path.join(out, 'mvbench', 'tasks.json'),
              {task: dict(json=f'json/{json_name}', prefix='video/synthetic', data_type='video', bound=False)
               for task, json_name in MVBENCH_TASKS.items()})

  corpus = text_corpus(train_rows + test_rows, tasks)
  llm_dir = tiny_tokenizers.build_llm_tokenizer(os.path.join(out, 'tokenizers', 'llm'), corpus, llm_vocab_size)
  qformer_dir = tiny_tokenizers.build_qformer_tokenizer(os.path.join(out, 'tokenizers', 'qformer'), corpus,
                                                        qformer_vocab_size)
  info = dict(version=VERSION, seed=seed, train_pairs=train_pairs, test_pairs=test_pairs, num_frames=num_frames,
              size=size, fps=fps, radius_range=list(radius_range), train_forms=list(train_forms),
              train_rows=len(train_rows), test_rows=len(test_rows), videos=2 * (train_pairs + test_pairs),
              llm_vocab=len(conversation.load_llm_tokenizer.__wrapped__(llm_dir)),
              qformer_vocab=len(conversation.load_qformer_tokenizer.__wrapped__(qformer_dir)),
              command=f'python -m stllm_jax.demo.synthetic --out {out} --seed {seed} --train-pairs {train_pairs} '
                      f'--test-pairs {test_pairs}')
  _write_json(os.path.join(out, 'info.json'), info)
  info['seconds'] = time.perf_counter() - began
  return info


def data_config(out: str, num_frames: int = 8, image_size: int = 224, batch_size: int = 8,
                num_workers: int = 0) -> ml_collections.ConfigDict:
  """A `config.data` that trains on the synthetic set written to `out`."""
  from stllm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = pipeline.default_config()
  config.datasets.synthetic = pipeline.dataset_entry(os.path.join(out, 'train.json'), os.path.join(out, 'videos'),
                                                     num_frames=num_frames)
  config.llm_tokenizer = os.path.join(out, 'tokenizers', 'llm')
  config.qformer_tokenizer = os.path.join(out, 'tokenizers', 'qformer')
  # Small buckets that fit configs/tiny.py (Q-Former positions 64, LLM positions 512).
  config.update(image_size=image_size, batch_size=batch_size, num_workers=num_workers, text_buckets=(64, 128),
                qformer_buckets=(32, 64), qformer_max_length=64)
  return config


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', required=True, help='output directory')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--train-pairs', type=int, default=48, help='twin pairs (2 videos each) in train.json')
  parser.add_argument('--test-pairs', type=int, default=16, help='twin pairs in test.json and mvbench/')
  parser.add_argument('--frames', type=int, default=16, help='frames per video')
  parser.add_argument('--size', type=int, default=64, help='frame height and width')
  parser.add_argument('--fps', type=int, default=8)
  args = parser.parse_args(argv)
  info = build(args.out, args.seed, args.train_pairs, args.test_pairs, args.frames, args.size, args.fps)
  print(f'wrote {info["videos"]} videos, {info["train_rows"]} train rows, {info["test_rows"]} test rows, '
        f'tokenizers ({info["llm_vocab"]} / {info["qformer_vocab"]} ids) and mvbench/ to {args.out} '
        f'in {info["seconds"]:.1f} s')


if __name__ == '__main__':
  main()
