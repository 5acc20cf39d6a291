"""Frame transforms: uint8 video frames -> uint8 crops, channels-last; CLIP normalisation to float32.

    training:   uint8 [T, H, W, 3] --one RandomResizedCrop(size, scale 0.5-1.0, bicubic) for all T frames-->
    evaluation: uint8 [T, H, W, 3] --resize shorter side to size (bicubic) + centre crop-->
                uint8 [T, size, size, 3]  (--/255, CLIP mean/std--> float32 on the device, by the model)

Batches and inference videos carry uint8 frames (a quarter of float32's bytes from the data workers to the
device); the model normalises them with `UINT8_NORMALIZED`, `normalize`'s value of every uint8 in each channel, so
a frame reaches the vision tower with the same float32 bits whichever side normalised it.

The crop box follows torchvision's RandomResizedCrop (10 tries of a random area and log-uniform aspect
ratio, then a centre crop with the ratio clamped); resampling is Pillow's bicubic (antialiased when
shrinking), as the original's PIL-based pipeline. No flip, as the original.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
DEFAULT_SCALE = (0.5, 1.0)
DEFAULT_RATIO = (3 / 4, 4 / 3)


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int,
                            scale: tuple[float, float] = DEFAULT_SCALE,
                            ratio: tuple[float, float] = DEFAULT_RATIO) -> tuple[int, int, int, int]:
  """(top, left, crop_height, crop_width) of one random crop, torchvision's algorithm."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  # Fallback: the largest centre crop whose ratio lies in `ratio`.
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def shorter_side_resize_shape(height: int, width: int, size: int) -> tuple[int, int]:
  """(new_height, new_width) with the shorter side `size` (torchvision Resize(int) rounding)."""
  if height <= width:
    return size, int(size * width / height)
  return int(size * height / width), size


def centre_crop_offsets(height: int, width: int, size: int) -> tuple[int, int]:
  """(top, left) of a centre `size` crop (torchvision CenterCrop rounding)."""
  return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def _resize(frame: np.ndarray, out_hw: tuple[int, int], box: tuple[int, int, int, int] | None = None) -> np.ndarray:
  """Bicubic resize of uint8 [H, W, 3] (optionally of the (left, top, right, bottom) box) to out_hw."""
  image = Image.fromarray(frame)
  return np.asarray(image.resize((out_hw[1], out_hw[0]), Image.BICUBIC, box=box))


def train_crop(frames: np.ndarray, rng: np.random.Generator, size: int = 224,
               scale: tuple[float, float] = DEFAULT_SCALE) -> np.ndarray:
  """uint8 [T, H, W, 3] -> uint8 [T, size, size, 3]: one random resized crop shared by all frames."""
  _, height, width, _ = frames.shape
  top, left, h, w = random_resized_crop_box(rng, height, width, scale)
  box = (left, top, left + w, top + h)
  return np.stack([_resize(frame, (size, size), box) for frame in frames])


def eval_resize_crop(frames: np.ndarray, size: int = 224) -> np.ndarray:
  """uint8 [T, H, W, 3] -> uint8 [T, size, size, 3]: shorter side to `size` (bicubic), then centre crop."""
  _, height, width, _ = frames.shape
  new_h, new_w = shorter_side_resize_shape(height, width, size)
  top, left = centre_crop_offsets(new_h, new_w, size)
  out = []
  for frame in frames:
    resized = frame if (new_h, new_w) == (height, width) else _resize(frame, (new_h, new_w))
    out.append(resized[top:top + size, left:left + size])
  return np.stack(out)


def normalize(frames: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] -> float32 CLIP-normalised [..., 3]."""
  scale = (1.0 / (255.0 * CLIP_STD)).astype(np.float32)
  offset = (CLIP_MEAN / CLIP_STD).astype(np.float32)
  out = np.empty(frames.shape, np.float32)  # written twice, no temporaries: x * scale, then - offset, in float32
  np.multiply(frames, scale, out=out)
  out -= offset
  return out


UINT8_NORMALIZED = normalize(np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1))  # float32 [256, 3]

