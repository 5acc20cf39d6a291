"""Test helpers for the data package: tiny videos written with PyAV, broken media, tokenizers, annotations."""

from __future__ import annotations

import json
import os

import av
import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers
import transformers

from stllm_jax.demo import tiny_tokenizers

CORPUS = ['###Human: Describe the video. What moves? ###Assistant: A red ball moves to the left.',
          'Which direction does the blue square move?\nOptions:\n(A) left\n(B) right', 'It moves up.']


def pattern_frames(num_frames: int, height: int = 48, width: int = 64) -> np.ndarray:
  """uint8 [N, H, W, 3], every frame different (a moving bar and a frame-dependent colour)."""
  frames = np.zeros((num_frames, height, width, 3), np.uint8)
  for t in range(num_frames):
    frames[t, ..., 0] = (t * 37) % 200 + 20
    frames[t, ..., 1] = 60
    frames[t, :, (t * 3) % width] = 255
  return frames


def write_video(path: str, frames: np.ndarray, fps: int = 10, codec: str = 'libx264',
                options: dict[str, str] | None = None, faststart: bool = False) -> str:
  """Encodes uint8 [N, H, W, 3] frames with PyAV (container from the file extension)."""
  container = av.open(path, mode='w', options={'movflags': 'faststart'} if faststart else {})
  stream = container.add_stream(codec, rate=fps, options=options or {})
  stream.width, stream.height = frames.shape[2], frames.shape[1]
  stream.pix_fmt = 'rgb8' if codec == 'gif' else 'yuv420p'
  for frame in frames:
    for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')):
      container.mux(packet)
  for packet in stream.encode():
    container.mux(packet)
  container.close()
  return path


def decode_all(path: str) -> np.ndarray:
  """Sequential decode of every frame: uint8 [N, H, W, 3] (the reference for exact-frame tests)."""
  with av.open(path) as container:
    return np.stack([f.to_ndarray(format='rgb24') for f in container.decode(video=0)])


def write_frame_folder(directory: str, frames: np.ndarray, start: int = 1) -> str:
  """Frames as lossless PNG files 00001.png, 00002.png, ... (MVBench's frame-folder layout)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  for n, frame in enumerate(frames):
    Image.fromarray(frame).save(os.path.join(directory, f'{n + start:05d}.png'))
  return directory


def write_audio_only(path: str) -> str:
  """An mp4 with one AAC audio stream and no video stream."""
  container = av.open(path, mode='w')
  stream = container.add_stream('aac', rate=16000)
  samples = np.zeros((1, 16000), np.float32)
  frame = av.AudioFrame.from_ndarray(samples, format='fltp', layout='mono')
  frame.sample_rate = 16000
  for packet in stream.encode(frame):
    container.mux(packet)
  for packet in stream.encode():
    container.mux(packet)
  container.close()
  return path


def write_broken_media(directory: str) -> dict[str, str]:
  """Every kind of bad media file, by the skip reason it must produce: reason -> name in `directory`.

  A truncated mp4 whose index (moov) was at the end cannot be opened at all (`unreadable_file`); one whose
  index is at the front opens but lacks frames (`truncated_file`).
  """
  os.makedirs(directory, exist_ok=True)
  good = write_video(os.path.join(directory, 'good_for_truncation.mp4'), pattern_frames(30))
  with open(good, 'rb') as f:
    data = f.read()
  with open(os.path.join(directory, 'truncated.mp4'), 'wb') as f:
    f.write(data[:len(data) // 2])
  faststart = write_video(os.path.join(directory, 'faststart.mp4'), pattern_frames(30), faststart=True)
  with open(faststart, 'rb') as f:
    data = f.read()
  with open(os.path.join(directory, 'truncated_faststart.mp4'), 'wb') as f:
    f.write(data[:len(data) * 2 // 3])
  open(os.path.join(directory, 'zero.mp4'), 'wb').close()
  with open(os.path.join(directory, 'text.mp4'), 'w') as f:
    f.write('this is not a video\n' * 20)
  write_audio_only(os.path.join(directory, 'audio_only.mp4'))
  write_video(os.path.join(directory, 'one_frame.mp4'), pattern_frames(1))
  write_video(os.path.join(directory, 'huge.mp4'), pattern_frames(1, 3000, 4000), options={'preset': 'ultrafast'})
  folder = write_frame_folder(os.path.join(directory, 'corrupt_frames'), pattern_frames(6))
  for name in sorted(os.listdir(folder))[1:]:  # the first image is fine, the others are not images
    with open(os.path.join(folder, name), 'wb') as f:
      f.write(b'\x89PNG broken')
  return {'missing_file': 'does_not_exist.mp4', 'empty_file': 'zero.mp4', 'unreadable_file': 'text.mp4',
          'unreadable_file_truncated': 'truncated.mp4', 'truncated_file': 'truncated_faststart.mp4',
          'no_video_stream': 'audio_only.mp4',
          'too_few_frames': 'one_frame.mp4', 'frame_too_large': 'huge.mp4', 'decode_error': 'corrupt_frames'}


def make_tokenizers(directory: str, corpus: list[str] | None = None) -> tuple[str, str]:
  """(llm_dir, qformer_dir): tiny LLaMA-style and BERT-style tokenizers trained on `corpus`."""
  corpus = CORPUS if corpus is None else corpus
  llm = tiny_tokenizers.build_llm_tokenizer(os.path.join(directory, 'llm'), corpus)
  qformer = tiny_tokenizers.build_qformer_tokenizer(os.path.join(directory, 'qformer'), corpus)
  return llm, qformer


def word_level_llm_tokenizer(directory: str, words: list[str], with_pad: bool = True) -> str:
  """A whitespace word-level LLaMA-style tokenizer: <unk>=0, <s>=1, </s>=2, words from 3, [PAD] last.

  Each word is one token, so tests can state the expected ids by hand.
  """
  vocab = {'<unk>': 0, '<s>': 1, '</s>': 2}
  for word in words:
    vocab.setdefault(word, len(vocab))
  tok = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  kwargs = dict(pad_token='[PAD]') if with_pad else {}
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token='</s>', eos_token='</s>',
                                              unk_token='<unk>', **kwargs)
  fast.save_pretrained(directory)
  return directory


def sentencepiece_llm_tokenizer(directory: str, corpus: list[str], vocab_size: int = 400) -> str:
  """A Vicuna-style tokenizer directory: a SentencePiece BPE model trained here with LLaMA's settings (byte
  fallback, split digits, a dummy prefix, whitespace kept, no normalisation; <unk> 0, <s> 1, </s> 2) and the
  tokenizer_config.json of a Hugging Face LLaMA directory."""
  import io  # pylint: disable=g-import-not-at-top
  import sentencepiece  # pylint: disable=g-import-not-at-top
  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus), model_writer=model, vocab_size=vocab_size, model_type='bpe', byte_fallback=True,
      split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name='identity',
      allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False,
      minloglevel=2)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, 'tokenizer.model'), 'wb') as f:
    f.write(model.getvalue())
  write_json(os.path.join(directory, 'tokenizer_config.json'), dict(
      tokenizer_class='LlamaTokenizer', add_bos_token=True, add_eos_token=False, bos_token='<s>', eos_token='</s>',
      unk_token='<unk>', pad_token=None, clean_up_tokenization_spaces=False, model_max_length=2048,
      sp_model_kwargs={}))
  return directory


def write_json(path: str, value) -> str:
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(value, f)
  return path


def qa_row(video: str, question: str = 'What moves?', answer: str = 'A red ball.', instruction: str = '',
           **extra) -> dict:
  return dict(video=video, QA=[dict(i=instruction, q=question, a=answer)], **extra)
