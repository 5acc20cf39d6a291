"""The web chat demo (stllm_jax/serve.py): its handlers in-process on a tiny random checkpoint and the synthetic
videos, and the page itself in headless Chromium (skipped, saying why, where no browser is installed)."""

import base64
import io
import re
import time

import numpy as np
import pytest
from PIL import Image

import inference_helpers
import serve_browser
from data_helpers import decode_all, write_video
from stllm_jax import chat, checkpoints, configlib, generate, serve
from stllm_jax.data import transforms
from stllm_jax.errors import UserError
from stllm_jax.models import stllm

QUESTION = 'In which direction does the square move?'
GREEDY = dict(decoding='greedy', num_beams=1, temperature=1.0, top_p=1.0, max_new_tokens=8, repetition_penalty=1.0,
              multi_turn=True)


@pytest.fixture(scope='module')
def paths():
  return inference_helpers.build()


@pytest.fixture(scope='module')
def server(paths):
  generator = generate.load_generator(paths.checkpoint)
  return serve.ChatServer(generator, paths.checkpoint, [], max_upload_bytes=2**20)


def answer(server, session, question, **options):
  """Every (chat messages, answer status, question box) the streaming handler yields."""
  options = dict(GREEDY, **options)
  return list(server.ask(session, question, [], *options.values()))


def tiny_model(**changes):
  model = configlib.load_config_file(inference_helpers.TINY_CONFIG).model
  model.update(changes)
  return stllm.model_config(model)


def test_frame_settings_are_those_the_model_allows():
  # 8 tokens a frame, 512 positions: at most 32 frames take at most half of them
  assert [spec for _, spec in serve.frame_settings(tiny_model())] == ['auto', '4', '8', '16', '32']
  assert serve.frame_settings(tiny_model())[:2] == [('auto: 1 per second, 4-16', 'auto'), ('4 frames', '4')]
  # global-local: 16 local frames whatever is encoded; fewer than 16 is refused by parse_frame_policy
  assert [spec for _, spec in serve.frame_settings(tiny_model(video_input='global_local'))] == [
      'auto', '16', '32', '64', 'global_local']
  assert [spec for _, spec in serve.frame_settings(tiny_model(video_input='mean'))] == [
      'auto', '4', '8', '16', '32', '64', 'global_local']


def test_decoding_options_become_the_generation_config():
  beams = serve.decoding_config('beam search', 5, 0.7, 0.5, 300, 1.5, max_positions=4096)
  assert beams == generate.GenerationConfig(max_new_tokens=300, num_beams=5, repetition_penalty=1.5, min_new_tokens=1,
                                            context_limit=2000, temperature=0.7)
  greedy = serve.decoding_config('greedy', 5, 1.0, 0.5, 20, 1.0, max_positions=256)
  assert (greedy.num_beams, greedy.do_sample, greedy.top_p, greedy.context_limit) == (1, False, 1.0, 256)
  sampled = serve.decoding_config('sampling', 5, 0.7, 0.5, 20, 1.0, max_positions=256)
  assert (sampled.num_beams, sampled.do_sample, sampled.temperature, sampled.top_p) == (1, True, 0.7, 0.5)
  with pytest.raises(UserError, match='context_limit'):
    serve.decoding_config('greedy', 1, 1.0, 1.0, 256, 1.0, max_positions=256)
  assert serve.default_options(256)['max_new_tokens'] == 64 and serve.default_options(4096)['max_new_tokens'] == 300


def test_a_video_shows_its_frames_with_their_times(server, paths):
  session, strip, status, messages, answer_status = server.choose_video(paths.video, '8')
  assert status == 'video **test_0000_a.mp4**: 2.0 s at 8 fps; 8 frames (8 segment middles) at 0.1, 0.4, 0.6, 0.9, ' \
      '1.0, 1.2, 1.5, 1.8 s'
  assert (messages, answer_status) == ([], '')
  captions = ['0.1 s', '0.4 s', '0.6 s', '0.9 s', '1.0 s', '1.2 s', '1.5 s', '1.8 s']
  assert re.findall(r'<figcaption>(.*?)</figcaption>', strip) == captions
  assert session.loaded.frames.shape[0] == 8
  # the thumbnails are the frames the model sees, inside the page as PNGs
  seen = transforms.eval_resize_crop(decode_all(paths.video)[session.loaded.indices],
                                     server.generator.config.vision.image_size)
  images = np.stack([image for image, _ in serve.thumbnails(session.loaded)])
  assert images.dtype == np.uint8 and np.array_equal(images, seen)
  shown = [np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))
           for data in re.findall(r'src="data:image/png;base64,([^"]+)"', strip)]
  assert np.array_equal(np.stack(shown), images)
  # another frame setting: the same video, its own frames, a new conversation
  session.conversation.history.append(('q', 'a'))
  again, strip, status, _, _ = server.change_frames(session, 'auto')
  assert strip.count('<figure>') == 4 and '4 frames (1 per second, 4-16)' in status
  assert again.conversation.history == []


def test_every_kind_of_video_it_takes_opens(server, paths, tmp_path):
  frames = decode_all(paths.video)  # 16 frames, 64x64
  kinds = {'clip.webm': dict(codec='libvpx-vp9'), 'clip.mkv': {}, 'clip.avi': dict(codec='mpeg4'),
           'CLIP.GIF': dict(codec='gif')}
  for name, options in kinds.items():
    path = write_video(str(tmp_path / name), frames, fps=8, **options)
    session, strip, status, _, _ = server.choose_video(path, '4')
    assert session is not None and strip.count('<figure>') == 4, status
    assert status.startswith(f'video **{name}**: ') and '4 frames (4 segment middles)' in status, status


def test_files_it_cannot_use_are_one_message_and_it_goes_on(server, paths, tmp_path):
  broken = tmp_path / 'broken.mp4'
  broken.write_text('not a video\n' * 10)
  text = tmp_path / 'notes.txt'
  text.write_text('hello')
  huge = tmp_path / 'huge.mkv'
  with open(huge, 'wb') as f:
    f.truncate(server.max_upload_bytes + 1)  # sparse: big without using the disk
  empty = tmp_path / 'empty.gif'
  empty.write_bytes(b'')
  for path, frames, message in (
      (broken, 'auto', '**broken.mp4** cannot be used: broken.mp4: '),
      (text, 'auto', '**notes.txt** is not a video: use an mp4, webm, mkv, avi, gif file'),
      (huge, 'auto', '**huge.mkv** is 1 MB; this server takes videos up to 1 MB (--max-upload-mb)'),
      (empty, 'auto', '**empty.gif** cannot be used: empty.gif has zero bytes'),
      (paths.video, 'sixteen', "**test_0000_a.mp4** cannot be used: frames 'sixteen'")):
    session, strip, status, messages, _ = server.choose_video(str(path), frames)
    assert session is None and strip == '' and messages == []
    assert status.startswith(message) and '\n' not in status and str(tmp_path) not in status, status
  assert server.upload_video(str(broken), 'auto')[-1] is None  # the upload box empties for the next file
  assert server.upload_video(paths.video, 'auto')[-1] == paths.video  # and keeps a video it can use


def test_the_answer_streams_token_by_token_and_ends_as_the_chat_answer(server, paths):
  session = server.choose_video(paths.video, '8')[0]
  steps = answer(server, session, QUESTION)
  texts = [messages[-1]['content'] for messages, _, _ in steps]
  final_messages, status, box = steps[-1]
  assert len(steps) >= 3 and all(s == 'answering ...' for _, s, _ in steps[:-1]) and box == ''
  assert 'tokens/s' in status
  # the same answer as the chat command's silent generation with the same settings
  config = serve.decoding_config(*list(GREEDY.values())[:-1], max_positions=server.max_positions)
  expected, _ = chat.Conversation(server.generator, session.loaded.frames, config, multi_turn=True).ask(QUESTION)
  assert final_messages == [{'role': 'user', 'content': QUESTION}, {'role': 'assistant', 'content': expected.text}]
  assert texts[-1] == expected.text and any(len(t) < len(expected.text) for t in texts[:-1])
  # the conversation goes on: the second question comes after the first and its answer
  answer(server, session, 'And what colour is it?')
  assert [q for q, _ in session.conversation.history] == [QUESTION, 'And what colour is it?']
  # asked again in a new conversation: the same answer from the programs compiled for it the first time
  server.clear(session)
  again = answer(server, session, QUESTION)[-1]
  assert again[0][-1]['content'] == expected.text and 'compiled' not in again[1]


def test_beam_search_streams_its_best_beam_and_ends_on_the_search_result(server, paths):
  session = server.choose_video(paths.video, '4')[0]
  steps = answer(server, session, QUESTION, decoding='beam search', num_beams=3, repetition_penalty=1.5,
                 multi_turn=False)
  config = serve.decoding_config('beam search', 3, 1.0, 1.0, 8, 1.5, max_positions=server.max_positions)
  expected, _ = chat.Conversation(server.generator, session.loaded.frames, config).ask(QUESTION)
  assert len(steps) >= 2 and steps[-1][0][-1]['content'] == expected.text
  assert session.conversation.history == []  # asked alone, after the system text


def test_questions_without_a_video_or_past_the_model_are_messages(server, paths):
  assert answer(server, None, QUESTION)[-1] == ([], serve.NO_VIDEO, QUESTION)
  assert answer(server, None, '  ')[-1] == ([], '', '')
  session = server.choose_video(paths.video, '4')[0]
  long_question = ' '.join(['square'] * 600)  # more tokens than the model has positions
  messages, status, box = answer(server, session, long_question)[-1]
  assert messages == [] and box == long_question
  assert 'does not fit context_limit=512' in status and status.endswith('Press "Clear" to start a new conversation.')
  bad = answer(server, session, QUESTION, max_new_tokens=600)[-1]
  assert 'context_limit' in bad[1] and bad[0] == []
  # and it goes on answering
  assert 'tokens/s' in answer(server, session, QUESTION)[-1][1]


def test_clear_forgets_the_conversation(server, paths):
  session = server.choose_video(paths.video, '4')[0]
  answer(server, session, QUESTION)
  assert len(session.conversation.history) == 1
  assert server.clear(session) == ([], '') and session.conversation.history == []
  assert server.clear(None) == ([], '')


def test_the_demo_workdir_offers_its_held_out_videos(paths, tmp_path, monkeypatch):
  videos = tmp_path / 'data' / 'demo' / 'videos'
  videos.mkdir(parents=True)
  for name in ('train_0000_a.mp4', 'test_0001_b.mp4', 'test_0000_a.mp4'):
    (videos / name).write_bytes(b'')
  monkeypatch.chdir(tmp_path)  # the demo's data_dir is relative to where it ran
  for name, config in (('demo', {'demo': {'data_dir': 'data/demo'}}), ('tiny', {'model': {}})):
    run = checkpoints.RunCheckpoints(str(tmp_path / 'runs' / name))
    run.save(1, {'step': np.zeros((), np.int32)}, {'config': config, 'origin': checkpoints.run_origin(
        str(tmp_path / 'runs' / name))})
    run.close()
  monkeypatch.chdir(paths.root)  # served from elsewhere: the run's origin still finds them
  assert serve.demo_videos(str(tmp_path / 'runs' / 'demo')) == [str(videos / 'test_0000_a.mp4'),
                                                                 str(videos / 'test_0001_b.mp4')]
  assert serve.demo_videos(str(tmp_path / 'runs' / 'tiny')) == []
  assert serve.demo_videos(paths.checkpoint) == []  # a weights directory


def test_a_held_out_demo_video_is_picked_by_name(server, paths):
  demo_server = serve.ChatServer(server.generator, 'runs/demo', [paths.video], max_upload_bytes=2**20)
  assert list(demo_server.demo_videos) == ['test_0000_a.mp4']
  session, strip, status, _, _ = demo_server.pick_demo_video('test_0000_a.mp4', '4')
  assert session.path == paths.video and strip.count('<figure>') == 4 and status.startswith('video **test_0000_a.mp4**')
  assert demo_server.pick_demo_video(None, '4') == (None, '', '', [], '')


def test_large_frames_are_shrunk_for_the_page():
  frames = [(np.full((224, 224, 3), 200, np.uint8), '0.5 s')]
  data = re.findall(r'base64,([^"]+)"', serve.strip_html(frames))[0]
  assert Image.open(io.BytesIO(base64.b64decode(data))).size == (serve.THUMBNAIL_PIXELS, serve.THUMBNAIL_PIXELS)


def test_the_page_is_built_from_the_handlers(server):
  app = serve.build_app(server)
  ids = {block.elem_id for block in app.blocks.values() if getattr(block, 'elem_id', None)}
  assert {'video-upload', 'frames', 'frame-strip', 'chat', 'question', 'video-status', 'answer-status'} <= ids


def test_an_unusable_checkpoint_is_one_line(tmp_path, capsys):
  with pytest.raises(SystemExit) as stopped:
    serve.main(['--checkpoint', str(tmp_path)])
  assert stopped.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'neither a weights directory' in err[0], err


BROWSER_MISSING = serve_browser.browser_missing()


@pytest.mark.skipif(bool(BROWSER_MISSING), reason=BROWSER_MISSING)
def test_the_page_answers_in_headless_chromium(server, paths, tmp_path):
  """The server on the tiny checkpoint (the demo's model takes minutes to train) with a demo-like video: a file over
  the upload limit and a broken one are one message each, the video shows its frames, the question gets the
  model's answer."""
  broken = tmp_path / 'broken.mp4'
  broken.write_bytes(b'\x00' * 1000)
  huge = tmp_path / 'huge.mp4'
  huge.write_bytes(b'\x00' * (2**20 + 1))
  began = time.monotonic()
  port = serve_browser.free_port()
  server_process = serve_browser.start_server(paths.checkpoint, port, '--max-upload-mb', '1', wait=False)
  driver = None
  try:
    session = server.choose_video(paths.video, 'auto')[0]  # the page's answer, computed while the server starts
    expected = answer(server, session, QUESTION, **serve.default_options(server.max_positions))[-1][0][-1]['content']
    serve_browser.wait_until_serving(server_process)
    driver = serve_browser.browser()
    serve_browser.open_page(driver, f'http://127.0.0.1:{port}/')
    serve_browser.send_file(driver, str(huge))
    assert serve_browser.toast(driver) == 'File(s) exceed the maximum allowed size of 1.0 Mb: "huge.mp4"'
    assert serve_browser.upload(driver, str(broken)).startswith('broken.mp4 cannot be used: broken.mp4: ')
    assert serve_browser.upload(driver, paths.video) == \
        'video test_0000_a.mp4: 2.0 s at 8 fps; 4 frames (1 per second, 4-16) at 0.2, 0.8, 1.1, 1.6 s'
    assert serve_browser.frame_captions(driver) == ['0.2 s', '0.8 s', '1.1 s', '1.6 s']
    assert serve_browser.ask(driver, QUESTION) == expected
    screenshot = tmp_path / 'serve.png'
    serve_browser.screenshot(driver, str(screenshot))
    assert screenshot.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  finally:
    if driver is not None:
      driver.quit()
    server_process.stop()
  assert time.monotonic() - began < 90
