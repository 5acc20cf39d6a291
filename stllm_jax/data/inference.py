"""One video -> model-ready frames for chat and evaluation (MVBench, zero-shot QA).

    path (+ start/end seconds) --load_clip(middle | fps) or mvbench_indices--> uint8 [T, H, W, 3]
      --eval_resize_crop (shorter side to S, bicubic, centre crop)--> uint8 [T, S, S, 3] (the model normalises)

Chat and zero-shot QA take the released `get_seq_frames` frames (`video.segment_middles`): `middle` takes
num_frames of them, `fps` one per second of the clip, T clipped to `fps_range`; a video with fewer frames gives
fewer, never repeats. MVBench takes the released benchmark's own frames (`load_mvbench_video`). Unusable
input raises `SampleError` (reason + message); callers that want to go on past a broken file catch it.

`FramePolicy` names the choice for chat and evaluation (`parse_frame_policy`: auto | fps | fps:LOW-HIGH | N |
global_local), so the paper's fixed-T vs fps-1 comparison (supplement Table 2) is one flag.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from stllm_jax.data import transforms, video

INFERENCE_SAMPLING = ('middle', 'fps', 'even')
MVBENCH_GIF_FPS = 25.0  # the released MVBench reader times every GIF at 25 fps


@dataclasses.dataclass(frozen=True)
class InferenceVideo:
  frames: np.ndarray  # uint8 [T, S, S, 3] RGB, channels-last (the model CLIP-normalises them)
  indices: np.ndarray  # int64 [T]: frame indices in the video
  num_real_frames: int  # distinct frames among the T
  fps: float
  duration_s: float  # of the sampled clip


def load_video_for_inference(path: str, *, sampling: str = 'middle', num_frames: int = 16,
                             start: float | None = None, end: float | None = None, image_size: int = 224,
                             fps_range: tuple[int, int] = video.DEFAULT_FPS_RANGE, folder_fps: float = 3.0,
                             min_frames: int = 1, max_pixels: int = 3840 * 2160, threads: int = 2) -> InferenceVideo:
  """Frames of `path` (video file, GIF or frame folder) for the model, with the evaluation transform.
  `sampling`: middle | fps (chat and QA) | even (the demo); see video.py."""
  if sampling not in INFERENCE_SAMPLING:
    raise ValueError(f'inference sampling must be one of {INFERENCE_SAMPLING}, got {sampling!r}')
  clip = video.load_clip(path, num_frames, sampling, start=start, end=end, fps_range=fps_range,
                         folder_fps=folder_fps, min_frames=min_frames, max_pixels=max_pixels, threads=threads)
  return InferenceVideo(transforms.eval_resize_crop(clip.frames, image_size), clip.indices, clip.num_real_frames,
                        clip.fps, clip.duration_s)


# ----------------------------------------------------------------------------------------- frame policy


@dataclasses.dataclass(frozen=True)
class FramePolicy:
  """How many frames inference takes: `fps` = one per second, clipped to `fps_range`; `middle` = `num_frames`
  (fixed T; global-local models take 64). Where they lie is the benchmark's: chat and QA `segment_middles`,
  MVBench `mvbench_indices`."""
  sampling: str = 'fps'
  num_frames: int = 16  # `middle` only
  fps_range: tuple[int, int] = video.DEFAULT_FPS_RANGE
  min_frames: int = 1  # a video with fewer frames is too_few_frames (global-local models need their local frames)

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
    policy = dataclasses.replace(policy, min_frames=num_local_frames)
  return policy


def load_video_with_policy(path: str, policy: FramePolicy, image_size: int) -> InferenceVideo:
  """Chat and zero-shot QA frames of a whole video."""
  return load_video_for_inference(path, sampling=policy.sampling, num_frames=policy.num_frames, image_size=image_size,
                                  fps_range=policy.fps_range, min_frames=policy.min_frames)


def load_mvbench_video(path: str, data_type: str, policy: FramePolicy, image_size: int, start: float | None = None,
                       end: float | None = None, folder_fps: float = 3.0, threads: int = 2) -> InferenceVideo:
  """One MVBench video's frames as the released benchmark picks them (`video.mvbench_indices`): the policy's
  fixed count (`middle`) or one per second (`fps`), inside [start, end] seconds when the task has bounds.

  As the released readers: a frame folder ('frame' tasks, TVQA) runs at `folder_fps` with its files numbered
  from 1 and its last number the file count; a 'gif' task's file is timed at 25 fps whatever its own timing;
  a video at its average frame rate.
  """
  media = video.probe(path, folder_fps=folder_fps, threads=threads)
  if media.kind == 'folder':
    first, last, fps = 1, media.num_frames, folder_fps
  elif data_type == 'gif':
    first, last, fps = 0, media.num_frames - 1, MVBENCH_GIF_FPS
  else:
    first, last, fps = 0, media.num_frames - 1, media.fps
  fixed = policy.num_frames if policy.sampling == 'middle' else None
  indices = video.mvbench_indices(first, last, fps, fixed, policy.fps_range, start_s=start, end_s=end) - first
  bounded = start is not None and end is not None
  frames = video.read_frames(media, indices, threads)
  return InferenceVideo(transforms.eval_resize_crop(frames, image_size), indices, len(np.unique(indices)), fps,
                        end - start if bounded else media.num_frames / fps)


def frame_times(loaded: InferenceVideo) -> np.ndarray:
  """Seconds (from the start of the file) of each frame used: float64 [T]."""
  return loaded.indices / loaded.fps
