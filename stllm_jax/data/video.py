"""Video reading with PyAV: frame-index sampling and exact frame decoding.

    media path (mp4/webm/mkv/avi/gif file, or a folder of frame images)
      --probe--> Media (presentation time of every frame, keyframes, size)
      --clip_range(start, end)--> the frames inside the annotation's [start, end) seconds
      --frame indices (a sampling mode, or mvbench_indices)--> [T]
      --read_frames--> uint8 [T, H, W, 3] (RGB)

Frame `i` of a video is the i-th frame in presentation order, exactly as a sequential decode returns it.
Probing demuxes packets only (no decoding) to learn every frame's timestamp and the keyframes; reading then
seeks to the keyframe before each wanted frame and decodes forward, so a 60 s video costs a few GOPs, not
1,800 frames. Containers whose packets carry no timestamps fall back to one sequential decode.

Sampling modes of `load_clip` (all over the n frames of the clip):
  rand    one uniformly random frame in each of T equal segments [floor(k*n/T), floor((k+1)*n/T)) (training);
          with fewer frames than T, every frame once and the last one repeated to reach T
  even    the middle frame of each of those segments, padded the same way: T = n gives every frame, and a
          time-reversed video gives the frames reversed (the demo and its tower pretraining)
  middle  the released chat and zero-shot QA sampling (`segment_middles`): T = min(T, n) segments of
          (n - 1) / T frames with rounded ends, the middle of each; short videos give fewer frames, no repeats
  fps     one frame per second of clip: T = floor(duration) clipped to [min, max] (default [4, 16]), then `middle`
MVBench has its own released formula, `mvbench_indices`, with start/end rounded to frames, GIFs at 25 fps and
frame folders numbered from 1 (`inference.load_mvbench_video` uses it).

Every failure a user's data can cause is raised as `SampleError` with a reason code (see errors.py).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import re
import threading
from typing import Sequence

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from stllm_jax.data.errors import SampleError

SAMPLING_MODES = ('rand', 'even', 'middle', 'fps')
PADDED_MODES = ('rand', 'even')  # fixed T, short videos repeat their last frame
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')
DEFAULT_FPS_RANGE = (4, 16)
TRUNCATION_TOLERANCE = 0.95  # fewer demuxed frames than this share of the declared count: truncated


# ----------------------------------------------------------------------------------------- index sampling


def segment_bounds(num_available: int, num_segments: int) -> np.ndarray:
  """Edges of `num_segments` equal segments of `num_available` frames: int64 [num_segments + 1]."""
  return (np.arange(num_segments + 1, dtype=np.int64) * num_available) // num_segments


def fps_frame_count(duration_s: float, fps_range: tuple[int, int] = DEFAULT_FPS_RANGE) -> int:
  """Frames for `fps` sampling: one per whole second of clip, clipped to [min, max]."""
  low, high = fps_range
  return int(min(max(math.floor(duration_s), low), high))


def sample_indices(num_available: int, num_frames: int, mode: str,
                   rng: np.random.Generator | None = None) -> tuple[np.ndarray, int]:
  """Frame indices in [0, num_available) for `rand` or `even` sampling.

  Returns (indices int64 [num_frames], num_real_frames). With fewer frames than `num_frames`, every frame
  is taken once and the last index repeats; num_real_frames = min(num_frames, num_available).
  """
  if num_available < 1:
    raise ValueError(f'cannot sample from {num_available} frames')
  if num_frames < 1:
    raise ValueError(f'num_frames must be >= 1, got {num_frames}')
  num_real = min(num_frames, num_available)
  bounds = segment_bounds(num_available, num_real)
  starts, stops = bounds[:-1], bounds[1:]  # [num_real]; every segment holds at least one frame
  if mode == 'rand':
    if rng is None:
      raise ValueError('rand sampling needs an np.random.Generator')
    picked = starts + (rng.random(num_real) * (stops - starts)).astype(np.int64)
  elif mode == 'even':
    picked = (starts + stops - 1) // 2
  else:
    raise ValueError(f'unknown sampling mode {mode!r} for a fixed frame count; choose one of {PADDED_MODES}')
  indices = np.full(num_frames, picked[-1], np.int64)
  indices[:num_real] = picked
  return indices, num_real


def segment_middles(num_available: int, num_frames: int) -> np.ndarray:
  """The released chat and zero-shot QA frames (its `get_seq_frames`): T = min(num_frames, num_available)
  segments of (n - 1) / T frames; segment i runs from round(seg * i) to round(seg * (i + 1)) (halves to even,
  as numpy rounds) and gives (start + end) // 2. int64 [T], in [0, n - 1]; rounding can repeat a frame."""
  if num_available < 1 or num_frames < 1:
    raise ValueError(f'cannot take {num_frames} frames from {num_available}')
  count = min(num_frames, num_available)
  ends = np.round((num_available - 1) / count * np.arange(count + 1)).astype(np.int64)
  return (ends[:-1] + ends[1:]) // 2


def mvbench_indices(first: int, last: int, fps: float, num_frames: int | None,
                    fps_range: tuple[int, int] = DEFAULT_FPS_RANGE, *, start_s: float | None = None,
                    end_s: float | None = None) -> np.ndarray:
  """The released MVBench frames (its `MVBench_dataset.get_index`), as frame numbers from `first` to `last`.

  `first`/`last` number the video's first and last frames (0 and n - 1 for videos and GIFs; 1 and n for
  frame folders, whose files are numbered from 1). With bounds, start = max(first, round(start_s * fps)) and
  end = min(round(end_s * fps), last), else first and last. T = num_frames, or (None) one per second:
  floor(end_s - start_s, or last / fps) clipped to `fps_range`. seg = (end - start) / T and frame k is
  int(start + seg / 2 + round(seg * k)), halves rounded to even as Python and numpy do. int64 [T].
  """
  bounded = start_s is not None and end_s is not None
  start = max(first, round(start_s * fps)) if bounded else first
  end = min(round(end_s * fps), last) if bounded else last
  if end < start:
    raise SampleError('empty_clip', f'[{start_s}, {end_s}) s is frames {start}..{end} at {fps:g} fps; the video '
                      f'ends at frame {last}')
  count = num_frames or fps_frame_count(end_s - start_s if bounded else last / fps, fps_range)
  seg = (end - start) / count
  return (start + seg / 2 + np.round(seg * np.arange(count))).astype(np.int64)


# ----------------------------------------------------------------------------------------- probing


@dataclasses.dataclass(frozen=True)
class Media:
  """What probing learned about one video (no pixels yet)."""
  path: str
  kind: str  # 'container' (FFmpeg-readable file) or 'folder' (frame images)
  times: np.ndarray  # float64 [N]: seconds of each frame in presentation order, the first at 0
  fps: float
  width: int
  height: int
  pts: np.ndarray | None = None  # int64 [N]: stream timestamps (containers with timestamps)
  keyframe_pts: np.ndarray | None = None  # int64 [K] sorted: timestamps of keyframes
  files: tuple[str, ...] = ()  # frame images of a folder, in order

  @property
  def num_frames(self) -> int:
    return len(self.times)


def _natural_key(name: str):
  return [int(part) if part.isdigit() else part for part in re.split(r'(\d+)', name)]


def _probe_folder(path: str, folder_fps: float) -> Media:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  files = sorted((f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS)), key=_natural_key)
  if not files:
    raise SampleError('empty_file', f'frame folder {path} holds no images ({", ".join(IMAGE_EXTENSIONS)})')
  try:
    with Image.open(os.path.join(path, files[0])) as first:
      width, height = first.size
  except (OSError, ValueError) as e:
    raise SampleError('decode_error', f'{path}/{files[0]}: {e}') from e
  times = np.arange(len(files), dtype=np.float64) / folder_fps
  return Media(path, 'folder', times, float(folder_fps), width, height,
               files=tuple(os.path.join(path, f) for f in files))


def _open_container(path: str, threads: int):
  try:
    container = av.open(path, metadata_errors='ignore')
  except (av.FFmpegError, UnicodeDecodeError, ValueError) as e:
    raise SampleError('unreadable_file', f'{path}: {e}') from e
  if not container.streams.video:
    container.close()
    raise SampleError('no_video_stream', f'{path} has no video stream')
  stream = container.streams.video[0]
  stream.thread_type = 'AUTO' if threads > 1 else 'SLICE'
  stream.thread_count = threads
  return container, stream


def _probe_container(path: str, threads: int, max_pixels: int) -> Media:
  container, stream = _open_container(path, threads)
  try:
    width, height = stream.codec_context.width, stream.codec_context.height
    if width * height > max_pixels:
      raise SampleError('frame_too_large',
                        f'{path} is {width}x{height} = {width * height} pixels > max_frame_pixels {max_pixels}')
    pts, keys, missing_pts = [], [], False
    try:
      for packet in container.demux(stream):
        if packet.size == 0:
          continue  # the flush packet at the end
        if packet.pts is None:
          missing_pts = True
          pts.append(len(pts))
        else:
          pts.append(packet.pts)
        if packet.is_keyframe:
          keys.append(pts[-1])
    except av.FFmpegError as e:
      raise SampleError('decode_error', f'{path}: demuxing failed: {e}') from e
    if not pts:
      raise SampleError('too_few_frames', f'{path} has a video stream with no frames')
    declared = stream.frames  # from the container's index (0 when unknown)
    if declared and len(pts) < TRUNCATION_TOLERANCE * declared:
      raise SampleError('truncated_file', f'{path} declares {declared} frames but only {len(pts)} are present')
    pts_sorted = np.sort(np.asarray(pts, np.int64))  # presentation order
    rate = stream.average_rate or stream.guessed_rate
    if missing_pts:
      fps = float(rate) if rate else 25.0
      times = np.arange(len(pts_sorted), dtype=np.float64) / fps
      return Media(path, 'container', times, fps, width, height)
    time_base = float(stream.time_base)
    times = (pts_sorted - pts_sorted[0]) * time_base
    if rate:
      fps = float(rate)
    elif len(times) > 1 and times[-1] > 0:
      fps = (len(times) - 1) / times[-1]
    else:
      fps = 25.0
    return Media(path, 'container', times, fps, width, height, pts=pts_sorted,
                 keyframe_pts=np.unique(np.asarray(keys, np.int64)))
  finally:
    container.close()


def probe(path: str, *, folder_fps: float = 3.0, max_pixels: int = 3840 * 2160, threads: int = 1) -> Media:
  """Frame timestamps, size and keyframes of a video file or frame folder (demux only, no decoding).

  `folder_fps` is the frame rate of frame folders (MVBench's TVQA frames are 3 fps); `max_pixels` rejects
  huge frames before anything is decoded.
  """
  if not os.path.exists(path):
    raise SampleError('missing_file', f'{path} does not exist')
  if os.path.isdir(path):
    media = _probe_folder(path, folder_fps)
    if media.width * media.height > max_pixels:
      raise SampleError('frame_too_large', f'{path}: frames are {media.width}x{media.height} > {max_pixels} pixels')
    return media
  if os.path.getsize(path) == 0:
    raise SampleError('empty_file', f'{path} has zero bytes')
  return _probe_container(path, threads, max_pixels)


def clip_range(times: np.ndarray, start: float | None = None, end: float | None = None) -> tuple[int, int]:
  """[first, stop) frame range shown during [start, end) seconds (either may be None: open-ended)."""
  first = 0 if start is None else int(np.searchsorted(times, start, side='left'))
  stop = len(times) if end is None else int(np.searchsorted(times, end, side='left'))
  if stop <= first:
    raise SampleError('empty_clip', f'no frame lies in [{start}, {end}) s; the video has frames at '
                      f'{times[0]:.2f}..{times[-1]:.2f} s')
  return first, stop


# ----------------------------------------------------------------------------------------- decoding


class _SeekMismatch(Exception):
  """Seeking did not land on the demuxed timestamps; decode sequentially instead."""


_thread_state = threading.local()


def _to_rgb(frame: av.VideoFrame) -> np.ndarray:
  """uint8 [H, W, 3], the pixels of `frame.to_ndarray(format='rgb24')`, with one swscale context per thread
  (re-made only when the frame's size or format changes): to_ndarray makes a new one for every frame, 4x the
  time for the demo's 64x64 frames."""
  if not hasattr(_thread_state, 'reformatter'):
    _thread_state.reformatter = VideoReformatter()
  return _thread_state.reformatter.reformat(frame, format='rgb24').to_ndarray()


def _decode_by_seeking(container, stream, wanted_pts: np.ndarray, keyframe_pts: np.ndarray) -> dict[int, np.ndarray]:
  """Decodes the frames whose pts are `wanted_pts` (sorted, unique), seeking to the keyframe before each.

  Packets are fed to the decoder one by one; those of frames nobody wants are decoded with
  skip_frame=NONREF, so non-reference frames (most B-frames) are not decoded at all. Skipping them cannot
  change any other frame, and roughly halves the decoding work of a long GOP.
  """
  wanted = set(int(p) for p in wanted_pts)
  codec = stream.codec_context
  out: dict[int, np.ndarray] = {}
  packets = None
  position = None  # pts of the last decoded frame
  for target in wanted_pts:
    target = int(target)
    if target in out:
      continue
    before = keyframe_pts[keyframe_pts <= target]
    key = int(before[-1]) if len(before) else int(keyframe_pts[0]) if len(keyframe_pts) else target
    if packets is None or position is None or key > position:
      container.seek(key, stream=stream, backward=True, any_frame=False)
      packets = container.demux(stream)
      position = None
    for packet in packets:
      flush = packet.size == 0
      codec.skip_frame = 'DEFAULT' if flush or packet.pts in wanted else 'NONREF'
      for frame in codec.decode(None if flush else packet):
        if frame.pts is None:
          raise _SeekMismatch('a decoded frame has no pts')
        position = frame.pts
        if frame.pts in wanted:
          out[frame.pts] = _to_rgb(frame)
        elif frame.pts > target and target not in out:
          raise _SeekMismatch(f'decoder skipped pts {target}')
      if target in out:
        break
    else:
      if target not in out:
        raise _SeekMismatch(f'stream ended before pts {target}')
  codec.skip_frame = 'DEFAULT'
  return out


def _decode_sequentially(container, stream, wanted: np.ndarray) -> dict[int, np.ndarray]:
  """Decodes from the start, keeping the frames whose ordinals are in `wanted` (sorted, unique)."""
  out: dict[int, np.ndarray] = {}
  wanted_set = set(int(i) for i in wanted)
  last = int(wanted[-1])
  for ordinal, frame in enumerate(container.decode(stream)):
    if ordinal in wanted_set:
      out[ordinal] = _to_rgb(frame)
    if ordinal >= last:
      break
  return out


def _read_container_frames(media: Media, unique: np.ndarray, threads: int) -> list[np.ndarray]:
  container, stream = _open_container(media.path, threads)
  try:
    if media.pts is not None:
      try:
        by_pts = _decode_by_seeking(container, stream, media.pts[unique], media.keyframe_pts)
        return [by_pts[int(p)] for p in media.pts[unique]]
      except _SeekMismatch:
        container.close()
        container, stream = _open_container(media.path, threads)
    by_ordinal = _decode_sequentially(container, stream, unique)
    missing = [int(i) for i in unique if int(i) not in by_ordinal]
    if missing:
      raise SampleError('decode_error', f'{media.path}: frames {missing[:5]} could not be decoded '
                        f'(the file is probably truncated)')
    return [by_ordinal[int(i)] for i in unique]
  except av.FFmpegError as e:
    raise SampleError('decode_error', f'{media.path}: {e}') from e
  finally:
    container.close()


def _read_folder_frames(media: Media, unique: np.ndarray) -> list[np.ndarray]:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  frames = []
  for i in unique:
    path = media.files[int(i)]
    try:
      with Image.open(path) as image:
        frames.append(np.asarray(image.convert('RGB')))
    except (OSError, ValueError) as e:
      raise SampleError('decode_error', f'{path}: {e}') from e
  return frames


def read_frames(media: Media, indices: Sequence[int], threads: int = 1) -> np.ndarray:
  """The frames at `indices` (presentation order; repeats allowed): uint8 [len(indices), H, W, 3]."""
  indices = np.asarray(indices, np.int64)
  if indices.size == 0 or indices.min() < 0 or indices.max() >= media.num_frames:
    raise ValueError(f'frame indices must lie in [0, {media.num_frames}), got {indices.tolist()}')
  unique, inverse = np.unique(indices, return_inverse=True)
  if media.kind == 'folder':
    frames = _read_folder_frames(media, unique)
  else:
    frames = _read_container_frames(media, unique, threads)
  shapes = {f.shape for f in frames}
  if len(shapes) != 1:
    raise SampleError('decode_error', f'{media.path}: frames change size mid-video {sorted(shapes)}')
  return np.stack(frames)[inverse]


# ----------------------------------------------------------------------------------------- one call


@dataclasses.dataclass(frozen=True)
class Clip:
  frames: np.ndarray  # uint8 [T, H, W, 3]
  indices: np.ndarray  # int64 [T]: frame indices in the whole video
  num_real_frames: int  # distinct frames among the T
  fps: float
  duration_s: float  # of the clip that was sampled


def clip_indices(num_available: int, num_frames: int | None, mode: str, rng: np.random.Generator | None,
                 duration_s: float, fps_range: tuple[int, int]) -> np.ndarray:
  """Indices in [0, num_available) of one sampling mode (see the module docstring)."""
  if mode == 'fps':
    return segment_middles(num_available, fps_frame_count(duration_s, fps_range))
  if num_frames is None:
    raise ValueError(f'sampling mode {mode!r} needs num_frames')
  if mode == 'middle':
    return segment_middles(num_available, num_frames)
  return sample_indices(num_available, num_frames, mode, rng)[0]


class DecodedVideos:
  """Whole videos, decoded once and kept in memory, the least recently used dropped beyond `max_bytes`.

  For a small set read many times (the demo reads its 800 short videos 48 times): a kept video costs no probe,
  no open and no decoding. A video larger than the budget is never kept. One per process (`shared`): grain's
  worker processes each keep their own. Entries are keyed by path, size and modification time (and the
  probe's folder_fps and max_pixels).
  """

  def __init__(self, max_bytes: int):
    self.max_bytes = max_bytes
    self.bytes = 0
    self.hits = self.misses = 0
    self._videos: collections.OrderedDict[tuple, tuple[Media, np.ndarray]] = collections.OrderedDict()

  def __len__(self) -> int:
    return len(self._videos)

  def get(self, path: str, folder_fps: float, max_pixels: int, threads: int) -> tuple[Media, np.ndarray | None]:
    """The video's Media and all its frames uint8 [N, H, W, 3]; frames None when it is too large to keep (the
    caller then reads the frames it needs)."""
    try:
      stat = os.stat(path)
      key = (path, folder_fps, max_pixels, stat.st_size, stat.st_mtime_ns)  # max_pixels: probe's check holds
    except OSError:
      key = None  # missing: probe says so
    if key in self._videos:
      self.hits += 1
      self._videos.move_to_end(key)
      return self._videos[key]
    self.misses += 1
    media = probe(path, folder_fps=folder_fps, max_pixels=max_pixels, threads=threads)
    size = media.num_frames * media.height * media.width * 3
    if key is None or size > self.max_bytes:
      return media, None
    try:
      frames = read_frames(media, np.arange(media.num_frames), threads)
    except SampleError:
      return media, None  # a frame the clip may not need is broken: the caller reads only its own
    while self._videos and self.bytes + frames.nbytes > self.max_bytes:
      _, (_, dropped) = self._videos.popitem(last=False)
      self.bytes -= dropped.nbytes
    self._videos[key] = (media, frames)
    self.bytes += frames.nbytes
    return media, frames

  @classmethod
  def shared(cls, max_bytes: int) -> DecodedVideos:
    """This process's cache of `max_bytes` (one per budget)."""
    if max_bytes not in _SHARED_CACHES:
      _SHARED_CACHES[max_bytes] = cls(max_bytes)
    return _SHARED_CACHES[max_bytes]


_SHARED_CACHES: dict[int, DecodedVideos] = {}


def load_clip(path: str, num_frames: int | None, mode: str, *, rng: np.random.Generator | None = None,
              start: float | None = None, end: float | None = None,
              fps_range: tuple[int, int] = DEFAULT_FPS_RANGE, folder_fps: float = 3.0,
              min_frames: int = 1, max_pixels: int = 3840 * 2160, threads: int = 1,
              cache: DecodedVideos | None = None) -> Clip:
  """Probe, pick the frames of [start, end) with `mode`, and decode them (or take them from `cache`).

  `num_frames` is T for `rand`/`even`/`middle` and ignored for `fps`. Raises SampleError for unusable input.
  """
  if mode not in SAMPLING_MODES:
    raise ValueError(f'unknown sampling mode {mode!r}; choose one of {SAMPLING_MODES}')
  if cache is not None:
    media, all_frames = cache.get(path, folder_fps, max_pixels, threads)
  else:
    media, all_frames = probe(path, folder_fps=folder_fps, max_pixels=max_pixels, threads=threads), None
  if media.num_frames < min_frames:
    raise SampleError('too_few_frames', f'{path} has {media.num_frames} frame(s); at least {min_frames} needed')
  first, stop = clip_range(media.times, start, end)
  available = stop - first
  duration = available / media.fps
  indices = clip_indices(available, num_frames, mode, rng, duration, fps_range) + first
  frames = read_frames(media, indices, threads) if all_frames is None else all_frames[indices]
  return Clip(frames, indices, len(np.unique(indices)), media.fps, duration)
