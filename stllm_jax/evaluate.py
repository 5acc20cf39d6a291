"""Benchmarks: MVBench (multiple choice, accuracy) and open-ended QA (predictions for an external judge).

    python -m stllm_jax.evaluate mvbench --checkpoint CKPT --data-root DIR [--out DIR] [--batch-size 4]
        [--frames fps|N|...] [--tasks "Moving Direction,Action Count"] [--limit N]
    python -m stllm_jax.evaluate qa --format msvd|msrvtt|activitynet|videochatgpt --checkpoint CKPT
        --questions FILE [--answers FILE] --video-dir DIR --out FILE [--batch-size 1] [--frames ...]

MVBench reads the published layout: DIR/json/<task>.json (entries `video`, `question`, `candidates`,
`answer`, and `start`/`end` for the tasks with bounds) and the media under DIR/video/ (files, GIFs, frame
folders), per the task table below; a DIR/tasks.json (task -> json, prefix, data_type, bound) replaces that
table (the synthetic set writes one). Prompt, greedy decoding (stop at `###`, 100 new tokens, no EOS first) and
answer matching are the original's (data/conversation.py). Frames: one per second, 4 to 16 (`--frames 16` for the
fixed-T column of the paper's Table 2), at the released benchmark's indices (`video.mvbench_indices`: bounds
rounded to frames, GIFs timed at 25 fps, frame folders at 3 fps numbered from 1). Predictions are appended to
OUT/predictions.jsonl as batches finish; the same command resumes an interrupted run where it stopped. A video
that cannot be read is recorded with its error and counted wrong (and reported).

QA writes, for the judge scripts of each benchmark, a JSON list in question order:
    msvd, msrvtt, activitynet: {"id", "question", "answer", "pred"}
    videochatgpt:              the input entry plus "pred"
with the released scripts' settings (stllm/test/qabench/*, vcgbench/*; `QA_PROTOCOLS`): beam search (5 beams,
repetition penalty 1.5, up to 300 new tokens, EOS never first); MSVD-QA and MSRVTT-QA at 64 frames without the
system text, ActivityNet-QA at 16 frames and VideoChatGPT-Bench at 64 with it (`--frames` overrides). As the
released scripts do, a context (visual + text tokens) longer than 2000 - 300 tokens loses its first visual tokens
(`--context-limit`); the cut is recorded per question and reported. Progress goes to OUT.partial.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Callable, Iterable, Sequence, TextIO

from tqdm import tqdm

from stllm_jax import generate
from stllm_jax.data import annotations, conversation, inference
from stllm_jax.data.errors import SampleError
from stllm_jax.errors import UserError, exit_with

VIDEO_EXTENSIONS = ('.mp4', '.avi', '.mov', '.mkv', '.webm', '.gif')

# The released MVBench decoding: greedy, 100 new tokens, stop at '###', and min_length=1 on inputs_embeds, which in
# its transformers 4.28 forbids EOS as the first new token.
MVBENCH_GENERATION = generate.GenerationConfig(max_new_tokens=100, min_new_tokens=1)
# The released QA scripts: Chat.answer(num_beams=5, max_new_tokens=300, max_length=2000), which forces repetition
# penalty 1.5, keeps min_length=1 and cuts the context from the left to max_length - max_new_tokens.
QA_CONTEXT_LIMIT = 2000
QA_GENERATION = generate.GenerationConfig(max_new_tokens=300, num_beams=5, repetition_penalty=1.5, min_new_tokens=1,
                                          context_limit=QA_CONTEXT_LIMIT)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  json: str  # relative to the data root
  prefix: str  # media folder, relative to the data root
  data_type: str  # 'video' | 'gif' | 'frame'
  bound: bool  # entries carry start/end seconds


# The published MVBench: task -> (annotation, media folder, kind, has start/end).
MVBENCH_TASKS = {
    'Action Sequence': TaskSpec('json/action_sequence.json', 'video/star/Charades_v1_480', 'video', True),
    'Action Prediction': TaskSpec('json/action_prediction.json', 'video/star/Charades_v1_480', 'video', True),
    'Action Antonym': TaskSpec('json/action_antonym.json', 'video/ssv2_video', 'video', False),
    'Fine-grained Action': TaskSpec('json/fine_grained_action.json', 'video/Moments_in_Time_Raw/videos', 'video', False),
    'Unexpected Action': TaskSpec('json/unexpected_action.json', 'video/FunQA_test/test', 'video', False),
    'Object Existence': TaskSpec('json/object_existence.json', 'video/clevrer/video_validation', 'video', False),
    'Object Interaction': TaskSpec('json/object_interaction.json', 'video/star/Charades_v1_480', 'video', True),
    'Object Shuffle': TaskSpec('json/object_shuffle.json', 'video/perception/videos', 'video', False),
    'Moving Direction': TaskSpec('json/moving_direction.json', 'video/clevrer/video_validation', 'video', False),
    'Action Localization': TaskSpec('json/action_localization.json', 'video/sta/sta_video', 'video', True),
    'Scene Transition': TaskSpec('json/scene_transition.json', 'video/scene_qa/video', 'video', False),
    'Action Count': TaskSpec('json/action_count.json', 'video/perception/videos', 'video', False),
    'Moving Count': TaskSpec('json/moving_count.json', 'video/clevrer/video_validation', 'video', False),
    'Moving Attribute': TaskSpec('json/moving_attribute.json', 'video/clevrer/video_validation', 'video', False),
    'State Change': TaskSpec('json/state_change.json', 'video/perception/videos', 'video', False),
    'Fine-grained Pose': TaskSpec('json/fine_grained_pose.json', 'video/nturgbd', 'video', False),
    'Character Order': TaskSpec('json/character_order.json', 'video/perception/videos', 'video', False),
    'Egocentric Navigation': TaskSpec('json/egocentric_navigation.json', 'video/vlnqa', 'video', False),
    'Episodic Reasoning': TaskSpec('json/episodic_reasoning.json', 'video/tvqa/frames_fps3_hq', 'frame', True),
    'Counterfactual Inference': TaskSpec('json/counterfactual_inference.json', 'video/clevrer/video_validation', 'video',
                                         False),
}
FRAME_FOLDER_FPS = 3.0  # MVBench's frame folders (TVQA) hold 3 frames per second


# ----------------------------------------------------------------------------------------- items


@dataclasses.dataclass(frozen=True)
class Item:
  """One question to answer."""
  key: str  # unique, stable across runs (resume)
  media_root: str  # the benchmark's video directory
  media: str  # the video's path as its annotation gives it, relative to media_root
  qformer_text: str
  prompt: str  # the text after '</s>'
  start: float | None = None
  end: float | None = None
  record: dict = dataclasses.field(default_factory=dict)  # what the prediction line starts from
  data_type: str = 'video'  # MVBench's media kind: video | gif | frame

  @property
  def video(self) -> str:
    """The media path as given (not yet checked to lie inside media_root: `annotations.media_path` does)."""
    return os.path.join(self.media_root, self.media)


def _read_json(path: str, what: str) -> Any:
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except FileNotFoundError as e:
    raise UserError(f'{what} {path} does not exist') from e
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f'{what} {path} cannot be read as JSON: {e}') from e


def mvbench_tasks(data_root: str, only: Sequence[str] = ()) -> dict[str, TaskSpec]:
  """The tasks present under `data_root` (DIR/tasks.json if it exists, else the published table)."""
  if not os.path.isdir(data_root):
    raise UserError(f'MVBench data root {data_root} does not exist')
  table_path = os.path.join(data_root, 'tasks.json')
  if os.path.exists(table_path):
    table = {name: TaskSpec(**spec) for name, spec in _read_json(table_path, 'MVBench task table').items()}
  else:
    table = dict(MVBENCH_TASKS)
  unknown = [name for name in only if name not in table]
  if unknown:
    raise UserError(f'--tasks {unknown} unknown; tasks: {", ".join(table)}')
  chosen = {name: spec for name, spec in table.items() if not only or name in only}
  present = {name: spec for name, spec in chosen.items() if os.path.exists(os.path.join(data_root, spec.json))}
  if not present:
    raise UserError(f'no MVBench task annotation found under {data_root} (expected e.g. '
                    f'{os.path.join(data_root, next(iter(chosen.values())).json)})')
  return present


def mvbench_items(data_root: str, tasks: dict[str, TaskSpec]) -> list[Item]:
  items = []
  for task, spec in tasks.items():
    path = os.path.join(data_root, spec.json)
    entries = _read_json(path, 'MVBench annotation')
    for index, entry in enumerate(entries):
      try:
        question, candidates, answer = entry['question'], list(entry['candidates']), entry['answer']
        truth = conversation.mvbench_ground_truth(candidates, answer)
        start, end = (float(entry['start']), float(entry['end'])) if spec.bound else (None, None)
        media = str(entry['video'])
      except (KeyError, TypeError, ValueError) as e:
        raise UserError(f'{path} entry {index} is malformed ({type(e).__name__}: {e}); an entry holds video, '
                        'question, candidates, answer (and start, end for this task)') from e
      text = conversation.mvbench_question(question, candidates)
      items.append(Item(f'{task}/{index}', os.path.join(data_root, spec.prefix), media, text,
                        conversation.mvbench_prompt(question, candidates), start, end,
                        dict(task=task, index=index, video=entry['video'], question=text, gt=truth), spec.data_type))
  return items


@dataclasses.dataclass(frozen=True)
class QAProtocol:
  """How the released script of one open-ended benchmark runs (script/inference/{qabench,vcgbench}/*.sh)."""
  num_frames: int  # segment middles of the whole video (--num-frames)
  with_system: bool  # the system text before '###Human: ' (Chat.answer's `system`)


QA_PROTOCOLS = {
    'msvd': QAProtocol(64, with_system=False),
    'msrvtt': QAProtocol(64, with_system=False),
    'activitynet': QAProtocol(16, with_system=True),
    'videochatgpt': QAProtocol(64, with_system=True),
}
QA_FORMATS = tuple(QA_PROTOCOLS)


def find_video(video_dir: str, name: str) -> str:
  """`name`, or `name` with the first of the usual extensions that exists in `video_dir` (as the original
  scripts look)."""
  if os.path.exists(os.path.join(video_dir, name)):
    return name
  for extension in VIDEO_EXTENSIONS:
    if os.path.exists(os.path.join(video_dir, name + extension)):
      return name + extension
  return name  # missing: reported per item


def qa_items(fmt: str, questions_path: str, answers_path: str, video_dir: str) -> list[Item]:
  questions = _read_json(questions_path, 'question file')
  if not isinstance(questions, list):
    raise UserError(f'{questions_path} must hold a JSON list of questions')
  answers = _read_json(answers_path, 'answer file') if answers_path else None
  if fmt == 'activitynet' and (answers is None or len(answers) != len(questions)):
    raise UserError('activitynet needs --answers FILE with one entry per question (the test_a.json of ActivityNet-QA)')
  with_system = QA_PROTOCOLS[fmt].with_system
  items = []
  for n, entry in enumerate(questions):
    try:
      if fmt == 'videochatgpt':
        question, name, record = entry['Q'], entry['video_name'], dict(entry)
      else:
        question = entry['question']
        if fmt == 'activitynet':
          name, qid, answer = 'v_' + entry['video_name'], entry['question_id'], answers[n]['answer']
        else:
          name = entry.get('video_name', entry.get('video', entry.get('video_id')))  # MSRVTT-QA: video_id
          qid, answer = entry.get('question_id', entry.get('id')), entry['answer']
          if name is None or qid is None:
            raise KeyError('video_name/video/video_id or question_id/id')
        record = dict(id=qid, question=question, answer=answer)
    except (KeyError, TypeError) as e:
      raise UserError(f'{questions_path} entry {n} does not have the {fmt} fields ({e})') from e
    items.append(Item(f'{n}', video_dir, find_video(video_dir, str(name)), question,
                      conversation.qa_prompt(question, with_system), record=record))
  return items


# ----------------------------------------------------------------------------------------- predictions on disk


class PredictionLog:
  """Predictions appended as JSON lines (flushed and synced per batch); finished keys survive interruptions."""

  def __init__(self, path: str, settings: dict):
    self.path = path
    self.done: dict[str, dict] = {}
    settings = json.loads(json.dumps(settings))  # as it reads back (tuples become lists)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    settings_path = path + '.settings.json'
    if os.path.exists(settings_path):
      with open(settings_path, encoding='utf-8') as f:
        previous = json.load(f)
      if previous != settings:
        changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        raise UserError(f'{path} holds predictions made with other settings ({", ".join(changed)} differ); '
                        'use another --out or delete it')
    else:
      with open(settings_path, 'w', encoding='utf-8') as f:
        json.dump(settings, f, indent=1, sort_keys=True)
    if os.path.exists(path):
      with open(path, encoding='utf-8') as f:
        lines = f.read().split('\n')
      for line in lines:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill: redone
          continue
        self.done[record['key']] = record
      with open(path, 'w', encoding='utf-8') as f:  # drop a torn last line
        f.writelines(json.dumps(r) + '\n' for r in self.done.values())

  def append(self, records: Iterable[dict]) -> None:
    with open(self.path, 'a', encoding='utf-8') as f:
      for record in records:
        f.write(json.dumps(record) + '\n')
        self.done[record['key']] = record
      f.flush()
      os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------- the loop


FrameLoader = Callable[[str, Item], inference.InferenceVideo]  # (media path inside the root, item) -> frames


def mvbench_frames(policy: inference.FramePolicy, image_size: int) -> FrameLoader:
  """MVBench's own frames (the released benchmark's indices, bounds, GIF and frame-folder rules)."""
  return lambda path, item: inference.load_mvbench_video(path, item.data_type, policy, image_size, item.start,
                                                         item.end, FRAME_FOLDER_FPS)


def qa_frames(policy: inference.FramePolicy, image_size: int) -> FrameLoader:
  """The released chat / QA frames of the whole video."""
  return lambda path, item: inference.load_video_with_policy(path, policy, image_size)


def answer_items(generator: generate.VideoGenerator, items: Sequence[Item], log: PredictionLog,
                 load_frames: FrameLoader, config: generate.GenerationConfig, batch_size: int,
                 finish: Callable[[Item, str | None, str | None], dict], out: TextIO) -> generate.GenerationStats:
  """Answers the items `log` does not hold yet, `batch_size` at a time, appending `finish(item, answer, error)`."""
  todo = [item for item in items if item.key not in log.done]
  if log.done:
    print(f'resuming: {len(items) - len(todo)} of {len(items)} questions already answered in {log.path}', file=out,
          flush=True)
  stats = generate.GenerationStats()
  progress = tqdm(total=len(items), initial=len(items) - len(todo), unit='question', file=sys.stderr,
                  dynamic_ncols=True)
  try:
    for first in range(0, len(todo), batch_size):
      batch = todo[first:first + batch_size]
      records, requests, readable = [], [], []
      for item in batch:
        try:
          loaded = load_frames(annotations.media_path(item.media_root, item.media), item)
        except SampleError as e:
          records.append(finish(item, None, str(e)))
          continue
        prompt_ids = conversation.encode_prompt(generator.llm_tokenizer, item.prompt)
        requests.append(generate.Request(loaded.frames, item.qformer_text, prompt_ids))
        readable.append((item, len(loaded.indices)))
      if requests:
        padded = requests + [requests[-1]] * (batch_size - len(requests))  # one program for every batch
        try:
          results, batch_stats = generator.generate(padded, config)
        except ValueError as e:  # a prompt longer than the model's positions
          raise UserError(f'{batch[0].key}...: {e}') from e
        batch_stats.new_tokens = sum(len(r.token_ids) for r in results[:len(requests)])  # not the filler rows
        stats.add(batch_stats)
        for (item, num_frames), result in zip(readable, results):
          records.append({**finish(item, result.text, None), 'frames': num_frames, 'context_cut': result.context_cut})
      log.append(records)
      progress.update(len(batch))
      progress.set_postfix_str(f'{stats.tokens_per_second:.1f} tokens/s', refresh=False)
  finally:
    progress.close()
  return stats


def mvbench_record(item: Item, answer: str | None, error: str | None) -> dict:
  record = dict(key=item.key, **item.record)
  if error is not None:
    return dict(record, pred='', correct=False, error=error)
  prediction = conversation.mvbench_prediction(answer)
  return dict(record, pred=prediction, correct=conversation.mvbench_is_correct(prediction, item.record['gt']))


def accuracy_table(records: Iterable[dict], task_order: Sequence[str]) -> tuple[list[tuple[str, int, int]], str]:
  """Per task (name, correct, total) in `task_order`, and the table as text with the overall lines."""
  counts = {task: [0, 0] for task in task_order}
  for record in records:
    counts[record['task']][0] += int(record['correct'])
    counts[record['task']][1] += 1
  rows = [(task, c, n) for task, (c, n) in counts.items() if n]
  width = max([len('Overall (all questions)')] + [len(task) for task, _, _ in rows])
  lines = [f'{"Task":<{width}}  {"correct":>7}  {"total":>5}  {"accuracy":>8}']
  for task, c, n in rows:
    lines.append(f'{task:<{width}}  {c:>7}  {n:>5}  {100 * c / n:>7.2f}%')
  correct, total = sum(c for _, c, _ in rows), sum(n for _, _, n in rows)
  mean = sum(100 * c / n for _, c, n in rows) / len(rows) if rows else 0.0
  lines.append(f'{"Overall (all questions)":<{width}}  {correct:>7}  {total:>5}  {100 * correct / max(total, 1):>7.2f}%')
  lines.append(f'{f"Mean over {len(rows)} tasks":<{width}}  {"":>7}  {"":>5}  {mean:>7.2f}%')
  return rows, '\n'.join(lines)


def describe_run(stats: generate.GenerationStats) -> str:
  return (f'{stats.new_tokens} tokens generated in {stats.seconds:.1f} s = {stats.tokens_per_second:.1f} tokens/s; '
          f'vision {stats.visual_seconds:.1f} s; compiling {stats.compile_seconds:.1f} s')


def _frame_policy(spec: str, generator: generate.VideoGenerator) -> inference.FramePolicy:
  try:
    return inference.parse_frame_policy(spec, generator.config.video_input, generator.config.num_local_frames)
  except ValueError as e:
    raise UserError(str(e)) from e


def run_mvbench(args: argparse.Namespace, out: TextIO) -> dict:
  only = [t.strip() for t in args.tasks.split(',') if t.strip()] if args.tasks else []
  tasks = mvbench_tasks(args.data_root, only)
  items = mvbench_items(args.data_root, tasks)
  if args.limit:
    items = [item for item in items if item.record['index'] < args.limit]
  print(f'MVBench: {len(tasks)} tasks, {len(items)} questions from {args.data_root}', file=out, flush=True)
  generator = generate.load_generator(args.checkpoint, args.llm_tokenizer, args.qformer_tokenizer)
  policy = _frame_policy(args.frames, generator)
  out_dir = args.out or os.path.join('eval', f'mvbench_{os.path.basename(os.path.normpath(args.checkpoint))}_'
                                             f'{policy.name}')
  log = PredictionLog(os.path.join(out_dir, 'predictions.jsonl'), dict(
      checkpoint=os.path.abspath(args.checkpoint), data_root=os.path.abspath(args.data_root), frames=policy.name,
      generation=dataclasses.asdict(MVBENCH_GENERATION)))
  print(f'frames: {policy.describe()}; predictions: {log.path}', file=out, flush=True)
  stats = answer_items(generator, items, log, mvbench_frames(policy, generator.config.vision.image_size),
                       MVBENCH_GENERATION, args.batch_size, mvbench_record, out)
  records = [log.done[item.key] for item in items]
  rows, table = accuracy_table(records, list(tasks))
  print(table, file=out)
  failed = [r for r in records if 'error' in r]
  if failed:
    print(f'{len(failed)} question(s) had unreadable media (counted wrong), e.g. {failed[0]["error"]}', file=out)
  if stats.new_tokens:
    print(describe_run(stats), file=out)
  summary = dict(tasks={task: dict(correct=c, total=n, accuracy=100 * c / n) for task, c, n in rows},
                 correct=sum(c for _, c, _ in rows), total=sum(n for _, _, n in rows),
                 mean_task_accuracy=sum(100 * c / n for _, c, n in rows) / len(rows), frames=policy.name,
                 unreadable=len(failed))
  with open(os.path.join(out_dir, 'accuracy.json'), 'w', encoding='utf-8') as f:
    json.dump(summary, f, indent=1)
  return summary


def qa_record(item: Item, answer: str | None, error: str | None) -> dict:
  record = dict(key=item.key, **item.record, pred=answer if answer is not None else '')
  return dict(record, error=error) if error is not None else record


def describe_context_cuts(records: Sequence[dict], config: generate.GenerationConfig) -> str:
  """One line on the contexts cut to fit config.context_limit ('' when none was)."""
  cut_tokens = [r['context_cut'] for r in records if r.get('context_cut')]
  if not cut_tokens:
    return ''
  return (f'{len(cut_tokens)} of {len(records)} contexts were longer than --context-limit {config.context_limit} - '
          f'{config.max_new_tokens} new tokens and lost their first visual tokens, as the released scripts cut them: '
          f'{min(cut_tokens)} to {max(cut_tokens)} tokens, {sum(cut_tokens) / len(cut_tokens):.0f} on average '
          '(context_cut in the .partial.jsonl)')


def run_qa(args: argparse.Namespace, out: TextIO) -> list[dict]:
  items = qa_items(args.format, args.questions, args.answers, args.video_dir)
  if args.limit:
    items = items[:args.limit]
  protocol = QA_PROTOCOLS[args.format]
  generator = generate.load_generator(args.checkpoint, args.llm_tokenizer, args.qformer_tokenizer)
  policy = _frame_policy(str(protocol.num_frames) if args.frames == 'auto' else args.frames, generator)
  config = dataclasses.replace(QA_GENERATION, max_new_tokens=args.max_new_tokens or QA_GENERATION.max_new_tokens,
                               num_beams=args.num_beams or QA_GENERATION.num_beams, context_limit=args.context_limit)
  try:
    config.validate()
  except ValueError as e:
    raise UserError(str(e)) from e
  log = PredictionLog(args.out + '.partial.jsonl', dict(
      checkpoint=os.path.abspath(args.checkpoint), questions=os.path.abspath(args.questions), format=args.format,
      frames=policy.name, generation=dataclasses.asdict(config)))
  print(f'{args.format}: {len(items)} questions; frames: {policy.describe()}; system text: '
        f'{"yes" if protocol.with_system else "no"}; {config.num_beams} beams; context limit '
        f'{config.context_limit or "none"}', file=out, flush=True)
  stats = answer_items(generator, items, log, qa_frames(policy, generator.config.vision.image_size), config,
                       args.batch_size, qa_record, out)
  records = [log.done[item.key] for item in items]
  predictions = [{k: v for k, v in r.items() if k not in ('key', 'frames', 'context_cut')} for r in records]
  with open(args.out, 'w', encoding='utf-8') as f:
    json.dump(predictions, f, indent=1)
  failed = sum('error' in p for p in predictions)
  print(f'wrote {len(predictions)} predictions to {args.out}' + (f' ({failed} with unreadable media)' if failed else ''),
        file=out)
  cut_report = describe_context_cuts(records, config)
  if cut_report:
    print(cut_report, file=out)
  if stats.new_tokens:
    print(describe_run(stats), file=out)
  return predictions


# ----------------------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog='python -m stllm_jax.evaluate', description=__doc__.split('\n\n')[0])
  commands = parser.add_subparsers(dest='benchmark', required=True)
  for name in ('mvbench', 'qa'):
    sub = commands.add_parser(name)
    sub.add_argument('--checkpoint', required=True, help='weights directory or training workdir')
    sub.add_argument('--batch-size', type=int, default=4 if name == 'mvbench' else 1)
    sub.add_argument('--frames', default='auto', help='auto (MVBench: fps; QA: the benchmark\'s count) | fps | '
                                                      'fps:LOW-HIGH | N (fixed) | global_local')
    sub.add_argument('--limit', type=int, default=0, help='only the first N questions (of each task for MVBench)')
    sub.add_argument('--llm-tokenizer', default='')
    sub.add_argument('--qformer-tokenizer', default='')
    if name == 'mvbench':
      sub.add_argument('--data-root', required=True, help='MVBench directory (json/ and video/)')
      sub.add_argument('--out', default='', help='output directory (default eval/mvbench_<checkpoint>_<frames>)')
      sub.add_argument('--tasks', default='', help='comma-separated task names (default: all found)')
    else:
      sub.add_argument('--format', required=True, choices=QA_FORMATS)
      sub.add_argument('--questions', required=True, help='question JSON of the benchmark')
      sub.add_argument('--answers', default='', help='answer JSON (ActivityNet-QA keeps answers apart)')
      sub.add_argument('--video-dir', required=True)
      sub.add_argument('--out', required=True, help='prediction JSON to write')
      sub.add_argument('--max-new-tokens', type=int, default=0, help='default 300')
      sub.add_argument('--num-beams', type=int, default=0, help='default 5')
      sub.add_argument('--context-limit', type=int, default=QA_CONTEXT_LIMIT,
                       help='visual + text + new tokens; a longer context loses its first visual tokens, counted and '
                            f'reported, as the released scripts cut it (default {QA_CONTEXT_LIMIT}; 0: never cut)')
  args = parser.parse_args(argv)
  if args.batch_size < 1:
    parser.error('--batch-size must be >= 1')
  return args


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  try:
    if args.benchmark == 'mvbench':
      run_mvbench(args, sys.stdout)
    else:
      run_qa(args, sys.stdout)
  except UserError as error:
    exit_with(error)
  except KeyboardInterrupt:
    print('interrupted; the predictions so far are saved: run the same command again to resume', file=sys.stderr)
    sys.exit(130)


if __name__ == '__main__':
  main()
