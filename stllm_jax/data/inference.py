"""One video -> model-ready frames for chat and evaluation (MVBench, zero-shot QA).

    path (+ start/end seconds) --load_clip(middle | fps)--> uint8 [T, H, W, 3]
      --eval_transform (shorter side to S, bicubic, centre crop, CLIP mean/std)--> float32 [T, S, S, 3]

`middle` takes T = num_frames segment middles; `fps` takes one frame per second of the clip, T clipped to
`fps_range` (MVBench: [4, 16]). Unusable input raises `SampleError` (reason + message); callers that want
to go on past a broken file catch it.

`FramePolicy` names the choice for chat and evaluation (`parse_frame_policy`: auto | fps | fps:LOW-HIGH | N |
global_local), so the paper's fixed-T vs fps-1 comparison (supplement Table 2) is one flag.
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


# ----------------------------------------------------------------------------------------- frame policy


@dataclasses.dataclass(frozen=True)
class FramePolicy:
  """How many frames inference takes, and where: `fps` = one per second, clipped to `fps_range`;
  `middle` = `num_frames` segment middles (fixed T; global-local models take 64 this way)."""
  sampling: str = 'fps'
  num_frames: int = 16  # `middle` only
  fps_range: tuple[int, int] = video.DEFAULT_FPS_RANGE

  def describe(self) -> str:
    if self.sampling == 'fps':
      return f'1 per second, {self.fps_range[0]}-{self.fps_range[1]}'
    return f'{self.num_frames} segment middles'

  @property
  def name(self) -> str:  # for file names
    return f'fps{self.fps_range[0]}-{self.fps_range[1]}' if self.sampling == 'fps' else f'fixed{self.num_frames}'


GLOBAL_FRAMES_PER_LOCAL = 4  # global-local: 64 frames encoded for 16 local ones (REFERENCE.md)


def parse_frame_policy(spec: str, video_input: str = 'all', num_local_frames: int = 16) -> FramePolicy:
  """'auto' (global-local models: 4 x num_local_frames middles; others: fps), 'fps', 'fps:LOW-HIGH', 'N'
  (fixed N), 'global_local' (4 x num_local_frames middles). Raises ValueError naming the accepted forms."""
  spec = (spec or 'auto').strip()
  global_local = FramePolicy('middle', GLOBAL_FRAMES_PER_LOCAL * num_local_frames)
  if spec == 'auto':
    policy = global_local if video_input == 'global_local' else FramePolicy()
  elif spec == 'global_local':
    policy = global_local
  elif spec == 'fps':
    policy = FramePolicy()
  elif spec.startswith('fps:') and '-' in spec[4:] and spec[4:].replace('-', '', 1).isdigit():
    low, high = (int(v) for v in spec[4:].split('-'))
    if not 1 <= low <= high:
      raise ValueError(f'frames {spec!r}: need 1 <= LOW <= HIGH')
    policy = FramePolicy('fps', fps_range=(low, high))
  elif spec.isdigit() and int(spec) > 0:
    policy = FramePolicy('middle', int(spec))
  else:
    raise ValueError(f'frames {spec!r}: use auto, fps, fps:LOW-HIGH (e.g. fps:4-16), a frame count (e.g. 16) '
                     'or global_local')
  if video_input == 'global_local':
    fewest = policy.num_frames if policy.sampling == 'middle' else policy.fps_range[0]
    if fewest < num_local_frames:
      raise ValueError(f'frames {spec!r}: this global-local model needs at least num_local_frames={num_local_frames} '
                       'frames; use a fixed count such as 64 (or auto)')
  return policy


def load_video_with_policy(path: str, policy: FramePolicy, image_size: int, start: float | None = None,
                           end: float | None = None, folder_fps: float = 3.0) -> InferenceVideo:
  return load_video_for_inference(path, sampling=policy.sampling, num_frames=policy.num_frames, start=start, end=end,
                                  image_size=image_size, fps_range=policy.fps_range, folder_fps=folder_fps)


def frame_times(loaded: InferenceVideo) -> np.ndarray:
  """Seconds (from the start of the file) of each frame used: float64 [T]."""
  return loaded.indices / loaded.fps
