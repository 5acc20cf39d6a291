"""Frame-index sampling against hand-computed cases, exact-frame decoding, and bad media."""

import os

import av
import numpy as np
import pytest

from stllm_jax.data import video
from stllm_jax.data.errors import SampleError

import data_helpers as helpers


# ----------------------------------------------------------------------------------------- sampling


def test_segment_bounds_hand_computed():
  np.testing.assert_array_equal(video.segment_bounds(10, 4), [0, 2, 5, 7, 10])
  np.testing.assert_array_equal(video.segment_bounds(16, 16), np.arange(17))


@pytest.mark.parametrize('n, t, expected', [
    (10, 4, [0, 3, 5, 8]),  # segments [0,2) [2,5) [5,7) [7,10): middles (a + b - 1) // 2
    (100, 4, [12, 37, 62, 87]),
    (16, 16, list(range(16))),  # T = n: every frame
    (33, 1, [16]),
])
def test_even_indices_hand_computed(n, t, expected):
  indices, num_real = video.sample_indices(n, t, 'even')
  np.testing.assert_array_equal(indices, expected)
  assert num_real == t


@pytest.mark.parametrize('n, t, expected', [
    # The released chat / zero-shot QA sampling (stllm/test/video_utils.py, get_seq_frames): T = min(t, n),
    # seg = (n - 1) / T, segment i runs from round(seg * i) to round(seg * (i + 1)) (numpy rounds halves to even),
    # and its frame is (start + end) // 2.
    # n=10, T=4: seg 2.25; ends round(0, 2.25, 4.5, 6.75, 9) = 0, 2, 4, 7, 9 -> (0+2)//2, (2+4)//2, (4+7)//2, (7+9)//2
    (10, 4, [1, 3, 5, 8]),
    # n=16, T=4 (a 2 s chat video at 8 fps): seg 3.75; ends 0, 4 (3.75), 8 (7.5), 11 (11.25), 15 -> 2, 6, 9, 13
    (16, 4, [2, 6, 9, 13]),
    # n=40, T=8: seg 4.875; ends 0, 5, 10 (9.75), 15 (14.625), 20 (19.5 -> 20), 24 (24.375), 29 (29.25),
    # 34 (34.125), 39 -> 2, 7, 12, 17, 22, 26, 31, 36
    (40, 8, [2, 7, 12, 17, 22, 26, 31, 36]),
    # n=16, T=16: seg 0.9375; ends 0, 1, 2, 3, 4 (3.75), 5, 6, 7, 8 (7.5), 8 (8.4375), 9, ..., 15: frame 8 twice and
    # frame 15 never, as in the released code
    (16, 16, [0, 1, 2, 3, 4, 5, 6, 7, 8, 8, 9, 10, 11, 12, 13, 14]),
    # fewer frames than asked: T = n = 3, seg 2/3; ends 0, 1 (0.67), 1 (1.33), 2 -> 0, 1, 1: 3 frames, not 5
    (3, 5, [0, 1, 1]),
    (1, 64, [0]),
])
def test_segment_middles_are_the_released_chat_and_qa_frames(n, t, expected):
  np.testing.assert_array_equal(video.segment_middles(n, t), expected)


@pytest.mark.parametrize('first, last, fps, num_frames, bounds, expected', [
    # The released MVBench sampling (stllm/test/mvbench/mv_bench.py, MVBench_dataset.get_index):
    # start = max(first, round(start_s * fps)), end = min(round(end_s * fps), last) (first / last without bounds),
    # N = clip(floor(seconds), 4, 16) with seconds = end_s - start_s or last / fps (or N fixed),
    # seg = (end - start) / N, frame k = int(start + seg / 2 + round(seg * k)); Python and numpy round halves to even.
    # 40 frames at 10 fps, no bounds: last 39, 3.9 s -> N 4, seg 9.75;
    # 4.875 + 0, 4.875 + 10 (9.75), 4.875 + 20 (19.5 -> 20), 4.875 + 29 (29.25) -> 4, 14, 24, 33
    (0, 39, 10.0, None, None, [4, 14, 24, 33]),
    # 181 frames at 30 fps: last 180, 6.0 s -> N 6, seg 30: 15 + 30k
    (0, 180, 30.0, None, None, [15, 45, 75, 105, 135, 165]),
    # bounds 1.0-2.5 s at 10 fps: start 10, end 25, 1.5 s -> N 4, seg 3.75;
    # 11.875 + 0, + 4 (3.75), + 8 (7.5), + 11 (11.25) -> 11, 15, 19, 22
    (0, 39, 10.0, None, (1.0, 2.5), [11, 15, 19, 22]),
    # bounds 0.25-2.75 s at 10 fps: start round(2.5) = 2, end round(27.5) = 28, 2.5 s -> N 4, seg 6.5;
    # 5.25 + 0, + 6 (6.5), + 13, + 20 (19.5) -> 5, 11, 18, 25
    (0, 39, 10.0, None, (0.25, 2.75), [5, 11, 18, 25]),
    # fixed N = 8 (--frames 8), 40 frames at 10 fps: seg 39 / 8 = 4.875;
    # 2.4375 + 0, 5, 10 (9.75), 15 (14.625), 20 (19.5), 24 (24.375), 29 (29.25), 34 (34.125)
    (0, 39, 10.0, 8, None, [2, 7, 12, 17, 22, 26, 31, 36]),
    # a frame folder (TVQA, 3 fps, files numbered from 1): first 1, last = the number of files (40); bounds 1.0-4.5 s:
    # start 3, end round(13.5) = 14, 3.5 s -> N 4, seg 2.75; 4.375 + 0, + 3 (2.75), + 6 (5.5), + 8 (8.25)
    (1, 40, 3.0, None, (1.0, 4.5), [4, 7, 10, 12]),
    # the same folder without bounds: 40 / 3 = 13.3 s -> N 13, seg 39 / 13 = 3: int(1 + 1.5 + 3k)
    (1, 40, 3.0, None, None, [2 + 3 * k for k in range(13)]),
    # a 16-frame GIF, read at 25 fps as the released code does: last 15, 0.6 s -> N 4, seg 3.75;
    # 1.875 + 0, + 4, + 8 (7.5), + 11 (11.25) -> 1, 5, 9, 12
    (0, 15, 25.0, None, None, [1, 5, 9, 12]),
])
def test_mvbench_indices_are_the_released_ones(first, last, fps, num_frames, bounds, expected):
  start, end = bounds or (None, None)
  np.testing.assert_array_equal(video.mvbench_indices(first, last, fps, num_frames, start_s=start, end_s=end),
                                expected)


def test_mvbench_bounds_past_the_video_are_an_empty_clip():
  with pytest.raises(SampleError) as e:
    video.mvbench_indices(0, 39, 10.0, None, start_s=5.0, end_s=6.0)  # start 50 > last 39
  assert e.value.reason == 'empty_clip'


def test_training_pads_short_videos_with_the_last_frame():
  indices, num_real = video.sample_indices(3, 5, 'even')
  np.testing.assert_array_equal(indices, [0, 1, 2, 2, 2])
  assert num_real == 3
  indices, num_real = video.sample_indices(3, 5, 'rand', np.random.default_rng(0))
  np.testing.assert_array_equal(indices, [0, 1, 2, 2, 2])
  assert num_real == 3


def test_rand_takes_one_frame_per_segment_and_reaches_all():
  seen = [set() for _ in range(4)]
  for seed in range(200):
    indices, _ = video.sample_indices(10, 4, 'rand', np.random.default_rng(seed))
    for k, (lo, hi) in enumerate([(0, 2), (2, 5), (5, 7), (7, 10)]):
      assert lo <= indices[k] < hi
      seen[k].add(int(indices[k]))
  assert seen == [{0, 1}, {2, 3, 4}, {5, 6}, {7, 8, 9}]  # every frame of every segment is reachable
  a, _ = video.sample_indices(1000, 16, 'rand', np.random.default_rng(7))
  b, _ = video.sample_indices(1000, 16, 'rand', np.random.default_rng(7))
  np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('seconds, expected', [(0.5, 4), (3.99, 4), (4.0, 4), (10.7, 10), (16.0, 16), (600, 16)])
def test_fps_frame_count(seconds, expected):
  assert video.fps_frame_count(seconds) == expected


def test_bad_sampling_arguments():
  with pytest.raises(ValueError, match='unknown sampling mode'):
    video.sample_indices(10, 4, 'middle')
  with pytest.raises(ValueError, match='needs an np.random.Generator'):
    video.sample_indices(10, 4, 'rand')


def test_clip_range_hand_computed():
  times = np.arange(40) / 10.0  # 10 fps
  assert video.clip_range(times) == (0, 40)
  assert video.clip_range(times, 1.0, 2.05) == (10, 21)  # frames shown during [1.0, 2.05) s
  assert video.clip_range(times, None, 0.5) == (0, 5)
  with pytest.raises(SampleError) as e:
    video.clip_range(times, 5.0, 6.0)
  assert e.value.reason == 'empty_clip'


# ----------------------------------------------------------------------------------------- decoding


@pytest.fixture(scope='module')
def videos(tmp_path_factory):
  """The same 40 pattern frames in every container MVBench uses, plus a frame folder."""
  root = tmp_path_factory.mktemp('videos')
  frames = helpers.pattern_frames(40)
  paths = {
      'mp4': helpers.write_video(str(root / 'v.mp4'), frames, options={'g': '12'}),  # B-frames, 4 GOPs
      'mp4_one_gop': helpers.write_video(str(root / 'long_gop.mp4'), frames),
      'webm': helpers.write_video(str(root / 'v.webm'), frames, codec='libvpx-vp9', options={'g': '10'}),
      'mkv': helpers.write_video(str(root / 'v.mkv'), frames, options={'g': '8'}),
      'avi': helpers.write_video(str(root / 'v.avi'), frames, codec='mpeg4', options={'g': '10'}),
      'gif': helpers.write_video(str(root / 'v.gif'), frames, codec='gif'),
      'folder': helpers.write_frame_folder(str(root / 'frames'), frames),
  }
  return paths, frames


def test_rgb_frames_equal_pyav_s_own_conversion_through_changes_of_size_and_format(videos, tmp_path):
  """The reused swscale context follows each frame: yuv420p 64x48, rgb8 (gif), then yuv420p 32x24."""
  small = helpers.write_video(str(tmp_path / 'small.mp4'), helpers.pattern_frames(4, height=24, width=32))
  for path in (videos[0]['mp4'], videos[0]['gif'], small, videos[0]['mp4']):
    with av.open(path) as container:
      for frame in container.decode(video=0):
        np.testing.assert_array_equal(video._to_rgb(frame), frame.to_ndarray(format='rgb24'))  # pylint: disable=protected-access


@pytest.mark.parametrize('kind', ['mp4', 'mp4_one_gop', 'webm', 'mkv', 'avi', 'gif'])
def test_seeking_decode_equals_sequential_decode(videos, kind):
  path = videos[0][kind]
  reference = helpers.decode_all(path)  # uint8 [40, 48, 64, 3]
  media = video.probe(path)
  assert media.num_frames == len(reference) == 40
  assert media.fps == pytest.approx(10.0)
  rng = np.random.default_rng(0)
  for indices in ([0], [39], [5, 5, 6], [0, 12, 13, 24, 35, 39], [30, 2, 17],
                  np.sort(rng.choice(40, 9, replace=False))):
    for threads in (1, 2):  # FFmpeg frame threading must not change which frames come out
      got = video.read_frames(media, indices, threads=threads)
      assert got.dtype == np.uint8 and got.shape == (len(indices), 48, 64, 3)
      np.testing.assert_array_equal(got, reference[np.asarray(indices)])


def test_frame_folder_reads_exact_frames(videos):
  path, frames = videos[0]['folder'], videos[1]
  media = video.probe(path, folder_fps=3.0)
  assert media.kind == 'folder' and media.num_frames == 40 and media.fps == 3.0
  np.testing.assert_array_equal(video.read_frames(media, [0, 7, 39]), frames[[0, 7, 39]])


def test_load_clip_middle_fps_and_start_end(videos):
  path = videos[0]['mp4']
  reference = helpers.decode_all(path)
  clip = video.load_clip(path, 4, 'middle')
  np.testing.assert_array_equal(clip.indices, [5, 15, 24, 34])  # seg 39/4 = 9.75: ends 0, 10, 20 (19.5), 29, 39
  np.testing.assert_array_equal(clip.frames, reference[[5, 15, 24, 34]])
  np.testing.assert_array_equal(video.load_clip(path, 4, 'even').indices, [4, 14, 24, 34])
  # 40 frames at 10 fps = 4 s -> 4 frames; [1 s, 3 s) = frames 10..29 = 2 s -> still 4 (the minimum)
  np.testing.assert_array_equal(video.load_clip(path, None, 'fps').indices, [5, 15, 24, 34])
  clip = video.load_clip(path, None, 'fps', start=1.0, end=3.0)
  np.testing.assert_array_equal(clip.indices, [12, 17, 22, 26])  # 10 + (seg 19/4: ends 0, 5, 10 (9.5), 14, 19)
  assert clip.duration_s == pytest.approx(2.0)
  np.testing.assert_array_equal(video.load_clip(path, None, 'fps', fps_range=(1, 2)).indices, [10, 29])  # seg 19.5
  clip = video.load_clip(path, 3, 'rand', rng=np.random.default_rng(1), start=2.0)
  assert all(lo <= i < hi for i, (lo, hi) in zip(clip.indices, [(20, 26), (26, 33), (33, 40)]))
  np.testing.assert_array_equal(clip.frames, reference[clip.indices])


def test_short_video_is_padded_and_says_so(tmp_path):
  frames = helpers.pattern_frames(5)
  path = helpers.write_video(str(tmp_path / 'short.mp4'), frames)
  clip = video.load_clip(path, 8, 'rand', rng=np.random.default_rng(0))
  np.testing.assert_array_equal(clip.indices, [0, 1, 2, 3, 4, 4, 4, 4])
  assert clip.num_real_frames == 5
  np.testing.assert_array_equal(clip.frames, helpers.decode_all(path)[[0, 1, 2, 3, 4, 4, 4, 4]])


def test_decoded_videos_give_the_same_clips_and_decode_each_video_once(tmp_path):
  paths = [helpers.write_video(str(tmp_path / f'v{i}.mp4'), helpers.pattern_frames(20 + 5 * i)) for i in range(2)]
  paths.append(helpers.write_frame_folder(str(tmp_path / 'folder'), helpers.pattern_frames(12)))
  cache = video.DecodedVideos(max_bytes=64 << 20)
  for round_ in range(2):
    for seed, path in enumerate(paths):
      for mode, start in (('rand', None), ('rand', 0.5), ('even', None), ('middle', None)):
        expected = video.load_clip(path, 6, mode, rng=np.random.default_rng(seed), start=start)
        got = video.load_clip(path, 6, mode, rng=np.random.default_rng(seed), start=start, cache=cache)
        np.testing.assert_array_equal(got.indices, expected.indices)
        np.testing.assert_array_equal(got.frames, expected.frames)
        assert (got.num_real_frames, got.fps, got.duration_s) == (
            expected.num_real_frames, expected.fps, expected.duration_s)
    assert (cache.misses, len(cache)) == (3, 3)  # decoded in the first round only
  assert cache.hits == 2 * 3 * 4 - 3
  assert cache.bytes == sum(n * 48 * 64 * 3 for n in (20, 25, 12))


def test_a_kept_video_still_meets_a_smaller_pixel_limit(tmp_path):
  path = helpers.write_video(str(tmp_path / 'v.mp4'), helpers.pattern_frames(10))  # 48 x 64 frames
  cache = video.DecodedVideos(max_bytes=64 << 20)
  video.load_clip(path, 4, 'even', cache=cache)  # kept under the default limit
  with pytest.raises(SampleError) as error:
    video.load_clip(path, 4, 'even', max_pixels=48 * 64 - 1, cache=cache)
  assert error.value.reason == 'frame_too_large'


def test_decoded_videos_stay_within_their_budget(tmp_path):
  small = helpers.write_video(str(tmp_path / 'small.mp4'), helpers.pattern_frames(10))
  large = helpers.write_video(str(tmp_path / 'large.mp4'), helpers.pattern_frames(30))
  one_small = 10 * 48 * 64 * 3
  cache = video.DecodedVideos(max_bytes=one_small + 1)
  reference = helpers.decode_all(large)
  clip = video.load_clip(large, 4, 'even', cache=cache)  # larger than the budget: read, never kept
  np.testing.assert_array_equal(clip.frames, reference[clip.indices])
  assert (len(cache), cache.bytes) == (0, 0)
  video.load_clip(small, 4, 'even', cache=cache)
  other = helpers.write_video(str(tmp_path / 'other.mp4'), helpers.pattern_frames(10)[::-1])
  clip = video.load_clip(other, 4, 'even', cache=cache)  # the least recently used (small) makes room
  np.testing.assert_array_equal(clip.frames, helpers.decode_all(other)[clip.indices])
  assert (len(cache), cache.bytes) == (1, one_small)
  before = os.stat(other).st_mtime_ns
  helpers.write_video(other, helpers.pattern_frames(10))  # rewritten in place: decoded again
  os.utime(other, ns=(before + 10**9, before + 10**9))  # a later time even where the clock is coarse
  clip = video.load_clip(other, 4, 'even', cache=cache)
  np.testing.assert_array_equal(clip.frames, helpers.decode_all(other)[clip.indices])


def test_a_video_with_a_broken_frame_is_read_as_without_the_cache(tmp_path, monkeypatch):
  """Decoding the whole video fails on a frame the clip does not need: the clip is still read."""
  path = helpers.write_video(str(tmp_path / 'v.mp4'), helpers.pattern_frames(20))
  real_read = video.read_frames

  def read_frames_without_the_last(media, indices, threads=1):
    if max(indices) == media.num_frames - 1 and len(indices) == media.num_frames:
      raise SampleError('decode_error', 'the last frame is broken')
    return real_read(media, indices, threads)

  monkeypatch.setattr(video, 'read_frames', read_frames_without_the_last)
  cache = video.DecodedVideos(max_bytes=64 << 20)
  clip = video.load_clip(path, 4, 'middle', cache=cache)
  np.testing.assert_array_equal(clip.frames, helpers.decode_all(path)[clip.indices])
  assert len(cache) == 0


# ----------------------------------------------------------------------------------------- bad media


@pytest.fixture(scope='module')
def broken(tmp_path_factory):
  root = tmp_path_factory.mktemp('broken')
  return str(root), helpers.write_broken_media(str(root))


def test_every_bad_media_file_raises_its_reason(broken):
  root, cases = broken
  for expected, name in cases.items():
    with pytest.raises(SampleError) as e:
      video.load_clip(os.path.join(root, name), 8, 'middle', min_frames=2)
    assert e.value.reason == expected.replace('_truncated', ''), (name, e.value)
    assert name in e.value.message


def test_empty_frame_folder(tmp_path):
  (tmp_path / 'empty').mkdir()
  with pytest.raises(SampleError) as e:
    video.probe(str(tmp_path / 'empty'))
  assert e.value.reason == 'empty_file'


def test_one_frame_video_loads_when_allowed(broken):
  root, cases = broken
  clip = video.load_clip(os.path.join(root, cases['too_few_frames']), 4, 'middle', min_frames=1)
  np.testing.assert_array_equal(clip.indices, [0])  # chat / QA sampling takes what there is, no repeats
  clip = video.load_clip(os.path.join(root, cases['too_few_frames']), 4, 'even', min_frames=1)
  np.testing.assert_array_equal(clip.indices, [0, 0, 0, 0])
  assert clip.num_real_frames == 1


def test_sample_error_reasons_are_checked():
  with pytest.raises(ValueError, match='unknown skip reason'):
    SampleError('no_such_reason', 'x')
