"""One training sample: annotation row -> frames and token ids (runs inside the data workers).

    raw row --parse_row--> Row --pick one QA pair (rng)--> text ids, answer mask, Q-Former ids
            --load_clip(rand, T, start/end)--> uint8 [T, H, W, 3] --train_crop--> uint8 [T, S, S, 3]

Text is encoded before the video is decoded, so a row that fails on its text costs no decoding.
Any unusable input raises SampleError (see errors.py); the caller counts it and draws a replacement.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from stllm_jax.data import annotations, conversation, transforms, video


@dataclasses.dataclass(frozen=True)
class SampleOptions:
  """Everything `load_training_sample` needs besides the row (picklable; tokenizers load lazily)."""
  llm_tokenizer: str
  qformer_tokenizer: str
  max_text_length: int  # the largest text bucket
  max_answer_tokens: int = conversation.MAX_ANSWER_TOKENS  # the answer + </s> are cut to this many tokens
  qformer_max_length: int = conversation.QFORMER_MAX_LENGTH
  image_size: int = 224
  crop_scale: tuple[float, float] = transforms.DEFAULT_SCALE
  min_video_frames: int = 2
  max_frame_pixels: int = 3840 * 2160
  decode_threads: int = 1
  allowed_media_dirs: tuple[str, ...] = ()  # where symlinks under a media root may lead
  video_cache_bytes: int = 0  # decoded videos this process keeps (video.DecodedVideos); 0: none


def load_training_sample(raw: Any, media_root: str, num_frames: int, folder_fps: float,
                         rng: np.random.Generator, options: SampleOptions) -> dict[str, Any]:
  """Arrays of one sample: frames uint8 [T, S, S, 3] (the model normalises them), input_ids / answer_mask int32 [n],
  qformer_input_ids int32 [m], and int metadata (num_real_frames, qa_index, text_truncated,
  qformer_truncated)."""
  row = annotations.parse_row(raw)
  qa_index = int(rng.integers(len(row.qa)))
  qa = row.qa[qa_index]
  llm_tok = conversation.load_llm_tokenizer(options.llm_tokenizer)
  text = conversation.encode_training_text(llm_tok, qa.instruction, qa.question, qa.answer,
                                           options.max_text_length, options.max_answer_tokens)
  qformer_ids, qformer_dropped = conversation.encode_qformer_text(
      conversation.load_qformer_tokenizer(options.qformer_tokenizer),
      conversation.qformer_text(qa.instruction, qa.question), options.qformer_max_length)
  path = annotations.media_path(media_root, row.video, options.allowed_media_dirs)
  clip = video.load_clip(path, num_frames, 'rand', rng=rng, start=row.start, end=row.end, folder_fps=folder_fps,
                         min_frames=options.min_video_frames, max_pixels=options.max_frame_pixels,
                         threads=options.decode_threads,
                         cache=video.DecodedVideos.shared(options.video_cache_bytes) if options.video_cache_bytes
                         else None)
  frames = transforms.train_crop(clip.frames, rng, options.image_size, options.crop_scale)
  return dict(frames=frames, input_ids=text.input_ids, answer_mask=text.answer_mask,
              qformer_input_ids=qformer_ids, num_real_frames=clip.num_real_frames, qa_index=qa_index,
              text_truncated=text.truncated_tokens, qformer_truncated=qformer_dropped)
