"""Training and evaluation transforms: crop boxes, shared crops, shapes and normalisation statistics;
and the inference entry point that chat and MVBench use."""

import numpy as np
import pytest
from PIL import Image

from stllm_jax.data import inference, transforms
from stllm_jax.data.errors import SampleError

import data_helpers as helpers


def test_random_resized_crop_box_obeys_scale_and_ratio():
  rng = np.random.default_rng(0)
  for _ in range(300):
    top, left, h, w = transforms.random_resized_crop_box(rng, 360, 640)
    assert 0 <= top and top + h <= 360 and 0 <= left and left + w <= 640
    assert 0.5 * 0.97 <= h * w / (360 * 640) <= 1.0  # scale (0.5, 1.0), up to rounding
    assert 3 / 4 * 0.97 <= w / h <= 4 / 3 * 1.03  # ratio (3/4, 4/3), up to rounding


def test_random_resized_crop_box_is_seeded():
  boxes = lambda seed: [transforms.random_resized_crop_box(np.random.default_rng(seed), 240, 320) for _ in range(3)]
  assert boxes(5) == boxes(5)
  assert boxes(5) != boxes(6)


def test_random_resized_crop_box_fallback_for_extreme_aspect():
  # A 10x1000 strip: no random crop fits the ratio range, so the widest centre crop with ratio 4/3 is used.
  assert transforms.random_resized_crop_box(np.random.default_rng(0), 10, 1000) == (0, 493, 10, 13)


def test_train_crop_is_shared_by_all_frames():
  rng = np.random.default_rng(0)
  base = rng.integers(80, 140, (1, 60, 80, 3), dtype=np.uint8)  # bicubic overshoot stays inside 0..255
  frames = base + np.arange(4, dtype=np.uint8)[:, None, None, None] * 10  # frame t = frame 0 + 10 t
  out = transforms.train_crop(frames, np.random.default_rng(3), size=32)
  assert out.shape == (4, 32, 32, 3) and out.dtype == np.uint8
  # The same crop and resampling of a constant offset gives the same offset (no value reaches 255 here).
  for t in range(4):
    assert np.abs(out[t].astype(int) - out[0].astype(int) - 10 * t).max() <= 1


def test_train_crop_matches_pillow_on_the_chosen_box():
  frames = helpers.pattern_frames(2, 48, 64)
  top, left, h, w = transforms.random_resized_crop_box(np.random.default_rng(9), 48, 64)
  expected = np.asarray(Image.fromarray(frames[1]).crop((left, top, left + w, top + h)).resize((24, 24), Image.BICUBIC))
  out = transforms.train_crop(frames, np.random.default_rng(9), size=24)
  assert np.abs(out[1].astype(int) - expected.astype(int)).max() <= 1


def test_eval_resize_crop_shapes_and_centring():
  assert transforms.shorter_side_resize_shape(48, 64, 224) == (224, 298)
  assert transforms.shorter_side_resize_shape(640, 360, 224) == (398, 224)
  assert transforms.centre_crop_offsets(224, 298, 224) == (0, 37)
  frames = np.zeros((2, 48, 64, 3), np.uint8)
  frames[:, :, 32:] = 255  # left half black, right half white
  out = transforms.eval_resize_crop(frames, 224)
  assert out.shape == (2, 224, 224, 3)
  left, right = out[0, :, :100].mean(), out[0, :, 124:].mean()
  assert left < 5 and right > 250  # the vertical edge stays in the middle of the crop
  square = helpers.pattern_frames(1, 224, 224)
  np.testing.assert_array_equal(transforms.eval_resize_crop(square, 224), square)  # already the size: untouched


def test_normalisation_statistics():
  mean_image = np.broadcast_to(np.round(transforms.CLIP_MEAN * 255).astype(np.uint8), (1, 4, 4, 3))
  assert np.abs(transforms.normalize(mean_image)).max() < 0.01
  white = transforms.normalize(np.full((1, 2, 2, 3), 255, np.uint8))
  np.testing.assert_allclose(white[0, 0, 0], (1 - transforms.CLIP_MEAN) / transforms.CLIP_STD, rtol=1e-6)
  rng = np.random.default_rng(0)
  out = transforms.normalize(rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8))
  expected_mean = (127.5 / 255 - transforms.CLIP_MEAN) / transforms.CLIP_STD
  expected_std = np.sqrt((256 ** 2 - 1) / 12) / 255 / transforms.CLIP_STD
  np.testing.assert_allclose(out.mean(axis=(0, 1, 2)), expected_mean, atol=0.03)
  np.testing.assert_allclose(out.std(axis=(0, 1, 2)), expected_std, rtol=0.03)


def test_normalisation_is_float32_x_times_scale_minus_offset_to_the_bit():
  """Each of the 256 values per channel, and a batch-shaped array: (float32(x) * scale) - offset, each op in float32."""
  scale = (1.0 / (255.0 * transforms.CLIP_STD)).astype(np.float32)
  offset = (transforms.CLIP_MEAN / transforms.CLIP_STD).astype(np.float32)
  every_value = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)  # [256, 3]
  frames = np.random.default_rng(1).integers(0, 256, (2, 3, 8, 8, 3), dtype=np.uint8)
  for x in (every_value, frames):
    out = transforms.normalize(x)
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_array_equal(out, x.astype(np.float32) * scale - offset)


def test_full_transforms_shapes_and_dtypes():
  frames = helpers.pattern_frames(3, 90, 160)
  train = transforms.train_crop(frames, np.random.default_rng(0), 224)
  evaluation = transforms.eval_resize_crop(frames, 224)
  for out in (train, evaluation):  # the model normalises them
    assert out.shape == (3, 224, 224, 3) and out.dtype == np.uint8
  normalised = transforms.normalize(evaluation)
  assert normalised.dtype == np.float32 and np.isfinite(normalised).all()
  assert normalised.min() >= -1.8 and normalised.max() <= 2.2  # the CLIP-normalised range of uint8 input


def test_load_video_for_inference(tmp_path):
  frames = helpers.pattern_frames(40)
  path = helpers.write_video(str(tmp_path / 'v.mp4'), frames)
  middle = inference.load_video_for_inference(path, num_frames=8, image_size=56)
  assert middle.frames.shape == (8, 56, 56, 3) and middle.frames.dtype == np.uint8
  np.testing.assert_array_equal(middle.indices, [2, 7, 12, 17, 22, 26, 31, 36])  # video.segment_middles(40, 8)
  expected = transforms.eval_resize_crop(helpers.decode_all(path)[middle.indices], 56)
  np.testing.assert_array_equal(middle.frames, expected)
  by_fps = inference.load_video_for_inference(path, sampling='fps', start=0.0, end=2.5, image_size=32)
  # 25 frames = 2.5 s -> 4 frames (the minimum); seg 24 / 4 = 6: ends 0, 6, 12, 18, 24 -> middles 3, 9, 15, 21
  np.testing.assert_array_equal(by_fps.indices, [3, 9, 15, 21])
  assert by_fps.num_real_frames == 4
  with pytest.raises(ValueError, match='middle'):
    inference.load_video_for_inference(path, sampling='rand')


def test_chat_and_qa_frames_of_a_short_video_are_not_padded(tmp_path):
  path = helpers.write_video(str(tmp_path / 'short.mp4'), helpers.pattern_frames(5))
  loaded = inference.load_video_for_inference(path, num_frames=8, image_size=32)
  # T = min(8, 5) = 5, seg 4 / 5 = 0.8: ends 0, 1 (0.8), 2 (1.6), 2 (2.4), 3 (3.2), 4 -> middles 0, 1, 2, 2, 3
  np.testing.assert_array_equal(loaded.indices, [0, 1, 2, 2, 3])
  assert loaded.frames.shape == (5, 32, 32, 3) and loaded.num_real_frames == 4
  global_local = inference.parse_frame_policy('auto', 'global_local', 16)  # needs 16 local frames
  with pytest.raises(SampleError) as e:
    inference.load_video_with_policy(path, global_local, 32)
  assert e.value.reason == 'too_few_frames' and 'at least 16' in e.value.message
