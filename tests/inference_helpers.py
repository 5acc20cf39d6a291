"""A tiny random ST-LLM checkpoint and an MVBench-layout set with every media kind, built once per test process.

    build() -> Paths(root, checkpoint, mvbench, video)
    root/synthetic/                 `python -m stllm_jax.demo.synthetic` output (2 tasks of mp4 videos)
    root/synthetic/mvbench/         + a GIF task, a frame-folder task with start/end, an mp4 task with start/end,
                                      and a task whose video is missing; tasks.json lists them all
    root/checkpoint/                configs/tiny.py model, random weights, the synthetic set's tokenizers
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import tempfile

import jax

from data_helpers import decode_all, write_frame_folder, write_video
from stllm_jax import checkpoints, configlib
from stllm_jax.demo import synthetic
from stllm_jax.models import stllm

TINY_CONFIG = os.path.join(os.path.dirname(__file__), '..', 'configs', 'tiny.py')
EXTRA_TASKS = {  # name -> (data_type, bound, media folder)
    'Action Antonym (GIF)': ('gif', False, 'video/gif'),
    'Episodic Reasoning (frames)': ('frame', True, 'video/frames'),
    'Action Sequence (bounds)': ('video', True, 'video/synthetic'),
    'Unreadable': ('video', False, 'video/missing'),
}


@dataclasses.dataclass(frozen=True)
class Paths:
  root: str
  checkpoint: str
  mvbench: str
  video: str  # an mp4 of the synthetic set


def _entry(fact: dict, video: str, **bounds) -> dict:
  return dict(video=video, question=f'Which direction does the {fact["colour"]} {fact["shape"]} move?',
              candidates=['left', 'right', 'up', 'down'], answer=fact['direction'], **bounds)


def extend_mvbench(root: str) -> None:
  """Adds the GIF, frame-folder, bounded and unreadable tasks to the synthetic MVBench copy under `root`."""
  mvbench = os.path.join(root, 'mvbench')
  facts = synthetic.read_facts(root, 'test')[:3]
  entries = {name: [] for name in EXTRA_TASKS}
  for fact in facts:
    stem = os.path.splitext(fact['video'])[0]
    frames = decode_all(os.path.join(root, 'videos', fact['video']))  # [16, 64, 64, 3] at 8 fps
    os.makedirs(os.path.join(mvbench, 'video', 'gif'), exist_ok=True)
    write_video(os.path.join(mvbench, 'video', 'gif', stem + '.gif'), frames, fps=8, codec='gif')
    write_frame_folder(os.path.join(mvbench, 'video', 'frames', stem), frames)  # read at 3 fps: 5.3 s
    entries['Action Antonym (GIF)'].append(_entry(fact, stem + '.gif'))
    entries['Episodic Reasoning (frames)'].append(_entry(fact, stem, start=1.0, end=4.5))
    entries['Action Sequence (bounds)'].append(_entry(fact, fact['video'], start=0.5, end=1.5))
  entries['Unreadable'] = [_entry(facts[0], 'does_not_exist.mp4')]
  with open(os.path.join(mvbench, 'tasks.json')) as f:
    table = json.load(f)
  for name, (data_type, bound, prefix) in EXTRA_TASKS.items():
    json_name = f'json/{name.split(" (")[0].lower().replace(" ", "_")}.json'
    with open(os.path.join(mvbench, json_name), 'w') as f:
      json.dump(entries[name], f)
    table[name] = dict(json=json_name, prefix=prefix, data_type=data_type, bound=bound)
  with open(os.path.join(mvbench, 'tasks.json'), 'w') as f:
    json.dump(table, f, indent=1)


def save_tiny_checkpoint(path: str, tokenizers: str, seed: int = 0, adapter_depth: int = 0) -> str:
  """configs/tiny.py's model with random weights (`adapter_depth` > 0: a QA-style model with a BT-Adapter)."""
  model = configlib.load_config_file(TINY_CONFIG).model
  model.vision.bt_adapter.depth = adapter_depth
  params = stllm.init_params(model, jax.random.key(seed))
  checkpoints.save_weights(path, params, model.to_dict())
  shutil.copytree(tokenizers, os.path.join(path, checkpoints.TOKENIZERS_DIR))
  return path


@functools.lru_cache(maxsize=1)
def build() -> Paths:
  root = tempfile.mkdtemp(prefix='stllm_jax_inference_')
  data = os.path.join(root, 'synthetic')
  synthetic.build(data, seed=0, train_pairs=1, test_pairs=3)
  extend_mvbench(data)
  checkpoint = save_tiny_checkpoint(os.path.join(root, 'checkpoint'), os.path.join(data, 'tokenizers'))
  return Paths(root, checkpoint, os.path.join(data, 'mvbench'), os.path.join(data, 'videos', 'test_0000_a.mp4'))
