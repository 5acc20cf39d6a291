"""MVBench and open-ended QA harnesses on a tiny synthetic MVBench-layout set with a tiny random model."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_helpers import decode_all
import inference_helpers
from stllm_jax import chat, evaluate, generate
from stllm_jax.data import conversation, inference, transforms
from stllm_jax.demo import synthetic
from stllm_jax.errors import UserError

REFERENCE_SYSTEM = ('Carefully watch the video and pay attention to the cause and sequence of events, the detail and '
                    'movement of objects, and the action and pose of persons. Based on your observations, select the '
                    'best option that accurately addresses the question.\n')


@pytest.fixture(scope='module')
def paths():
  return inference_helpers.build()


def test_mvbench_prompt_is_the_reference_string():
  prompt = conversation.mvbench_prompt('What does the man do?', ['runs', 'sits down', 'jumps'])
  assert prompt == ('###Human: ' + REFERENCE_SYSTEM + 'Question: What does the man do?\nOptions:\n(A) runs\n'
                    '(B) sits down\n(C) jumps\nOnly give the best option.\n###Assistant: Best option:(')
  assert conversation.mvbench_question('Q?', ['x', 'y']) == 'Question: Q?\nOptions:\n(A) x\n(B) y'
  assert conversation.MVBENCH_SYSTEM == REFERENCE_SYSTEM
  assert conversation.mvbench_ground_truth(['dog', 'cat'], 'cat') == '(B) cat'


def test_mvbench_tokens_start_with_eos(paths):
  tok = conversation.load_llm_tokenizer(os.path.join(paths.checkpoint, 'tokenizers', 'llm'))
  ids = conversation.encode_prompt(tok, conversation.mvbench_prompt('Q?', ['a', 'b']))
  assert ids[0] == tok.convert_tokens_to_ids('</s>')
  assert tok.decode(ids[1:]) == conversation.mvbench_prompt('Q?', ['a', 'b'])


@pytest.mark.parametrize('answer, correct', [
    ('A) cat', True),  # the model continues after 'Best option:(' -> prediction '(A) cat'
    ('A', True), ('a)', True), ('A.', True), ('a', True), ('A) dog\nbecause...', True),
    ('B)', False), ('B) cat', False), ('C', False),
])
def test_answer_matching_is_the_originals(answer, correct):
  prediction = conversation.mvbench_prediction(answer)
  assert conversation.mvbench_is_correct(prediction, '(A) cat') is correct


def test_mvbench_decoding_is_the_released_one():
  # stllm/test/mvbench/mv_bench.py: generate(do_sample=False, num_beams=1, max_new_tokens=100, min_length=1,
  # repetition_penalty=1.0) on inputs_embeds, stopped at '###'; with transformers 4.28 min_length=1 bans EOS as
  # the first new token
  assert evaluate.MVBENCH_GENERATION == generate.GenerationConfig(
      max_new_tokens=100, num_beams=1, do_sample=False, repetition_penalty=1.0, min_new_tokens=1, stop_strings=('###',))


def test_answer_matching_on_whole_predictions():
  gt = '(A) cat'
  assert conversation.mvbench_is_correct('(A) cat', gt)
  assert conversation.mvbench_is_correct('A', gt)
  assert conversation.mvbench_is_correct('(a)', gt)
  assert not conversation.mvbench_is_correct('(B)', gt)
  assert conversation.mvbench_prediction('  B) dog\nsecond line') == '(B) dog'
  assert conversation.mvbench_is_correct('(', gt)  # an empty answer matches, as in the original (kept)


def test_accuracy_table_adds_up():
  records = [dict(task='t1', correct=True), dict(task='t1', correct=False), dict(task='t2', correct=True)]
  rows, table = evaluate.accuracy_table(records, ['t1', 't2', 't3'])
  assert rows == [('t1', 1, 2), ('t2', 1, 1)]
  assert 'Overall (all questions)        2      3    66.67%' in table
  assert 'Mean over 2 tasks' in table and '75.00%' in table


def test_frame_policies():
  assert inference.parse_frame_policy('auto') == inference.FramePolicy('fps', 16, (4, 16))
  assert inference.parse_frame_policy('16') == inference.FramePolicy('middle', 16)
  assert inference.parse_frame_policy('fps:2-8').fps_range == (2, 8)
  assert inference.parse_frame_policy('auto', 'global_local', 16) == inference.FramePolicy('middle', 64, min_frames=16)
  with pytest.raises(ValueError, match='at least num_local_frames=16'):
    inference.parse_frame_policy('fps', 'global_local', 16)
  with pytest.raises(ValueError, match='use auto, fps'):
    inference.parse_frame_policy('many')


def test_mvbench_items_read_every_media_kind_and_bounds(paths):
  tasks = evaluate.mvbench_tasks(paths.mvbench)
  items = {item.key: item for item in evaluate.mvbench_items(paths.mvbench, tasks)}
  gif, folder, bounded = (items[f'{t}/0'] for t in ('Action Antonym (GIF)', 'Episodic Reasoning (frames)',
                                                    'Action Sequence (bounds)'))
  assert gif.video.endswith('.gif') and os.path.isdir(folder.video)
  assert (gif.data_type, folder.data_type, bounded.data_type) == ('gif', 'frame', 'video')
  assert (folder.start, folder.end) == (1.0, 4.5) and (bounded.start, bounded.end) == (0.5, 1.5)
  assert items['Moving Direction/0'].start is None
  load = evaluate.mvbench_frames(inference.FramePolicy(), 56)
  # The synthetic videos have 16 frames at 8 fps. Bounds 0.5-1.5 s: start round(4.0) = 4, end round(12.0) = 12,
  # 1 s -> 4 frames (the minimum), seg 8 / 4 = 2: int(4 + 1 + 2k) = 5, 7, 9, 11
  loaded = load(bounded.video, bounded)
  np.testing.assert_array_equal(loaded.indices, [5, 7, 9, 11])
  np.testing.assert_array_equal(loaded.frames,
                                transforms.eval_resize_crop(decode_all(bounded.video)[[5, 7, 9, 11]], 56))
  # The same 16 frames as PNG files 00001..00016 read at 3 fps, bounds 1.0-4.5 s: start round(3.0) = 3, end
  # round(13.5) = 14, 3.5 s -> 4 frames, seg 11 / 4 = 2.75: int(4.375 + 0, 3, 6, 8) = files 4, 7, 10, 12
  loaded = load(folder.video, folder)
  np.testing.assert_array_equal(loaded.indices, [3, 6, 9, 11])  # files 00004.png ... counted from 0
  np.testing.assert_array_equal(loaded.frames,
                                transforms.eval_resize_crop(decode_all(bounded.video)[[3, 6, 9, 11]], 56))
  # The GIF, timed at 25 fps as the released reader times every GIF: last frame 15, 0.6 s -> 4 frames,
  # seg 15 / 4 = 3.75: int(1.875 + 0, 4, 8, 11) = 1, 5, 9, 12
  np.testing.assert_array_equal(load(gif.video, gif).indices, [1, 5, 9, 12])
  # --frames 8 on a whole 16-frame video: seg 15 / 8 = 1.875: int(0.9375 + round(1.875k)) with the rounded
  # 0, 2 (1.875), 4 (3.75), 6 (5.625), 8 (7.5), 9 (9.375), 11 (11.25), 13 (13.125)
  whole = items['Moving Direction/0']
  np.testing.assert_array_equal(evaluate.mvbench_frames(inference.FramePolicy('middle', 8), 56)(whole.video, whole)
                                .indices, [0, 2, 4, 6, 8, 9, 11, 13])


def test_mvbench_runs_resumes_and_does_not_redo_questions(paths, tmp_path, monkeypatch, capsys):
  loads = []
  real_load = inference.load_mvbench_video

  def load(path, *args, **kwargs):  # Ctrl-C as the third batch of 4 starts
    if len(loads) == 8 and interrupt:
      raise KeyboardInterrupt
    loads.append(path)
    return real_load(path, *args, **kwargs)

  interrupt = True
  monkeypatch.setattr(evaluate.inference, 'load_mvbench_video', load)
  argv = ['mvbench', '--checkpoint', paths.checkpoint, '--data-root', paths.mvbench, '--out', str(tmp_path),
          '--batch-size', '4']
  with pytest.raises(SystemExit) as stopped:
    evaluate.main(argv)
  assert stopped.value.code == 130
  predictions = tmp_path / 'predictions.jsonl'
  first_lines = predictions.read_text().splitlines()
  assert len(first_lines) == 8 and len(loads) == 8

  interrupt = False
  evaluate.main(argv)
  out = capsys.readouterr().out
  lines = predictions.read_text().splitlines()
  records = [json.loads(line) for line in lines]
  total = len(evaluate.mvbench_items(paths.mvbench, evaluate.mvbench_tasks(paths.mvbench)))
  assert 'resuming: 8 of 22 questions already answered' in out
  assert total == 22 == len(records) == len({r['key'] for r in records})
  assert lines[:8] == first_lines  # finished questions kept as they were...
  assert len(loads) == total  # ...and not asked again

  summary = json.loads((tmp_path / 'accuracy.json').read_text())
  assert summary['total'] == total
  assert summary['correct'] == sum(r['correct'] for r in records)
  assert summary['correct'] == sum(t['correct'] for t in summary['tasks'].values())
  for record in (r for r in records if 'error' not in r):
    assert record['correct'] == conversation.mvbench_is_correct(record['pred'], record['gt'])
    assert record['pred'].startswith('(')
  unreadable = [r for r in records if 'error' in r]
  assert [r['task'] for r in unreadable] == ['Unreadable'] and not unreadable[0]['correct']
  assert all(r['frames'] == 4 for r in records if 'error' not in r)
  for task in summary['tasks']:
    assert task in out
  assert 'tokens/s' in out

  evaluate.main(argv)  # everything done: nothing is generated again
  assert 'resuming: 22 of 22' in capsys.readouterr().out and len(loads) == total


def test_mvbench_refuses_other_settings_in_the_same_output(paths, tmp_path):
  log = evaluate.PredictionLog(str(tmp_path / 'p.jsonl'), dict(frames='fps4-16'))
  log.append([dict(key='a', pred='(A)')])
  with open(tmp_path / 'p.jsonl', 'a') as f:
    f.write('{"key": "b", "pred"')  # a line torn by a kill
  assert list(evaluate.PredictionLog(str(tmp_path / 'p.jsonl'), dict(frames='fps4-16')).done) == ['a']
  with pytest.raises(UserError, match='frames differ'):
    evaluate.PredictionLog(str(tmp_path / 'p.jsonl'), dict(frames='fixed16'))


def test_qa_protocols_are_the_released_scripts():
  # script/inference/qabench/{msvd,msrvtt,anet}_qa.sh and vcgbench/test_general.sh: --num-frames 64, 64, 16, 64;
  # msvd_qa.py and msrvtt_qa.py call Chat.answer(system=False), activitynet_qa.py and the VideoChatGPT-Bench script
  # keep its default system=True; every one: num_beams=5, max_new_tokens=300, max_length=2000 (repetition penalty
  # 1.5 and min_length 1 come from Chat.answer)
  assert {name: (p.num_frames, p.with_system) for name, p in evaluate.QA_PROTOCOLS.items()} == {
      'msvd': (64, False), 'msrvtt': (64, False), 'activitynet': (16, True), 'videochatgpt': (64, True)}
  assert evaluate.QA_GENERATION == generate.GenerationConfig(
      max_new_tokens=300, num_beams=5, repetition_penalty=1.5, min_new_tokens=1, context_limit=2000)


def test_a_long_context_loses_its_first_visual_tokens_and_says_so(paths):
  generator = generate.load_generator(paths.checkpoint)
  loaded = inference.load_video_for_inference(paths.video, num_frames=16, image_size=56)
  prompt = conversation.encode_prompt(generator.llm_tokenizer, conversation.qa_prompt('What moves?'))
  request = generate.Request(loaded.frames, 'What moves?', prompt)
  num_visual = 16 * generator.config.qformer.num_query_tokens  # 16 frames x 8 tokens = 128
  config = generate.GenerationConfig(max_new_tokens=6, context_limit=100, stop_strings=())
  (result,), _ = generator.generate([request], config)
  cut = num_visual + len(prompt) + 6 - 100  # the released begin_idx = context + max_new_tokens - max_length
  assert result.context_cut == cut and result.prompt_tokens == 94
  # the same as decoding after [V[cut:] : prompt] with positions from 0
  length = generate.prefix_bucket(94)
  visual, kept, _ = generator.visual_tokens(loaded.frames, 'What moves?', length)
  assert kept == num_visual
  visual = jnp.pad(visual[:, cut:], ((0, 0), (0, cut), (0, 0)))
  text = np.zeros((1, length), np.int32)
  text[0, :len(prompt)] = prompt
  llm_params = generator.params['llm']
  embeddings, mask = generate.assemble_prefix(generator.llm, llm_params, visual, np.array([num_visual - cut]), text,
                                              np.array([len(prompt)]))
  tokens, lengths = generate.decode(generator.llm, llm_params, embeddings, mask, jax.random.key(0), config,
                                    generate.special_ids(generator.llm_tokenizer, ()))
  assert result.token_ids.tolist() == np.asarray(tokens)[0, :int(lengths[0])].tolist()
  with pytest.raises(ValueError, match='the text alone'):
    generator.generate([request], dataclasses.replace(config, context_limit=len(prompt) + 5))
  assert generator.generate([request], dataclasses.replace(config, context_limit=0))[0][0].context_cut == 0


def test_qa_writes_the_judge_format(paths, tmp_path, capsys):
  facts = synthetic.read_facts(os.path.dirname(paths.mvbench), 'test')[:2]
  questions = [dict(video_name=os.path.splitext(f['video'])[0], question_id=f'q{n}', question='What moves?',
                    answer=f['shape']) for n, f in enumerate(facts)]
  questions_path = tmp_path / 'questions.json'
  questions_path.write_text(json.dumps(questions))
  argv = ['qa', '--format', 'msvd', '--checkpoint', paths.checkpoint, '--questions', str(questions_path),
          '--video-dir', os.path.join(os.path.dirname(paths.mvbench), 'videos'), '--num-beams', '2',
          '--max-new-tokens', '8']
  out = tmp_path / 'msvd_predictions.json'
  evaluate.main(argv + ['--out', str(out)])
  predictions = json.loads(out.read_text())
  assert [sorted(p) for p in predictions] == [['answer', 'id', 'pred', 'question']] * 2
  assert [p['id'] for p in predictions] == ['q0', 'q1'] and all(isinstance(p['pred'], str) for p in predictions)
  printed = capsys.readouterr().out
  assert 'wrote 2 predictions' in printed and 'system text: no' in printed and 'lost their first' not in printed
  partial = [json.loads(line) for line in open(str(out) + '.partial.jsonl')]
  assert [(r['frames'], r['context_cut']) for r in partial] == [(16, 0)] * 2  # 64 asked, the videos have 16

  cut_out = tmp_path / 'cut.json'  # 16 x 8 visual + the text + 8 new tokens > 120
  evaluate.main(argv + ['--out', str(cut_out), '--context-limit', '120'])
  partial = [json.loads(line) for line in open(str(cut_out) + '.partial.jsonl')]
  cuts = [r['context_cut'] for r in partial]
  assert all(cut > 0 for cut in cuts) and 'context_cut' not in json.loads(cut_out.read_text())[0]
  assert '2 of 2 contexts were longer than --context-limit 120 - 8 new tokens' in capsys.readouterr().out


def test_qa_formats_read_their_files(tmp_path):
  (tmp_path / 'v_abc.mp4').write_bytes(b'')
  (tmp_path / 'clip.mkv').write_bytes(b'')
  (tmp_path / '7010.mp4').write_bytes(b'')
  q = tmp_path / 'q.json'
  a = tmp_path / 'a.json'
  q.write_text(json.dumps([dict(video_name='abc', question_id='x_1', question='what is it')]))
  a.write_text(json.dumps([dict(answer='a dog', question_id='x_1')]))
  (item,) = evaluate.qa_items('activitynet', str(q), str(a), str(tmp_path))
  assert item.video == str(tmp_path / 'v_abc.mp4') and item.record == dict(id='x_1', question='what is it',
                                                                           answer='a dog')
  assert item.prompt == conversation.QA_SYSTEM + '###Human: what is it ###Assistant: '  # with the system text
  q.write_text(json.dumps([dict(video_name='clip', Q='Describe it.', A='A dog runs.')]))
  (item,) = evaluate.qa_items('videochatgpt', str(q), '', str(tmp_path))
  assert item.video == str(tmp_path / 'clip.mkv') and item.record == dict(video_name='clip', Q='Describe it.',
                                                                         A='A dog runs.')
  assert item.prompt == conversation.QA_SYSTEM + '###Human: Describe it. ###Assistant: '
  q.write_text(json.dumps([dict(video='clip.mkv', id=7, question='why', answer='because')]))
  (item,) = evaluate.qa_items('msrvtt', str(q), '', str(tmp_path))
  assert item.record == dict(id=7, question='why', answer='because')
  assert item.prompt == '###Human: why ###Assistant: '  # without
  q.write_text(json.dumps([dict(video_id=7010, id=0, question='who', answer='a man')]))  # MSRVTT-QA's own fields
  (item,) = evaluate.qa_items('msrvtt', str(q), '', str(tmp_path))
  assert item.video == str(tmp_path / '7010.mp4') and item.record['id'] == 0
  with pytest.raises(UserError, match='needs --answers'):
    evaluate.qa_items('activitynet', str(q), '', str(tmp_path))
  q.write_text(json.dumps([dict(question='no video')]))
  with pytest.raises(UserError, match='entry 0 does not have the msvd fields'):
    evaluate.qa_items('msvd', str(q), '', str(tmp_path))


def test_missing_data_root_is_one_line(tmp_path, capsys):
  with pytest.raises(SystemExit) as stopped:
    evaluate.main(['mvbench', '--checkpoint', str(tmp_path), '--data-root', str(tmp_path / 'nope')])
  assert stopped.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'does not exist' in err[0]


def test_a_qa_weights_directory_with_the_bt_adapter_chats_and_runs_mvbench(paths, tmp_path, capsys):
  """The MVBench model (a BT-Adapter beside the ViT): every frame's tokens, through the adapter, in chat and
  MVBench alike."""
  qa_weights = inference_helpers.save_tiny_checkpoint(
      str(tmp_path / 'qa'), os.path.join(os.path.dirname(paths.mvbench), 'tokenizers'), adapter_depth=1)
  chat.main(['--checkpoint', qa_weights, '--video', paths.video, '--prompt', 'What moves?', '--max-new-tokens', '4'])
  assert 'ST-LLM: ' in capsys.readouterr().out
  evaluate.main(['mvbench', '--checkpoint', qa_weights, '--data-root', paths.mvbench, '--tasks', 'Moving Direction',
                 '--limit', '2', '--out', str(tmp_path / 'eval')])
  records = [json.loads(line) for line in (tmp_path / 'eval' / 'predictions.jsonl').read_text().splitlines()]
  assert len(records) == 2 and all(r['frames'] >= 4 and 'error' not in r for r in records)
  assert 'Moving Direction' in capsys.readouterr().out
