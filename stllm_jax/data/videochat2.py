"""Where the VideoChat2 instruction datasets of the released ST-LLM recipes lie under one data root.

The released trainer names each dataset's annotation file and video directory in its registry
(stllm/datasets/datasets/instruction_data.py, `available_corpus`): the annotation files under the VideoChat2-IT
tree (the Hugging Face dataset OpenGVLab/VideoChat2-IT), the videos in one directory per source, which it leaves
as placeholders ('your_data_path/WebVid2M', ...). Here both lie under one root, with the registry's names:

    ROOT/VideoChat2-IT/video/<task>/<dataset>/<file>.json    annotations (row["video"] is relative to ...)
    ROOT/videos/<source>/                                    ... that dataset's video directory

Two exceptions to the registry's names: it gives Kinetics-710 no video directory (its rows' paths are used as
they are written), here they are read under videos/k710; and ST-LLM's videochat1 and videochatgpt annotations
(train_flat.json, train_full_flat.json) are the authors' flattened versions of VideoChat2's, published apart
from VideoChat2-IT (ST-LLM's trainval.md).
"""

from __future__ import annotations

import os
from typing import Sequence

import ml_collections

from stllm_jax.data import pipeline

ANNOTATIONS = 'VideoChat2-IT'  # the annotation tree, under the root
VIDEOS = 'videos'  # the video directories, under the root

# dataset -> (annotation file under ROOT/VideoChat2-IT, video directory under ROOT/videos)
LAYOUT = {
    'caption_videochat': ('video/caption/videochat/train.json', 'WebVid10M'),
    'caption_videochatgpt': ('video/conversation/videochatgpt/train_full_flat.json', 'ANet/ANet_320p_fps30'),
    'caption_webvid': ('video/caption/webvid/train.json', 'WebVid2M'),
    'classification_k710': ('video/classification/k710/train.json', 'k710'),
    'classification_ssv2': ('video/classification/ssv2/train.json', 'video_pub/ssv2_video'),
    'conversation_videochat1': ('video/conversation/videochat1/train_flat.json', 'WebVid10M'),
    'reasoning_clevrer_mc': ('video/reasoning/clevrer_mc/train.json', 'clevrer/video_train'),
    'reasoning_clevrer_qa': ('video/reasoning/clevrer_qa/train.json', 'clevrer/video_train'),
    'reasoning_next_qa': ('video/reasoning/next_qa/train.json', 'nextqa'),
    'vqa_webvid_qa': ('video/vqa/webvid_qa/train.json', 'WebVid2M'),
}


def dataset_entries(root: str, names: Sequence[str], num_frames: int) -> ml_collections.ConfigDict:
  """`config.data.datasets` for the datasets `names` under `root`: one pipeline.dataset_entry each."""
  unknown = [name for name in names if name not in LAYOUT]
  if unknown:
    raise ValueError(f'no VideoChat2 layout for {unknown}; known datasets: {", ".join(LAYOUT)}')
  entries = ml_collections.ConfigDict()
  for name in names:
    annotation, videos = LAYOUT[name]
    entries[name] = pipeline.dataset_entry(os.path.join(root, ANNOTATIONS, annotation),
                                           os.path.join(root, VIDEOS, videos), num_frames=num_frames)
  return entries
