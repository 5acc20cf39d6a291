"""One video -> model-ready frames for chat and evaluation (MVBench, zero-shot QA).

    path (+ start/end seconds) --load_clip(middle | fps)--> uint8 [T, H, W, 3]
      --eval_transform (shorter side to S, bicubic, centre crop, CLIP mean/std)--> float32 [T, S, S, 3]

`middle` takes T = num_frames segment middles; `fps` takes one frame per second of the clip, T clipped to
`fps_range` (MVBench: [4, 16]). Unusable input raises `SampleError` (reason + message); callers that want
to go on past a broken file catch it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from stllm_jax.data import transforms, video


@dataclasses.dataclass(frozen=True)
class InferenceVideo:
  frames: np.ndarray  # float32 [T, S, S, 3], CLIP-normalised, channels-last
  indices: np.ndarray  # int64 [T]: frame indices in the video
  num_real_frames: int  # distinct frames (< T when the video is shorter than T frames)
  fps: float
  duration_s: float  # of the sampled clip


def load_video_for_inference(path: str, *, sampling: str = 'middle', num_frames: int = 16,
                             start: float | None = None, end: float | None = None, image_size: int = 224,
                             fps_range: tuple[int, int] = video.DEFAULT_FPS_RANGE, folder_fps: float = 3.0,
                             max_pixels: int = 3840 * 2160, threads: int = 2) -> InferenceVideo:
  """Frames of `path` (video file, GIF or frame folder) for the model, with the evaluation transform."""
  if sampling not in ('middle', 'fps'):
    raise ValueError(f'inference sampling must be "middle" or "fps", got {sampling!r}')
  clip = video.load_clip(path, num_frames, sampling, start=start, end=end, fps_range=fps_range,
                         folder_fps=folder_fps, min_frames=1, max_pixels=max_pixels, threads=threads)
  return InferenceVideo(transforms.eval_transform(clip.frames, image_size), clip.indices, clip.num_real_frames,
                        clip.fps, clip.duration_s)
