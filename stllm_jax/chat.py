"""Chat with ST-LLM about a video, in the terminal.

    python -m stllm_jax.chat --checkpoint CKPT --video FILE [--prompt TEXT] [--frames auto|fps|fps:4-16|N|global_local]
        [--multi-turn] [--max-new-tokens N] [--num-beams 5] [--repetition-penalty 1.5] [--sample --temperature 1.0
        --top-p 0.9]

With `--prompt` it answers once and exits; otherwise it reads questions from standard input until an empty
input at end of file, `exit` or `quit`. By default every question is answered on its own, as the released demo
does: `</s>{system text}###Human: {question} ###Assistant: ` after the visual tokens, 5 beams, repetition
penalty 1.5, up to 300 new tokens, EOS never first, and a context longer than 2000 - 300 tokens loses its first
visual tokens (said on screen; `--context-limit`). `--multi-turn` keeps the conversation in the training
template instead (`</s>###Human: q1 ###Assistant: a1</s>###Human: q2 ###Assistant: `, no system text; `/reset`
forgets it). The Q-Former reads the current question. Frames: a global-local model (the conversation model)
takes 64 segment middles as the demo does, others one per second, 4 to 16 (`auto`). The frames used (count,
timestamps) and the speed (tokens/s) are printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Callable, TextIO

import numpy as np

from stllm_jax import generate
from stllm_jax.data import conversation, inference, video
from stllm_jax.data.errors import SampleError
from stllm_jax.errors import UserError, exit_with

# The released demo (demo.py, Chat.answer with the instructblip conversation): 5 beams, repetition penalty 1.5,
# 300 new tokens, min_length 1 (EOS never first).
DEFAULT_MAX_NEW_TOKENS = 300
DEFAULT_NUM_BEAMS = 5
DEFAULT_REPETITION_PENALTY = 1.5
DEFAULT_CONTEXT_LIMIT = 2000  # its max_length: the context is cut from the left to 2000 - max_new_tokens


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog='python -m stllm_jax.chat', description=__doc__.split('\n\n')[0])
  parser.add_argument('--checkpoint', required=True, help='weights directory (convert output) or training workdir')
  parser.add_argument('--video', required=True, help='video file (mp4, webm, mkv, avi, gif) or a folder of frames')
  parser.add_argument('--prompt', help='answer this one question and exit')
  parser.add_argument('--frames', default='auto', help='auto | fps | fps:LOW-HIGH | N (fixed) | global_local')
  parser.add_argument('--multi-turn', action='store_true',
                      help='keep the conversation (training template, no system text) instead of answering each '
                           'question alone as the released demo does')
  parser.add_argument('--max-new-tokens', type=int, default=0,
                      help=f'answer length limit (default {DEFAULT_MAX_NEW_TOKENS}, fewer if the model\'s positions run out)')
  parser.add_argument('--num-beams', type=int, default=DEFAULT_NUM_BEAMS)
  parser.add_argument('--sample', action='store_true', help='sample (temperature, top-p) instead of greedy')
  parser.add_argument('--temperature', type=float, default=1.0)
  parser.add_argument('--top-p', type=float, default=0.9)
  parser.add_argument('--repetition-penalty', type=float, default=DEFAULT_REPETITION_PENALTY)
  parser.add_argument('--context-limit', type=int, default=DEFAULT_CONTEXT_LIMIT,
                      help='visual + text + new tokens; a longer context loses its first visual tokens (said on '
                           f'screen), as the released demo cuts it (default {DEFAULT_CONTEXT_LIMIT}; 0: never cut)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--llm-tokenizer', default='', help='override the checkpoint\'s LLM tokenizer directory')
  parser.add_argument('--qformer-tokenizer', default='', help='override the checkpoint\'s Q-Former tokenizer directory')
  return parser.parse_args(argv)


def generation_config(args: argparse.Namespace) -> generate.GenerationConfig:
  config = generate.GenerationConfig(
      max_new_tokens=args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS, num_beams=args.num_beams, do_sample=args.sample,
      temperature=args.temperature, top_p=args.top_p if args.sample else 1.0,
      repetition_penalty=args.repetition_penalty, min_new_tokens=1, context_limit=args.context_limit)
  try:
    config.validate()
  except ValueError as e:
    raise UserError(str(e)) from e
  return config


def check_video(path: str) -> None:
  """Fails fast (before the model loads) on a missing or unreadable video."""
  if not os.path.exists(path):
    raise UserError(f'video {path} does not exist')
  try:
    video.probe(path)
  except SampleError as e:
    raise UserError(f'video {path} cannot be read: {e.message}') from e


def load_frames(path: str, policy: inference.FramePolicy, image_size: int) -> inference.InferenceVideo:
  try:
    return inference.load_video_with_policy(path, policy, image_size)
  except SampleError as e:
    raise UserError(f'video {path} cannot be read: {e.message}') from e


def describe_frames(path: str, loaded: inference.InferenceVideo, policy: inference.FramePolicy) -> str:
  times = ', '.join(f'{t:.1f}' for t in inference.frame_times(loaded))
  repeated = '' if loaded.num_real_frames == len(loaded.indices) else \
      f' ({len(loaded.indices) - loaded.num_real_frames} repeated)'
  return (f'video {path}: {loaded.duration_s:.1f} s at {loaded.fps:.3g} fps; {len(loaded.indices)} frames '
          f'({policy.describe()}){repeated} at {times} s')


def describe_speed(stats: generate.GenerationStats) -> str:
  compiled = f'; compiled in {stats.compile_seconds:.1f} s' if stats.compile_seconds > 0.05 else ''
  return (f'[{stats.new_tokens} tokens in {stats.seconds:.2f} s = {stats.tokens_per_second:.1f} tokens/s; '
          f'vision {stats.visual_seconds:.2f} s{compiled}]')


class Conversation:
  """Questions about one video: each alone with the system text (the released demo), or with the history kept
  in the training template (`multi_turn`)."""

  def __init__(self, generator: generate.VideoGenerator, frames: np.ndarray, config: generate.GenerationConfig,
               seed: int = 0, fit_length: bool = False, multi_turn: bool = False):
    self.generator, self.frames, self.config, self.seed = generator, frames, config, seed
    self.fit_length = fit_length  # shorten max_new_tokens to the positions the model has left
    self.multi_turn = multi_turn
    self.history: list[tuple[str, str]] = []  # multi_turn only
    self.questions_asked = 0  # each question samples with its own seed

  def prompt_ids(self, question: str) -> np.ndarray:
    """The text after the visual tokens for `question`: int32 [n], starting with `</s>`."""
    tokenizer = self.generator.llm_tokenizer
    if self.multi_turn:
      return conversation.encode_turns(tokenizer, conversation.chat_turns(self.history, question))
    return conversation.encode_prompt(tokenizer, conversation.qa_prompt(question, with_system=True))

  def ask(self, question: str, on_tokens: Callable[[list[np.ndarray]], None] | None = None
          ) -> tuple[generate.Generation, generate.GenerationStats]:
    """The answer to `question` and its speed; `on_tokens` sees the ids generated so far after every step
    (VideoGenerator.generate)."""
    prompt_ids = self.prompt_ids(question)
    request = generate.Request(self.frames, question, prompt_ids)
    config = self.config
    if self.fit_length:
      context = self.generator.config.num_visual_tokens(self.frames.shape[0]) + len(prompt_ids)
      room = self.generator.max_positions - context + generate.context_cut(context, config)
      config = dataclasses.replace(config, max_new_tokens=max(1, min(config.max_new_tokens, room)))
    (result,), stats = self.generator.generate([request], config, self.seed + self.questions_asked,
                                               on_tokens=on_tokens)
    self.questions_asked += 1
    if self.multi_turn:
      self.history.append((question, result.text))
    return result, stats


def run(args: argparse.Namespace, read_line: Callable[[], str | None], out: TextIO) -> None:
  check_video(args.video)
  config = generation_config(args)
  print(f'loading {args.checkpoint} ...', file=out, flush=True)
  generator = generate.load_generator(args.checkpoint, args.llm_tokenizer, args.qformer_tokenizer)
  cfg = generator.config
  try:
    policy = inference.parse_frame_policy(args.frames, cfg.video_input, cfg.num_local_frames)
  except ValueError as e:
    raise UserError(str(e)) from e
  loaded = load_frames(args.video, policy, cfg.vision.image_size)
  print(describe_frames(args.video, loaded, policy), file=out, flush=True)
  chat = Conversation(generator, loaded.frames, config, args.seed, fit_length=not args.max_new_tokens,
                      multi_turn=args.multi_turn)
  questions = [args.prompt] if args.prompt is not None else iter(read_line, None)
  for question in questions:
    question = question.strip()
    if question in ('exit', 'quit'):
      break
    if question == '/reset':
      chat.history.clear()
      print('(conversation forgotten)', file=out, flush=True)
      continue
    if not question:
      continue
    try:
      result, stats = chat.ask(question)
    except ValueError as e:  # the conversation outgrew the model's positions
      if args.prompt is not None:
        raise UserError(str(e)) from e
      print(f'error: {e} (type /reset to start over)', file=out, flush=True)
      continue
    if result.context_cut:
      print(f'[the first {result.context_cut} visual tokens were cut to fit --context-limit {config.context_limit}]',
            file=out)
    print(f'ST-LLM: {result.text}', file=out)
    print(describe_speed(stats), file=out, flush=True)


def _read_stdin() -> str | None:
  try:
    return input('you> ')
  except EOFError:
    return None


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  try:
    run(args, _read_stdin, sys.stdout)
  except UserError as error:
    exit_with(error)
  except KeyboardInterrupt:
    sys.exit(130)


if __name__ == '__main__':
  main()
