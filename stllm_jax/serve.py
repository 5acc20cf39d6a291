"""A web chat demo: ask ST-LLM about a video in the browser (Gradio).

    python -m stllm_jax.serve --checkpoint CKPT [--host 127.0.0.1] [--port 7860] [--max-upload-mb 200]

CKPT is a weights directory or a training workdir (`runs/demo` after the README's first command). The page takes
an uploaded video (mp4, webm, mkv, avi, GIF) or, when CKPT is the demo's workdir, one of the demo's held-out videos;
a frame setting the model allows (`inference.parse_frame_policy`: auto, a fixed count, global-local); shows the
frames the model sees with their timestamps; and answers questions token by token as they are generated (beam
search shows its best open beam until the search ends). Questions are asked as the chat command asks them
(chat.py): with the conversation kept in the training template, or each alone after the released system text;
greedy, beam search or sampling. A context longer than the model's positions (at most the released 2000) less the
new tokens loses its first visual tokens, as the released demo cuts it, and the page says so.

The model loads once. Each frame count x decoding setting compiles its programs on its first answer (the page
says how long it took); later answers reuse them. A file that cannot be used is one message in the page, and the
server goes on serving. It listens on 127.0.0.1 unless --host says otherwise.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import glob
import io
import os
import queue
import threading
from typing import Any, Iterator

# Nothing leaves the machine: no usage statistics to Gradio or Hugging Face, no version check (set before import).
os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')
os.environ.setdefault('HF_HUB_DISABLE_TELEMETRY', '1')

import gradio as gr  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from PIL import Image  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

from stllm_jax import chat, checkpoints, generate  # noqa: E402  pylint: disable=wrong-import-position
from stllm_jax.data import conversation, inference  # noqa: E402  pylint: disable=wrong-import-position
from stllm_jax.data.errors import SampleError  # noqa: E402  pylint: disable=wrong-import-position
from stllm_jax.errors import UserError, exit_with  # noqa: E402  pylint: disable=wrong-import-position

VIDEO_EXTENSIONS = ('.mp4', '.webm', '.mkv', '.avi', '.gif')
DEFAULT_MAX_UPLOAD_MB = 200
FIXED_FRAME_COUNTS = (4, 8, 16, 32, 64)
DECODINGS = ('beam search', 'greedy', 'sampling')
MAX_BEAMS = 10
THUMBNAIL_PIXELS = 112  # larger frames are shrunk to this for the page
STRIP_CSS = '''
.frame-strip { display: flex; flex-wrap: wrap; gap: 6px; }
.frame-strip figure { margin: 0; text-align: center; }
.frame-strip img { width: 84px; height: 84px; border-radius: 4px; display: block; }
.frame-strip figcaption { font-size: 12px; opacity: 0.8; }
'''
NO_VIDEO = 'Upload a video or pick one first.'
# Measured with this page on 2 shared CPU cores (README, "Web demo"): the demo model's first answer compiled in 5.0
# to 6.5 s (8 frames, 5 beams).
DEMO_FIRST_ANSWER_SECONDS = 6


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog='python -m stllm_jax.serve', description=__doc__.split('\n\n')[0])
  parser.add_argument('--checkpoint', required=True, help='weights directory (convert output) or training workdir')
  parser.add_argument('--host', default='127.0.0.1', help='address to listen on (default: this machine only)')
  parser.add_argument('--port', type=int, default=7860)
  parser.add_argument('--max-upload-mb', type=int, default=DEFAULT_MAX_UPLOAD_MB,
                      help=f'largest video the page takes (default {DEFAULT_MAX_UPLOAD_MB})')
  parser.add_argument('--llm-tokenizer', default='', help='override the checkpoint\'s LLM tokenizer directory')
  parser.add_argument('--qformer-tokenizer', default='', help='override the checkpoint\'s Q-Former tokenizer directory')
  return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------- what the page offers


def demo_videos(checkpoint: str) -> list[str]:
  """The demo's held-out videos (DATA_DIR/videos/test_*) when `checkpoint` is a training workdir of a config with a
  `demo` section; [] for anything else."""
  found = None if checkpoints.is_weights_dir(checkpoint) else checkpoints.latest_run_extra(checkpoint)
  if found is None or 'demo' not in found[1].get('config', {}):
    return []
  _, extra = found
  data_dir = extra['config']['demo'].get('data_dir')  # every demo run saves it (stllm_jax/demo/run.py)
  if not data_dir:
    return []
  data_dir = checkpoints.resolve_run_path(data_dir, extra.get('origin', {}), checkpoint)
  return sorted(glob.glob(os.path.join(data_dir, 'videos', 'test_*')))


def frame_settings(model_config: Any) -> list[tuple[str, str]]:
  """(label, spec) of the frame settings this model allows: `auto` (the model's own), then the fixed counts and
  `global_local` that parse_frame_policy accepts for it and whose visual tokens take at most half of its positions."""
  budget = model_config.llm.max_positions // 2
  auto = inference.parse_frame_policy('auto', model_config.video_input, model_config.num_local_frames)
  settings = [(f'auto: {auto.describe()}', 'auto')]
  for spec in (*(str(n) for n in FIXED_FRAME_COUNTS), 'global_local'):
    try:
      policy = inference.parse_frame_policy(spec, model_config.video_input, model_config.num_local_frames)
    except ValueError:
      continue
    if model_config.num_visual_tokens(policy.num_frames) <= budget:
      settings.append((f'{spec} frames' if spec.isdigit() else f'{spec}: {policy.describe()}', spec))
  return settings


def context_limit(max_positions: int) -> int:
  """The released demo's max_length (2000), or the model's positions if fewer."""
  return min(chat.DEFAULT_CONTEXT_LIMIT, max_positions)


def default_options(max_positions: int) -> dict[str, Any]:
  """The page's first decoding options: the released demo's (chat.py: 5 beams, repetition penalty 1.5, 300 new
  tokens, or a quarter of the model's positions if that is less), with the conversation kept."""
  return dict(decoding='beam search', num_beams=chat.DEFAULT_NUM_BEAMS, temperature=1.0, top_p=0.9,
              max_new_tokens=min(chat.DEFAULT_MAX_NEW_TOKENS, max_positions // 4),
              repetition_penalty=chat.DEFAULT_REPETITION_PENALTY, multi_turn=True)


def decoding_config(decoding: str, num_beams: int, temperature: float, top_p: float, max_new_tokens: int,
                    repetition_penalty: float, max_positions: int) -> generate.GenerationConfig:
  """The page's decoding options as a GenerationConfig (EOS never first, the context cut to the model's positions
  or 2000, as chat.generation_config); UserError for values it cannot use."""
  if decoding not in DECODINGS:
    raise UserError(f'decoding must be one of {", ".join(DECODINGS)}, got {decoding!r}')
  sampling = decoding == 'sampling'
  config = generate.GenerationConfig(
      max_new_tokens=int(max_new_tokens), num_beams=int(num_beams) if decoding == 'beam search' else 1,
      do_sample=sampling, temperature=float(temperature), top_p=float(top_p) if sampling else 1.0,
      repetition_penalty=float(repetition_penalty), min_new_tokens=1, context_limit=context_limit(max_positions))
  try:
    config.validate()
  except ValueError as e:
    raise UserError(str(e)) from e
  return config


def thumbnails(loaded: inference.InferenceVideo) -> list[tuple[np.ndarray, str]]:
  """The frames the model sees, as uint8 images [S, S, 3] captioned with their time."""
  return [(frame, f'{seconds:.1f} s') for frame, seconds in zip(loaded.frames, inference.frame_times(loaded))]


def strip_html(frames: list[tuple[np.ndarray, str]]) -> str:
  """The thumbnail strip for the page: each frame a PNG inside the HTML (at most THUMBNAIL_PIXELS), its time under
  it."""
  figures = []
  for image, caption in frames:
    thumbnail = Image.fromarray(image)
    if max(thumbnail.size) > THUMBNAIL_PIXELS:
      thumbnail = thumbnail.resize((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS), Image.Resampling.BICUBIC)
    png = io.BytesIO()
    thumbnail.save(png, format='PNG')
    data = base64.b64encode(png.getvalue()).decode('ascii')
    figures.append(f'<figure><img src="data:image/png;base64,{data}" alt="frame at {caption}">'
                   f'<figcaption>{caption}</figcaption></figure>')
  return f'<div class="frame-strip">{"".join(figures)}</div>'


def describe_model(checkpoint: str, model_config: Any) -> str:
  tokens = model_config.qformer.num_query_tokens
  return (f'`{checkpoint}`: video input `{model_config.video_input}`, {tokens} visual tokens a frame, '
          f'{model_config.llm.max_positions} positions')


# ----------------------------------------------------------------------------------------- one tab's video and chat


@dataclasses.dataclass
class VideoChat:
  """What one browser tab talks about: the video, its frames and the conversation about them."""
  path: str
  name: str  # as the page shows it
  policy: inference.FramePolicy
  loaded: inference.InferenceVideo
  conversation: chat.Conversation


def user_message(name: str, error: SampleError | ValueError, path: str) -> str:
  """One line for a file the page cannot use, naming it by its own name instead of the server's copy."""
  detail = error.message if isinstance(error, SampleError) else str(error)
  return f'**{name}** cannot be used: {detail.replace(path, name)}'


class ChatServer:
  """The page's handlers around one loaded model (one generation at a time)."""

  def __init__(self, generator: generate.VideoGenerator, checkpoint: str, videos: list[str],
               max_upload_bytes: int):
    self.generator = generator
    self.checkpoint = checkpoint
    self.demo_videos = {os.path.basename(path): path for path in videos}
    self.max_upload_bytes = max_upload_bytes
    self.frame_settings = frame_settings(generator.config)
    self._generating = threading.Lock()

  @property
  def max_positions(self) -> int:
    return self.generator.max_positions

  def open_video(self, path: str, name: str, frames_spec: str) -> VideoChat:
    """The video at `path` sampled by `frames_spec`, with a new conversation; UserError naming what is wrong."""
    if not name.lower().endswith(VIDEO_EXTENSIONS):
      raise UserError(f'**{name}** is not a video: use an {", ".join(e[1:] for e in VIDEO_EXTENSIONS)} file')
    size = os.path.getsize(path)
    if size > self.max_upload_bytes:
      raise UserError(f'**{name}** is {size / 2**20:.0f} MB; this server takes videos up to '
                      f'{self.max_upload_bytes / 2**20:.0f} MB (--max-upload-mb)')
    cfg = self.generator.config
    try:
      policy = inference.parse_frame_policy(frames_spec, cfg.video_input, cfg.num_local_frames)
      loaded = inference.load_video_with_policy(path, policy, cfg.vision.image_size)
    except (SampleError, ValueError) as e:
      raise UserError(user_message(name, e, path)) from e
    options = default_options(self.max_positions)  # `ask` sets the page's options on every question
    multi_turn = options.pop('multi_turn')
    config = decoding_config(**options, max_positions=self.max_positions)
    return VideoChat(path, name, policy, loaded,
                     chat.Conversation(self.generator, loaded.frames, config, multi_turn=multi_turn))

  # handlers: each takes component values and returns the components' new values

  def choose_video(self, path: str | None, frames_spec: str) -> tuple[VideoChat | None, str, str, list, str]:
    """An uploaded or picked video -> (session, thumbnail strip, video status, chat, answer status)."""
    if not path:
      return None, '', '', [], ''
    return self._open(path, os.path.basename(path), frames_spec)

  def upload_video(self, path: str | None, frames_spec: str
                   ) -> tuple[VideoChat | None, str, str, list, str, str | None]:
    """choose_video's outputs and the upload box: emptied when the file cannot be used, so another can go in."""
    opened = self.choose_video(path, frames_spec)
    return (*opened, path if opened[0] is not None else None)

  def pick_demo_video(self, name: str | None, frames_spec: str) -> tuple[VideoChat | None, str, str, list, str]:
    return self.choose_video(self.demo_videos.get(name or ''), frames_spec)

  def change_frames(self, session: VideoChat | None, frames_spec: str
                    ) -> tuple[VideoChat | None, str, str, list, str]:
    """The same video at another frame setting (a new conversation: the model sees other frames)."""
    if session is None:
      return None, '', '', [], ''
    return self._open(session.path, session.name, frames_spec)

  def _open(self, path: str, name: str, frames_spec: str) -> tuple[VideoChat | None, str, str, list, str]:
    try:
      session = self.open_video(path, name, frames_spec)
    except UserError as e:
      return None, '', str(e), [], ''
    status = chat.describe_frames(f'**{name}**', session.loaded, session.policy)
    return session, strip_html(thumbnails(session.loaded)), status, [], ''

  def ask(self, session: VideoChat | None, question: str, messages: list, decoding: str, num_beams: int,
          temperature: float, top_p: float, max_new_tokens: int, repetition_penalty: float, multi_turn: bool
          ) -> Iterator[tuple[list, str, str]]:
    """Streams the answer: yields (chat messages, answer status, question box) after every decoding step."""
    question = (question or '').strip()
    if not question:
      yield messages, '', ''
      return
    if session is None:
      yield messages, NO_VIDEO, question
      return
    try:
      config = decoding_config(decoding, num_beams, temperature, top_p, max_new_tokens, repetition_penalty,
                               self.max_positions)
    except UserError as e:
      yield messages, str(e), question
      return
    chatting = session.conversation
    chatting.config, chatting.multi_turn = config, bool(multi_turn)
    asked = [*messages, {'role': 'user', 'content': question}]
    updates = self._answer_in_background(chatting, question)
    for kind, value in updates:
      if kind == 'ids':
        partial = conversation.answer_text(self.generator.llm_tokenizer, value[0], config.stop_strings)
        yield [*asked, {'role': 'assistant', 'content': partial}], 'answering ...', ''
      elif kind == 'error':
        yield messages, f'{value} Press "Clear" to start a new conversation.', question
      else:
        result, stats = value
        cut = (f'the first {result.context_cut} visual tokens were cut to fit {config.context_limit} positions with '
               f'{config.max_new_tokens} new tokens; ') if result.context_cut else ''
        yield [*asked, {'role': 'assistant', 'content': result.text}], cut + chat.describe_speed(stats), ''

  def _answer_in_background(self, chatting: chat.Conversation, question: str) -> Iterator[tuple[str, Any]]:
    """Runs chatting.ask on a thread; yields ('ids', the newest ids so far) while it decodes, then ('done',
    (result, stats)) or ('error', the message of a conversation too long for the model)."""
    updates: queue.Queue = queue.Queue()

    def work():
      try:
        with self._generating:
          updates.put(('done', chatting.ask(question, on_tokens=lambda ids: updates.put(('ids', ids)))))
      except ValueError as e:
        updates.put(('error', str(e)))
      except BaseException as e:  # pylint: disable=broad-except
        updates.put(('crash', e))

    threading.Thread(target=work, daemon=True).start()
    while True:
      kind, value = updates.get()
      while kind == 'ids' and not updates.empty():  # show only the newest of the steps that piled up
        kind, value = updates.get()
      if kind == 'crash':
        raise value
      yield kind, value
      if kind != 'ids':
        return

  def clear(self, session: VideoChat | None) -> tuple[list, str]:
    """Forgets the conversation (the video stays)."""
    if session is not None:
      session.conversation.history.clear()
    return [], ''


# ----------------------------------------------------------------------------------------- the page


PAGE_THEME = gr.themes.Default(font=['system-ui', 'sans-serif'], font_mono=['monospace'])  # no web fonts to fetch


def build_app(server: ChatServer) -> gr.Blocks:
  cfg = server.generator.config
  max_positions = server.max_positions
  defaults = dict(frames='auto', **default_options(max_positions))
  with gr.Blocks(title='ST-LLM video chat', analytics_enabled=False) as app:
    session = gr.State(None)
    gr.Markdown(f'## ST-LLM: chat about a video\nModel {describe_model(server.checkpoint, cfg)}. Upload a video or '
                'pick one, choose the frames, then ask. The first answer at each frame count and decoding setting '
                f'compiles the model first (about {DEMO_FIRST_ANSWER_SECONDS} s for the demo model on 2 CPU cores; '
                'the line under the chat says how long it took); later answers start at once.')
    with gr.Row():
      with gr.Column(scale=1, min_width=280):
        upload = gr.File(label='Video (mp4, webm, mkv, avi, GIF)', elem_id='video-upload')
        pick = gr.Dropdown(list(server.demo_videos), value=None, label='or a held-out video of the demo',
                           visible=bool(server.demo_videos), elem_id='demo-videos')
        frames = gr.Radio(server.frame_settings, value=defaults['frames'], label='Frames', elem_id='frames')
        with gr.Accordion('Decoding', open=False):
          decoding = gr.Radio(list(DECODINGS), value=defaults['decoding'], label='Decoding')
          num_beams = gr.Slider(1, MAX_BEAMS, value=defaults['num_beams'], step=1, label='Beams (beam search)')
          temperature = gr.Slider(0.05, 2.0, value=defaults['temperature'], step=0.05, label='Temperature (sampling)')
          top_p = gr.Slider(0.05, 1.0, value=defaults['top_p'], step=0.05, label='Top-p (sampling)')
          max_new_tokens = gr.Slider(1, max_positions // 2, value=defaults['max_new_tokens'], step=1,
                                     label='Max new tokens')
          repetition_penalty = gr.Slider(1.0, 2.0, value=defaults['repetition_penalty'], step=0.05,
                                         label='Repetition penalty')
          multi_turn = gr.Checkbox(value=defaults['multi_turn'], label='Keep the conversation (training template); '
                                   'off: each question alone after the released system text')
      with gr.Column(scale=2):
        video_status = gr.Markdown(elem_id='video-status')
        strip = gr.HTML(css_template=STRIP_CSS, js_on_load=None, elem_id='frame-strip')
        chatbot = gr.Chatbot(label='Chat', height=320, render_markdown=False, elem_id='chat')  # the model's own text
        question = gr.Textbox(placeholder='Ask about the video and press Enter', show_label=False,
                              elem_id='question')
        with gr.Row():
          send = gr.Button('Send', variant='primary', elem_id='send')
          clear = gr.Button('Clear', elem_id='clear')
          reset = gr.Button('Reset', elem_id='reset')
        answer_status = gr.Markdown(elem_id='answer-status')

    opened = [session, strip, video_status, chatbot, answer_status]
    upload.upload(server.upload_video, [upload, frames], [*opened, upload])
    upload.clear(lambda: (None, '', '', [], ''), None, opened)
    pick.input(server.pick_demo_video, [pick, frames], opened)
    frames.input(server.change_frames, [session, frames], opened)
    options = [decoding, num_beams, temperature, top_p, max_new_tokens, repetition_penalty, multi_turn]
    for trigger in (question.submit, send.click):
      trigger(server.ask, [session, question, chatbot, *options], [chatbot, answer_status, question])
    clear.click(server.clear, [session], [chatbot, answer_status])
    reset.click(lambda: (None, None, None, '', '', [], '', '', *defaults.values()), None,
                [session, upload, pick, strip, video_status, chatbot, answer_status, question, frames, *options])
  return app


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  try:
    print(f'loading {args.checkpoint} ...', flush=True)
    generator = generate.load_generator(args.checkpoint, args.llm_tokenizer, args.qformer_tokenizer)
    server = ChatServer(generator, args.checkpoint, demo_videos(args.checkpoint), args.max_upload_mb * 2**20)
  except UserError as error:
    exit_with(error)
  app = build_app(server)
  app.queue().launch(server_name=args.host, server_port=args.port, max_file_size=args.max_upload_mb * 2**20,
                     show_error=True, theme=PAGE_THEME)


if __name__ == '__main__':
  main()
