"""Data benchmark: decoded + preprocessed training videos per second, per worker and for N workers.

    python -m stllm_jax.benchmark.data_bench [--videos 8] [--seconds 60] [--width 640 --height 360 --fps 30]
                                                [--gop 250] [--frames 16] [--size 224] [--workers 1,2] [--batches 4]

1. writes `--videos` H.264 mp4 files of `--seconds` each (a textured scene panning under a moving box,
   x264 `veryfast`, keyframe interval `--gop`) into `--dir` (kept and reused between runs);
2. times one process loading training samples directly (probe + seek/decode 16 `rand` frames, then the
   shared RandomResizedCrop to 224, uint8: the model normalises on the device), split into decode and
   transform, in wall-clock and in CPU time (the CPU figure is what one worker on an idle core would reach);
3. runs the real training iterator (grain, `rand` sampling, batches of `--batch-size`) with 0 workers
   (decoding in the main process: the per-worker rate) and with each `--workers` count, timing batches
   after the first one (worker start-up excluded).

It prints videos/s and how many workers the original recipe's consumption needs: 128 videos per step in
about 3.5 s on one 8-GPU node = about 37 videos/s (`--target`). The worker estimate assumes one CPU core
per worker; on a machine with fewer cores than workers, the N-worker numbers flatten at the core count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import av
import numpy as np
from tqdm import tqdm

from stllm_jax.data import pipeline, transforms, video
from stllm_jax.demo import tiny_tokenizers

RECIPE_VIDEOS_PER_S = 128 / 3.5


def scene_frame(texture: np.ndarray, t: int, height: int, width: int) -> np.ndarray:
  """uint8 [H, W, 3]: the texture panned by 2 px per frame, with a red box on a sine path."""
  offset = (2 * t) % width
  frame = texture[:height, offset:offset + width].copy()
  y = int(height / 2 + 0.3 * height * np.sin(t / 20))
  x = (3 * t) % max(width - 40, 1)
  frame[max(0, y - 20):y + 20, x:x + 40] = (230, 30, 30)
  return frame


def write_long_video(path: str, seconds: float, width: int, height: int, fps: int, gop: int, seed: int) -> None:
  rng = np.random.default_rng(seed)
  cells = (rng.random((height // 8 + 2, width // 8 + 2, 3)) * 255).astype(np.uint8)
  texture = np.tile(cells.repeat(8, 0).repeat(8, 1), (1, 2, 1))
  container = av.open(path, mode='w')
  stream = container.add_stream('libx264', rate=fps, options={'preset': 'veryfast', 'crf': '23', 'g': str(gop)})
  stream.width, stream.height, stream.pix_fmt = width, height, 'yuv420p'
  for t in range(int(round(seconds * fps))):
    for packet in stream.encode(av.VideoFrame.from_ndarray(scene_frame(texture, t, height, width), format='rgb24')):
      container.mux(packet)
  for packet in stream.encode():
    container.mux(packet)
  container.close()


def make_videos(directory: str, count: int, seconds: float, width: int, height: int, fps: int, gop: int) -> list[str]:
  """The benchmark videos (written once per setting, then reused)."""
  tag = f'{seconds:g}s_{width}x{height}_{fps}fps_g{gop}'
  os.makedirs(os.path.join(directory, 'videos'), exist_ok=True)
  names = [f'{tag}_{n:03d}.mp4' for n in range(count)]
  missing = [n for n, name in enumerate(names) if not os.path.isfile(os.path.join(directory, 'videos', name))]
  for n in tqdm(missing, desc=f'writing {len(missing)} videos of {seconds:g} s', disable=not missing):
    partial = os.path.join(directory, 'videos', names[n] + '.partial.mp4')
    write_long_video(partial, seconds, width, height, fps, gop, seed=n)
    os.replace(partial, os.path.join(directory, 'videos', names[n]))
  return names


def data_config(directory: str, names: list[str], frames: int, size: int, batch_size: int, workers: int):
  rows = [dict(video=name, QA=[dict(i='Watch the video.', q='What moves across the scene?',
                                    a='A red box moves across a textured scene.')]) for name in names]
  annotation = os.path.join(directory, 'annotations.json')
  with open(annotation, 'w', encoding='utf-8') as f:
    json.dump(rows, f)
  corpus = [rows[0]['QA'][0]['i'], rows[0]['QA'][0]['q'], rows[0]['QA'][0]['a']]
  config = pipeline.default_config()
  config.datasets.bench = pipeline.dataset_entry(annotation, os.path.join(directory, 'videos'), num_frames=frames)
  config.llm_tokenizer = tiny_tokenizers.build_llm_tokenizer(os.path.join(directory, 'tokenizers', 'llm'), corpus)
  config.qformer_tokenizer = tiny_tokenizers.build_qformer_tokenizer(os.path.join(directory, 'tokenizers', 'qformer'),
                                                                     corpus)
  config.update(image_size=size, batch_size=batch_size, num_workers=workers)
  return config


def time_direct(config, names: list[str], repeats: int) -> dict[str, float]:
  """Seconds per video for decoding and for the transform, in this process."""
  cfg = pipeline.parse_config(config)
  spec = cfg.datasets[0]
  decode_s = transform_s = 0.0
  count = 0
  cpu_began = time.process_time()
  for repeat in range(repeats):
    for n, name in enumerate(names):
      rng = np.random.default_rng([repeat, n])
      began = time.perf_counter()
      clip = video.load_clip(os.path.join(spec.media_root, name), spec.num_frames, 'rand', rng=rng,
                             threads=cfg.decode_threads)
      decoded = time.perf_counter()
      transforms.train_crop(clip.frames, rng, cfg.image_size, cfg.crop_scale)
      transform_s += time.perf_counter() - decoded
      decode_s += decoded - began
      count += 1
  cpu_s = (time.process_time() - cpu_began) / count
  media = video.probe(os.path.join(spec.media_root, names[0]))
  return dict(decode_s=decode_s / count, transform_s=transform_s / count, cpu_s=cpu_s,
              videos_per_s=count / (decode_s + transform_s), videos_per_cpu_s=1 / cpu_s,
              frames_per_video=media.num_frames,
              keyframes_per_video=len(media.keyframe_pts))


def time_pipeline(config, num_batches: int) -> float:
  """Videos per second of the training iterator, after its first batch."""
  with pipeline.make_train_iterator(config, 0, 1) as iterator:
    next(iterator)  # start-up: worker processes, imports, tokenizers
    began = time.perf_counter()
    for _ in tqdm(range(num_batches), desc=f'{config.num_workers} workers', leave=False):
      next(iterator)
    return num_batches * config.batch_size / (time.perf_counter() - began)


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--dir', default=os.path.join(os.environ.get('TMPDIR', '/tmp'), 'stllm_data_benchmark'))
  parser.add_argument('--videos', type=int, default=8)
  parser.add_argument('--seconds', type=float, default=60.0)
  parser.add_argument('--width', type=int, default=640)
  parser.add_argument('--height', type=int, default=360)
  parser.add_argument('--fps', type=int, default=30)
  parser.add_argument('--gop', type=int, default=250, help='keyframe interval (x264 default 250)')
  parser.add_argument('--frames', type=int, default=16)
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--batch-size', type=int, default=8)
  parser.add_argument('--batches', type=int, default=4, help='timed batches per worker count')
  parser.add_argument('--workers', default='1,2', help='comma-separated worker counts to time')
  parser.add_argument('--target', type=float, default=RECIPE_VIDEOS_PER_S, help='videos/s to feed')
  args = parser.parse_args(argv)

  names = make_videos(args.dir, args.videos, args.seconds, args.width, args.height, args.fps, args.gop)
  config = data_config(args.dir, names, args.frames, args.size, args.batch_size, workers=0)
  direct = time_direct(config, names, repeats=1)
  results = dict(setting=dict(vars(args), cpu_count=os.cpu_count()), direct=direct,
                 per_worker_videos_per_s=time_pipeline(config, args.batches), workers={})
  for count in [int(w) for w in args.workers.split(',') if w]:
    config.num_workers = count
    results['workers'][count] = time_pipeline(config, args.batches)
  per_worker = results['per_worker_videos_per_s']
  results['workers_for_target'] = math.ceil(args.target / per_worker)

  print(f'{args.videos} videos of {args.seconds:g} s, {args.width}x{args.height} at {args.fps} fps, keyframe every '
        f'{args.gop} frames ({direct["frames_per_video"]} frames, {direct["keyframes_per_video"]} keyframes each); '
        f'{args.frames} rand frames -> {args.size}x{args.size}; {os.cpu_count()} CPU cores')
  print(f'  one process, direct: decode {direct["decode_s"] * 1e3:.0f} ms + transform '
        f'{direct["transform_s"] * 1e3:.0f} ms per video = {direct["videos_per_s"]:.2f} videos/s wall-clock; '
        f'{direct["cpu_s"] * 1e3:.0f} ms of CPU per video = {direct["videos_per_cpu_s"]:.2f} videos per CPU-second')
  print(f'  training iterator, 0 workers (per worker): {per_worker:.2f} videos/s')
  for count, rate in results['workers'].items():
    print(f'  training iterator, {count} worker processes: {rate:.2f} videos/s')
  print(f'  {args.target:.1f} videos/s (the original recipe on one 8-GPU node) needs about '
        f'{results["workers_for_target"]} workers at the per-worker rate (one core each)')
  with open(os.path.join(args.dir, 'benchmark.json'), 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=1)
  return results


if __name__ == '__main__':
  main()
