"""Why a sample was skipped: one exception type with a reason code from a fixed list.

Every per-sample failure the data path can meet is raised as `SampleError(reason, message)`. The training
pipeline catches it, counts the sample under `reason` and moves on; evaluation code lets it propagate.
Anything else raised while loading a sample is a bug in this package and is not swallowed.
"""

from __future__ import annotations

# reason -> what it means (shown in docs and error messages)
REASONS = {
    'missing_file': 'the media path does not exist (check the dataset media_root)',
    'outside_media_root': 'the media path leads outside the media root (an absolute path, "..", or a symlink out); '
                          'it is never opened',
    'empty_file': 'the media file has zero bytes, or the frame folder holds no images',
    'unreadable_file': 'FFmpeg cannot open the file (not a media file, or a truncated/corrupt container)',
    'truncated_file': 'the container declares more frames than the file holds (an interrupted download or copy)',
    'no_video_stream': 'the container has no video stream (e.g. audio only)',
    'decode_error': 'FFmpeg or Pillow failed while decoding frames',
    'too_few_frames': 'the video has fewer frames than data.min_video_frames',
    'frame_too_large': 'the frame size exceeds data.max_frame_pixels',
    'empty_clip': 'no frame lies between the annotation start and end seconds',
    'bad_annotation': 'the annotation row lacks a key or has a value of the wrong type',
    'empty_qa': 'the annotation row has an empty QA list',
    'text_too_long': 'the prompt and the answer (cut to data.max_answer_tokens) are longer than the largest text '
                     'bucket (data.text_buckets); the prompt is never cut',
}


class SampleError(Exception):
  """A sample that cannot be used; `reason` is one of `REASONS`."""

  def __init__(self, reason: str, message: str):
    if reason not in REASONS:
      raise ValueError(f'unknown skip reason {reason!r}; known: {sorted(REASONS)}')
    super().__init__(f'{reason}: {message}')
    self.reason = reason
    self.message = message

  def __reduce__(self):  # picklable across grain worker processes
    return SampleError, (self.reason, self.message)


class DataError(RuntimeError):
  """A failure of the whole data pipeline (bad config, too many skipped samples): the run should stop."""
