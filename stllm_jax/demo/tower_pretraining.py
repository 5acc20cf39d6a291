"""Pretraining of the visual towers for a model that starts from nothing: the demo's stand-in for EVA-CLIP and
InstructBLIP pretraining.

ST-LLM starts from pretrained towers (EVA-ViT-g, Q-Former, projection) and freezes the ViT and the Q-Former;
only the LLM side learns the video task. A tiny model trained from scratch with the LM loss alone does not
learn where the object is: its LLM reads direction at once from visual tokens that encode position (measured
with hand-made position tokens), and its towers learn position at once from a direct signal, but through a
random LLM the answer loss reaches the towers too weakly. So the demo first gives its towers what
pretraining gives the real ones: on single frames of the training videos, each with one of the Q-Former
texts its questions are asked with, one linear head shared by the frame's K visual tokens (encode_frames:
ViT, ln_vision, Q-Former, projection) regresses the shape's centre and classifies its shape and colour from
each token alone, with the labels the synthetic generator wrote (train_facts.json).

    frames uint8 [N, T, S, S, 3] --one random frame per sample--> encode_frames [B, 1, K, D]
      --Dense, per token--> centre (y, x) in [-1, 1], shape logits, colour logits   [B, K, ...]

Reading each token alone matters for dynamic masking, which keeps a random subset of the T*K tokens: a
frame whose position is spread over its K tokens jointly loses it when some of them are dropped (measured:
with a head on the K tokens together, the masked model stayed at chance on direction after 800 steps; per
token, 39% at 800 steps and 81% at 1,600). The texts must not give the labels away: the demo's
`tower_texts` names every shape in turn.

`ensure_towers` writes the result as a weights directory (checkpoints.save_weights) holding the whole
model: the pretrained towers and the seeded initialisation of everything else, for `config.init.checkpoint`.
It reuses a directory written with the same settings.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from stllm_jax import checkpoints, configlib
from stllm_jax.data import conversation, transforms, video
from stllm_jax.demo import synthetic
from stllm_jax.errors import UserError
from stllm_jax.metrics import progress_bar
from stllm_jax.models import stllm

TOWERS = ('vision', 'ln_vision', 'qformer', 'projection')  # the params encode_frames uses: what this trains
SOURCE = 'tower pretraining'  # conversion.json 'source' of the weights directories written here
VERSION = 2  # of what pretraining does (2: the head reads each visual token alone); part of the settings key


@dataclasses.dataclass(frozen=True)
class TowerPretrainConfig:
  """`config.demo.towers`."""
  steps: int = 3000  # 0 = no pretraining: the towers keep their random initialisation
  batch_size: int = 32  # single frames per step
  lr: float = 1e-3
  warmup_fraction: float = 0.03  # linear warmup, then cosine decay to 0
  position_weight: float = 10.0  # weight of the centre's squared error (coordinates in [-1, 1]) vs the two CEs
  seed: int = 0  # frame sampling and the head's initialisation


@dataclasses.dataclass(frozen=True)
class FrameSet:
  """Every frame of a split's videos with its labels."""
  frames: np.ndarray  # uint8 [N, T, S, S, 3], the evaluation transform's resize + centre crop
  qformer_input_ids: np.ndarray  # int32 [N, Q, L]: the Q-Former texts of the Q questions asked about each video
  qformer_attention_mask: np.ndarray  # int32 [N, Q, L]
  centres: np.ndarray  # float32 [N, T, 2]: (y, x) in [-1, 1] of the frame
  shapes: np.ndarray  # int32 [N]: index into synthetic.SHAPES
  colours: np.ndarray  # int32 [N]: index into synthetic.COLOURS


def load_frame_set(data_dir: str, facts: Sequence[Mapping[str, Any]], image_size: int,
                   qformer_texts: Callable[[Mapping[str, Any]], Sequence[str]], qformer_tokenizer: Any,
                   qformer_length: int, progress: Callable[[Any], Any] = lambda items: items) -> FrameSet:
  """Decodes every frame of the videos in `facts` (from data_dir/videos) with their labels, and tokenises
  the Q-Former texts `qformer_texts(fact)` to pair with them (they must not name the labels)."""
  frames, centres, ids = [], [], []
  for fact in progress(facts):
    ids.append([conversation.encode_qformer_text(qformer_tokenizer, text, qformer_length)[0]
                for text in qformer_texts(fact)])
    clip = video.load_clip(os.path.join(data_dir, 'videos', fact['video']), len(fact['centres']), 'even')
    if clip.num_real_frames != len(fact['centres']):
      raise ValueError(f'{fact["video"]} has {clip.num_real_frames} frames; its facts give '
                       f'{len(fact["centres"])} centres (rewrite the set)')
    frames.append(transforms.eval_resize_crop(clip.frames, image_size))
    size = clip.frames.shape[1]
    centres.append(2.0 * np.asarray(fact['centres'], np.float32) / size - 1.0)
  text_ids = np.zeros((len(ids), max(len(v) for v in ids), qformer_length), np.int32)  # [N, Q, L]
  text_mask = np.zeros_like(text_ids)
  for n, texts in enumerate(ids):
    for q, text in enumerate(texts):
      text_ids[n, q, :len(text)], text_mask[n, q, :len(text)] = text, 1
    text_ids[n, len(texts):], text_mask[n, len(texts):] = text_ids[n, 0], text_mask[n, 0]
  return FrameSet(np.stack(frames), text_ids, text_mask, np.stack(centres),
                  np.asarray([synthetic.SHAPES.index(f['shape']) for f in facts], np.int32),
                  np.asarray([list(synthetic.COLOURS).index(f['colour']) for f in facts], np.int32))


def sample_frames(frame_set: FrameSet, rng: np.random.Generator, batch_size: int) -> dict[str, np.ndarray]:
  """Random frames, each with one of its video's Q-Former texts: frames uint8 [B, 1, S, S, 3] (the model
  normalises them), qformer_input_ids / qformer_attention_mask [B, L] (named as in the model's batch),
  centres [B, 2], shapes [B], colours [B]."""
  n, t = frame_set.frames.shape[:2]
  videos = rng.integers(n, size=batch_size)
  times = rng.integers(t, size=batch_size)
  texts = rng.integers(frame_set.qformer_input_ids.shape[1], size=batch_size)
  return dict(frames=frame_set.frames[videos, times][:, None],
              qformer_input_ids=frame_set.qformer_input_ids[videos, texts],
              qformer_attention_mask=frame_set.qformer_attention_mask[videos, texts],
              centres=frame_set.centres[videos, times], shapes=frame_set.shapes[videos],
              colours=frame_set.colours[videos])


class FrameHead(nn.Module):
  """One linear head shared by a frame's K visual tokens, read from each token alone: centre (2), shape
  logits and colour logits per token, [B, K, ...]."""

  @nn.compact
  def __call__(self, frame_tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    out = nn.Dense(2 + len(synthetic.SHAPES) + len(synthetic.COLOURS))(frame_tokens.astype(jnp.float32))
    return out[..., :2], out[..., 2:2 + len(synthetic.SHAPES)], out[..., 2 + len(synthetic.SHAPES):]


def frame_outputs(model: stllm.STLLM, params: Mapping[str, Any], batch: Mapping[str, jax.Array]):
  """encode_frames on single frames [B, 1, S, S, 3] with their Q-Former texts, then the head."""
  tokens = model.apply({'params': params['model']}, batch['frames'], batch['qformer_input_ids'],
                       batch['qformer_attention_mask'], method='encode_frames')  # [B, 1, K, D]
  return FrameHead().apply({'params': params['head']}, tokens[:, 0])


def losses(model: stllm.STLLM, cfg: TowerPretrainConfig, params: Mapping[str, Any],
           batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
  centre, shape_logits, colour_logits = frame_outputs(model, params, batch)  # [B, K, ...]
  position = jnp.mean(jnp.sum(jnp.square(centre - batch['centres'][:, None]), axis=-1))
  shape = optax.softmax_cross_entropy_with_integer_labels(shape_logits, batch['shapes'][:, None]).mean()
  colour = optax.softmax_cross_entropy_with_integer_labels(colour_logits, batch['colours'][:, None]).mean()
  return cfg.position_weight * position + shape + colour, dict(position=position, shape=shape, colour=colour)


def evaluate(model: stllm.STLLM, params: Mapping[str, Any], frame_set: FrameSet, batch_size: int) -> dict:
  """On every frame of `frame_set`, read from each of its K visual tokens alone: shape and colour accuracy,
  and the mean centre error in pixels. Frame f of a video is given the video's Q-Former text f mod Q, so
  every text is used."""
  predict = jax.jit(lambda p, b: frame_outputs(model, p, b))
  n, t = frame_set.frames.shape[:2]
  size = frame_set.frames.shape[2]
  flat = frame_set.frames.reshape(n * t, *frame_set.frames.shape[2:])
  pad = lambda x: np.concatenate([x, np.repeat(x[-1:], batch_size - len(x), 0)])  # one compiled program
  errors, shape_ok, colour_ok = [], [], []
  for first in range(0, n * t, batch_size):
    chunk = flat[first:first + batch_size]
    rows = np.arange(first, first + len(chunk))  # flat frame indices
    video_index, text_index = rows // t, rows % frame_set.qformer_input_ids.shape[1]
    batch = dict(frames=pad(chunk)[:, None],
                 qformer_input_ids=pad(frame_set.qformer_input_ids[video_index, text_index]),
                 qformer_attention_mask=pad(frame_set.qformer_attention_mask[video_index, text_index]))
    centre, shape_logits, colour_logits = (np.asarray(x)[:len(chunk)] for x in predict(params, batch))
    truth = frame_set.centres.reshape(-1, 2)[rows]
    errors.append(np.linalg.norm(centre - truth[:, None], axis=-1).ravel())  # every token's reading
    shape_ok.append((shape_logits.argmax(-1) == frame_set.shapes[video_index, None]).ravel())
    colour_ok.append((colour_logits.argmax(-1) == frame_set.colours[video_index, None]).ravel())
  return dict(shape_accuracy=float(np.mean(np.concatenate(shape_ok))),
              colour_accuracy=float(np.mean(np.concatenate(colour_ok))),
              centre_error_px=float(np.mean(np.concatenate(errors)) * size / 2), frames=int(n * t))


def pretrain(config: Any, cfg: TowerPretrainConfig, train_set: FrameSet, log: Callable[[str], None] = print
             ) -> tuple[dict, dict]:
  """(every model param: the pretrained towers and the seeded rest; the head's params) after cfg.steps steps."""
  model_cfg = stllm.model_config(config.model)
  model = stllm.STLLM(model_cfg)
  params = stllm.init_params(model_cfg, jax.random.key(config.seed))
  towers = {name: params[name] for name in TOWERS}
  frame_tokens = jnp.zeros((1, model_cfg.qformer.num_query_tokens, model_cfg.llm.width))  # [1, K, D]
  head = FrameHead().init(jax.random.key(cfg.seed), frame_tokens)['params']
  trained = dict(model=towers, head=head)
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, int(cfg.warmup_fraction * cfg.steps), max(cfg.steps, 2))
  tx = optax.adam(schedule)
  opt_state = tx.init(trained)

  @jax.jit
  def step(trained, opt_state, batch):
    (loss, parts), grads = jax.value_and_grad(lambda p: losses(model, cfg, p, batch), has_aux=True)(trained)
    updates, opt_state = tx.update(grads, opt_state, trained)
    return optax.apply_updates(trained, updates), opt_state, dict(parts, loss=loss)

  rng = np.random.default_rng(cfg.seed)
  every = max(cfg.steps // 5, 1)
  with progress_bar(total=cfg.steps, desc='pretrain towers', unit='step') as progress:
    for n in range(1, cfg.steps + 1):
      trained, opt_state, metrics = step(trained, opt_state, sample_frames(train_set, rng, cfg.batch_size))
      progress.update()
      if n % every == 0 or n == cfg.steps:
        metrics = {k: float(v) for k, v in metrics.items()}
        log(f'  towers step {n}: loss {metrics["loss"]:.4f} (centre squared error {metrics["position"]:.4f}, '
            f'shape CE {metrics["shape"]:.4f}, colour CE {metrics["colour"]:.4f})')
  return dict(params, **trained['model']), trained['head']


def ensure_towers(config: Any, cfg: TowerPretrainConfig, data_dir: str, out_dir: str,
                  qformer_texts: Callable[[Mapping[str, Any]], Sequence[str]],
                  log: Callable[[str], None] = print) -> dict:
  """The weights directory `out_dir` for config.init.checkpoint, pretrained now unless it already holds
  weights made with these settings; returns its record (settings, held-out accuracies, seconds).
  `qformer_texts(fact)`: the Q-Former texts to pair with a video's frames (they must not name its labels)."""
  settings = dict(version=VERSION, towers=dataclasses.asdict(cfg), seed=config.seed,
                  model=configlib.to_dict(config.model), data=synthetic.read_info(data_dir))
  if checkpoints.is_weights_dir(out_dir):
    record = checkpoints.conversion_info(out_dir)
    if record.get('settings') == json.loads(json.dumps(settings)):
      return record
    raise UserError(f'{out_dir} holds towers pretrained with other settings (model, data, config.demo.towers or '
                    'an older version of the pretraining), and the models next to it were trained on them: remove '
                    'the workdir, or choose another --workdir, to pretrain and train anew')
  began = time.perf_counter()
  image_size = config.model.vision.image_size
  tokenizer = conversation.load_qformer_tokenizer(config.data.qformer_tokenizer)
  load = lambda name: load_frame_set(
      data_dir, synthetic.read_facts(data_dir, name), image_size, qformer_texts, tokenizer,
      config.data.qformer_max_length,
      progress=lambda items: progress_bar(items, desc=f'decode {name} videos', unit='video'))
  train_set, test_set = load('train'), load('test')
  log(f'pretraining the visual towers on single frames of {len(train_set.shapes)} training videos '
      f'({cfg.steps} steps x {cfg.batch_size} frames): centre, shape and colour read from each visual token')
  params, head = pretrain(config, cfg, train_set, log)
  model = stllm.STLLM(stllm.model_config(config.model))
  held_out = evaluate(model, dict(model=params, head=head), test_set, cfg.batch_size)
  seconds = time.perf_counter() - began
  log(f'  towers on the {held_out["frames"]} held-out frames: shape {100 * held_out["shape_accuracy"]:.1f}%, '
      f'colour {100 * held_out["colour_accuracy"]:.1f}%, centre error {held_out["centre_error_px"]:.2f} px '
      f'({seconds:.0f} s)')
  record = dict(source=SOURCE, settings=settings, held_out=held_out, seconds=seconds)
  checkpoints.save_weights(out_dir, jax.device_get(params), configlib.to_dict(config.model), conversion=record)
  return record
