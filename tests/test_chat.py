"""The chat command on a synthetic mp4 with a tiny random checkpoint; its one-line errors."""

import os
import subprocess
import sys

import numpy as np
import pytest

import inference_helpers
from stllm_jax import chat, generate
from stllm_jax.data import conversation

ROOT = os.path.join(os.path.dirname(__file__), '..')


@pytest.fixture(scope='module')
def paths():
  return inference_helpers.build()


def test_one_shot_prints_frames_answer_and_speed(paths, capsys):
  chat.main(['--checkpoint', paths.checkpoint, '--video', paths.video, '--prompt', 'What shape is the moving object?',
             '--max-new-tokens', '8'])
  out = capsys.readouterr().out
  # 16 frames at 8 fps = 2 s -> 4 frames (the minimum) at the released segment middles 2, 6, 9, 13
  assert '4 frames (1 per second, 4-16) at 0.2, 0.8, 1.1, 1.6 s' in out
  assert out.count('ST-LLM: ') == 1
  assert 'tokens/s' in out


def test_multi_turn_keeps_the_history(paths, capsys):
  questions = iter(['What shape is the moving object?', 'And its colour?', 'quit', 'never read'])
  args = chat.parse_args(['--checkpoint', paths.checkpoint, '--video', paths.video, '--max-new-tokens', '8',
                          '--frames', '6', '--multi-turn'])
  seen_prompts = []
  real_ask = chat.Conversation.ask

  def ask(self, question):
    seen_prompts.append(conversation.encode_turns(self.generator.llm_tokenizer,
                                                  conversation.chat_turns(self.history, question)))
    return real_ask(self, question)

  chat.Conversation.ask = ask
  try:
    chat.run(args, lambda: next(questions), sys.stdout)
  finally:
    chat.Conversation.ask = real_ask
  out = capsys.readouterr().out
  assert out.count('ST-LLM: ') == 2 and '6 frames (6 segment middles)' in out
  first, second = seen_prompts
  assert np.array_equal(second[:len(first)], first)  # turn 2 = turn 1 + its answer + </s> + the new question
  tok = conversation.load_llm_tokenizer(os.path.join(paths.checkpoint, 'tokenizers', 'llm'))
  assert tok.decode(second).count('###Human: ') == 2 and tok.decode(second).count('</s>') == 2


RELEASED_SYSTEM = ('Carefully watch the video and pay attention to the cause and sequence of events, the detail and '
                   'movement of objects, and the action and pose of persons. Based on your observations, give your '
                   'answer that best addresses the question.\n')  # stllm/conversation: CONV_instructblip_Vicuna0


def test_defaults_are_the_released_demo(paths, monkeypatch, capsys):
  """demo.py: one question at a time after the system text, 5 beams, repetition penalty 1.5, 300 new tokens,
  min_length 1, max_length 2000 (the context cut from the left); the Q-Former reads the question."""
  args = chat.parse_args(['--checkpoint', paths.checkpoint, '--video', paths.video])
  assert not args.multi_turn
  assert chat.generation_config(args) == generate.GenerationConfig(
      max_new_tokens=300, num_beams=5, repetition_penalty=1.5, min_new_tokens=1, do_sample=False, context_limit=2000)
  seen = []

  def fake_generate(self, requests, config, seed=0, on_tokens=None):
    seen.append((requests[0], config))
    return [generate.Generation('A red circle.', np.array([5], np.int32), 0)], generate.GenerationStats()

  monkeypatch.setattr(generate.VideoGenerator, 'generate', fake_generate)
  questions = iter(['What moves?', 'Where to?', None])
  chat.run(args, lambda: next(questions), sys.stdout)
  assert capsys.readouterr().out.count('ST-LLM: A red circle.') == 2
  tok = conversation.load_llm_tokenizer(os.path.join(paths.checkpoint, 'tokenizers', 'llm'))
  ids_of = lambda text: tok(text, add_special_tokens=False)['input_ids']
  eos = tok.convert_tokens_to_ids('</s>')
  for (request, config), question in zip(seen, ['What moves?', 'Where to?']):  # the second without the first
    assert request.prompt_ids.tolist() == [eos] + ids_of(f'{RELEASED_SYSTEM}###Human: {question} ###Assistant: ')
    assert request.qformer_text == question
    assert (config.num_beams, config.repetition_penalty, config.min_new_tokens) == (5, 1.5, 1)


def test_encode_turns_is_the_training_layout(paths):
  tok = conversation.load_llm_tokenizer(os.path.join(paths.checkpoint, 'tokenizers', 'llm'))
  eos = tok.convert_tokens_to_ids('</s>')
  ids = conversation.encode_turns(tok, conversation.chat_turns([('What moves?', 'A red circle.')], 'Where to?'))
  ids_of = lambda text: tok(text, add_special_tokens=False)['input_ids']
  expected = [eos] + ids_of('###Human: What moves? ###Assistant: ') + ids_of('A red circle.') + [eos] + \
      ids_of('###Human: Where to? ###Assistant: ')
  assert ids.tolist() == expected


def run_cli(*args):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, '-m', 'stllm_jax.chat', *args], capture_output=True, text=True, env=env,
                        cwd=ROOT, timeout=300)


def test_missing_video_is_one_line_and_nonzero(paths, tmp_path):
  result = run_cli('--checkpoint', paths.checkpoint, '--video', str(tmp_path / 'nope.mp4'), '--prompt', 'hi')
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [f'error: video {tmp_path / "nope.mp4"} does not exist']


def test_unreadable_video_and_unusable_checkpoint_are_one_line(paths, tmp_path, capsys):
  broken = tmp_path / 'broken.mp4'
  broken.write_text('not a video\n' * 10)
  for checkpoint, video, message in ((paths.checkpoint, str(broken), 'cannot be read'),
                                     (str(tmp_path), paths.video, 'neither a weights directory'),
                                     (str(tmp_path / 'none'), paths.video, 'does not exist')):
    with pytest.raises(SystemExit) as stopped:
      chat.main(['--checkpoint', checkpoint, '--video', video, '--prompt', 'hi'])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
  assert not os.path.exists(tmp_path / 'checkpoints')  # nothing created in a directory that is not a checkpoint


def test_broken_weights_directory_is_one_line(paths, tmp_path, capsys):
  broken = tmp_path / 'weights'
  os.makedirs(broken / 'params')
  (broken / 'model.json').write_text('{"llm": {"width": 8}}')
  with pytest.raises(SystemExit) as stopped:
    chat.main(['--checkpoint', str(broken), '--video', paths.video, '--prompt', 'hi'])
  assert stopped.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'cannot be loaded' in err[0], err
