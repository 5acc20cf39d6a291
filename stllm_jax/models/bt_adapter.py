"""The BT-Adapter: a trainable spatio-temporal branch beside the frozen EVA-ViT (ST-LLM's QA / MVBench model).

Released source: `stllm/models/eva_btadapter.py` (TencentARC/ST-LLM; vision model `eva_btadapter_g`). The
ViT runs unchanged on every frame; the branch reads the outputs of its last `depth` blocks (36, 37, 38 of
39 for depth 3) and mixes the T frames of each video. With k = 0 .. depth-1 and block_k the output of ViT
block (vit_depth - depth + k), each [B, T, 1+P, W] (CLS first, then P patches):

  k = 0:   cls     = (mean_t block_0's CLS + (cls_token + pos_embed[0])) / 2              [B, 1, W]
           patches = block_0's patches + pos_embed[1:] + frame_position[t]                [B, T, P, W]
  k >= 1:  cls += mean_t block_k's CLS;  patches += block_k's patches
  temporal layer k (the CLS is untouched): each patch attends over its own T frames,
           patches += temporal_fc(DropPath(Attn(norm1(patches))))
  spatial layer k (an EVA block, LayerNorm eps 1e-5): each frame attends over [cls ; its P patches],
           a = DropPath(Attn(norm1([cls ; frame patches])))                                [B, T, 1+P, W]
           cls += mean_t a's CLS rows;  patches += a's patch rows
           z = [cls ; patches];  z += MLP(norm2(z));  z = DropPath(z)    (drop path on the whole z)
  output of frame t: (block_{depth-1} + [cls ; frame t's patches]) / 2                     [B, T, 1+P, W]

which replaces the ViT's output before ln_vision and the Q-Former. Drop-path rates grow linearly from 0 to
`drop_path` over the layer pairs (0, 0.05, 0.1); one draw covers one (video, patch) in a temporal layer, one
(video, frame) on a spatial layer's attention branch and one video on its output z, as the released
layouts make it. Drop path is active only with deterministic=False and a 'dropout' rng.

Parameters (ours, under the model's `bt_adapter/`; the released names, under `visual_encoder.`):
  cls_token [1, 1, W]                        BTAdapter_cls
  frame_position [max_frames, W]             BTAdapter_position.weight
  temporal_{k}/norm1/{scale,bias}            BTAdapter_T.{k}.norm1.{weight,bias}
  temporal_{k}/attn/qkv/kernel [W,3,H,hd]    BTAdapter_T.{k}.attn.qkv.weight [3W, W] (transposed, split)
  temporal_{k}/attn/{q,v}_bias [H, hd]       BTAdapter_T.{k}.attn.{q,v}_bias [W]
  temporal_{k}/attn/out/{kernel,bias}        BTAdapter_T.{k}.attn.proj.{weight,bias}
  temporal_{k}/temporal_fc/{kernel,bias}     BTAdapter_T.{k}.temporal_fc.{weight,bias}
  spatial_{k}/{norm1,norm2}/{scale,bias}     BTAdapter_S.{k}.{norm1,norm2}.{weight,bias}
  spatial_{k}/attn/{qkv,q_bias,v_bias,out}   BTAdapter_S.{k}.attn.{qkv.weight,q_bias,v_bias,proj.*}
  spatial_{k}/{fc1,fc2}/{kernel,bias}        BTAdapter_S.{k}.mlp.{fc1,fc2}.{weight,bias}
The adapter is trained while the ViT stays frozen, so its params sit beside `vision/`, not under it.
`init_from_vit` gives the released starting point (spatial layers = copies of the ViT's last blocks).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from stllm_jax import configlib
from stllm_jax.models import layers
from stllm_jax.models.eva_vit import VisionAttention, VisionBlock, VisionConfig
from stllm_jax.models.layers import Array, Dtype


def drop_path(x: Array, rate: float, rng: Array, sample_axes: Sequence[int]) -> Array:
  """Stochastic depth: each sample (an index over `sample_axes` of x) is zeroed with probability `rate`,
  the kept ones are scaled by 1 / (1 - rate)."""
  shape = tuple(d if axis in sample_axes else 1 for axis, d in enumerate(x.shape))
  keep = jax.random.bernoulli(rng, 1.0 - rate, shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def _maybe_drop_path(module: nn.Module, x: Array, rate: float, deterministic: bool) -> Array:
  """`drop_path` over the leading axis of x, in training mode only."""
  if deterministic or rate == 0.0:
    return x
  return drop_path(x, rate, module.make_rng('dropout'), (0,))


class TemporalLayer(nn.Module):
  """Each patch attends over its T frames; the result goes through the zero-initialised `temporal_fc`."""
  config: VisionConfig
  dtype: Dtype
  attention_impl: str | None = None
  drop_path_rate: float = 0.0

  @nn.compact
  def __call__(self, patches: Array, deterministic: bool) -> Array:  # [B, T, P, W] -> [B, T, P, W]
    cfg = self.config
    pdt = layers.as_dtype(cfg.param_dtype)
    b, t, p, w = patches.shape
    per_patch = patches.transpose(0, 2, 1, 3).reshape(b * p, t, w)  # [B*P, T, W]: a patch over its frames
    h = layers.LayerNorm(cfg.bt_adapter.temporal_norm_eps, dtype=self.dtype, param_dtype=pdt, name='norm1')(per_patch)
    h = VisionAttention(cfg, self.dtype, self.attention_impl, name='attn')(h)  # [B*P, T, W]
    h = _maybe_drop_path(self, h, self.drop_path_rate, deterministic)  # a draw per (video, patch)
    # Output axis 'embed' like every projection into the residual stream. (With it on 'tensor' instead, jax
    # 0.10.2's SPMD partitioner on CPU computed wrong values for some batch shards of the following block.)
    h = layers.Dense(w, (None, 'embed'), dtype=self.dtype, param_dtype=pdt, kernel_init=nn.initializers.zeros,
                     name='temporal_fc')(h)  # [B*P, T, W]
    return patches + h.reshape(b, p, t, w).transpose(0, 2, 1, 3)


class SpatialLayer(VisionBlock):
  """An EVA block (same params and branches) run per frame over [cls ; that frame's patches]; the CLS
  outputs of the T frames are averaged back into the one branch CLS."""
  drop_path_rate: float = 0.0

  def __call__(self, cls: Array, patches: Array, deterministic: bool) -> tuple[Array, Array]:
    """cls [B, 1, W], patches [B, T, P, W] -> the same shapes."""
    b, t, p, w = patches.shape
    frames = jnp.concatenate([jnp.broadcast_to(cls[:, None], (b, t, 1, w)), patches], axis=2)  # [B, T, 1+P, W]
    h = self.attention(frames.reshape(b * t, 1 + p, w))  # [B*T, 1+P, W]
    h = _maybe_drop_path(self, h, self.drop_path_rate, deterministic).reshape(b, t, 1 + p, w)  # a draw per frame
    cls = cls + jnp.mean(h[:, :, :1], axis=1)  # [B, 1, W]
    patches = patches + h[:, :, 1:]  # [B, T, P, W]
    z = jnp.concatenate([cls, patches.reshape(b, t * p, w)], axis=1)  # [B, 1+T*P, W]
    z = z + self.mlp(z)
    z = _maybe_drop_path(self, z, self.drop_path_rate, deterministic)  # a draw per video, on the whole z
    return z[:, :1], z[:, 1:].reshape(b, t, p, w)


class BTAdapter(nn.Module):
  """(last `depth` ViT block outputs [depth, B, T, 1+P, W], the ViT's pos_embed [1, 1+P, W]) -> [B, T, 1+P, W]."""
  config: VisionConfig
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, last_blocks: Array, pos_embed: Array, deterministic: bool = True) -> Array:
    cfg = self.config
    adapter = cfg.bt_adapter
    pdt = layers.as_dtype(cfg.param_dtype)
    depth, b, t, _, w = last_blocks.shape
    if depth != adapter.depth:
      raise ValueError(f'the BT-Adapter takes the outputs of the last {adapter.depth} ViT blocks, got {depth}')
    if t > adapter.max_frames:
      raise ValueError(f'a video of {t} frames is longer than model.vision.bt_adapter.max_frames='
                       f'{adapter.max_frames}: the BT-Adapter has one frame-position row per frame. Sample at '
                       f'most {adapter.max_frames} frames per video.')
    cls_token = self.param('cls_token', layers.param_init(nn.initializers.zeros, (None, None, 'embed')),
                           (1, 1, w), pdt).astype(self.dtype)
    frame_position = self.param('frame_position', layers.param_init(nn.initializers.normal(1.0), (None, 'embed')),
                                (adapter.max_frames, w), pdt).astype(self.dtype)
    spatial_cfg = dataclasses.replace(cfg, layer_norm_eps=adapter.spatial_norm_eps)
    for k, rate in enumerate(adapter.drop_path_rates()):
      block = last_blocks[k]  # [B, T, 1+P, W]
      frame_cls = jnp.mean(block[:, :, :1], axis=1)  # [B, 1, W]
      if k == 0:
        cls = (frame_cls + (cls_token + pos_embed[:, :1])) / 2  # [B, 1, W]
        patches = block[:, :, 1:] + pos_embed[:, None, 1:] + frame_position[None, :t, None]  # [B, T, P, W]
      else:
        cls, patches = cls + frame_cls, patches + block[:, :, 1:]
      patches = TemporalLayer(cfg, self.dtype, self.attention_impl, rate, name=f'temporal_{k}')(patches, deterministic)
      cls, patches = SpatialLayer(spatial_cfg, self.dtype, self.attention_impl, rate,
                                  name=f'spatial_{k}')(cls, patches, deterministic)
    branch = jnp.concatenate([jnp.broadcast_to(cls[:, None], (b, t, 1, w)), patches], axis=2)  # [B, T, 1+P, W]
    return (last_blocks[-1] + branch) / 2


# ------------------------------------------------------------------------------- the released start point

def _vision_config(model_cfg: Any) -> VisionConfig:
  """`config.model` (ConfigDict, dict or STLLMConfig) -> its validated VisionConfig."""
  vision = model_cfg.vision if dataclasses.is_dataclass(model_cfg) else configlib.to_dict(model_cfg)['vision']
  cfg = configlib.from_dict(VisionConfig, vision, 'model.vision')
  cfg.validate('model.vision')
  return cfg


def _vit_block(vision_params: Any, index: int, scanned: bool) -> Any:
  """The params of ViT block `index`, from a scanned (stacked `layers`) or unrolled (`layers_{i}`) stack."""
  blocks = vision_params['blocks']
  if scanned:
    return jax.tree_util.tree_map(lambda a: a[index], blocks['layers'])
  return blocks[f'layers_{index}']


def _torch_linear_default(rng: Array, shape: tuple[int, ...], fan_in: int, dtype: Any) -> Array:
  """PyTorch's default Linear init (kaiming-uniform, a = sqrt(5)) for weight and bias: U(-1/sqrt(fan_in), +)."""
  bound = fan_in ** -0.5
  return jax.random.uniform(rng, shape, jnp.float32, -bound, bound).astype(dtype)


def init_from_vit(params: Any, model_cfg: Any, rng: Array) -> dict:
  """Full model params -> the same params with a fresh `bt_adapter`, as the released code starts one.

  Spatial layer k is a copy of ViT block (vit_depth - depth + k); temporal layers have norm1 (1, 0), q/v
  biases 0, `temporal_fc` 0 and PyTorch-default qkv/proj weights; the CLS is 0 and the frame-position
  table N(0, 1). Works for scanned and unrolled ViT params; `params` is not modified.
  """
  cfg = _vision_config(model_cfg)
  depth = cfg.bt_adapter.depth
  if not depth:
    raise ValueError('model.vision.bt_adapter.depth is 0: this model has no BT-Adapter to initialise')
  vision = params['vision']
  if ('layers' in vision['blocks']) != cfg.scan_layers:
    raise ValueError(f'model.vision.scan_layers={cfg.scan_layers} but the ViT params are '
                     f'{"scanned" if "layers" in vision["blocks"] else "unrolled"}')
  dtype = vision['pos_embed'].dtype
  w = cfg.width
  position_key, *layer_keys = jax.random.split(rng, depth + 1)
  frame_position = jax.random.normal(position_key, (cfg.bt_adapter.max_frames, w), jnp.float32)
  adapter = {'cls_token': jnp.zeros((1, 1, w), dtype), 'frame_position': frame_position.astype(dtype)}
  first = cfg.depth - depth
  for k, key in enumerate(layer_keys):
    block = _vit_block(vision, first + k, cfg.scan_layers)
    adapter[f'spatial_{k}'] = jax.tree_util.tree_map(jnp.array, block)  # a copy, not a view
    attn = block['attn']
    qkv_key, out_key, out_bias_key = jax.random.split(key, 3)
    adapter[f'temporal_{k}'] = {
        'norm1': {'scale': jnp.ones((w,), dtype), 'bias': jnp.zeros((w,), dtype)},
        'attn': {'qkv': {'kernel': _torch_linear_default(qkv_key, attn['qkv']['kernel'].shape, w, dtype)},
                 'out': {'kernel': _torch_linear_default(out_key, attn['out']['kernel'].shape, w, dtype),
                         'bias': _torch_linear_default(out_bias_key, attn['out']['bias'].shape, w, dtype)},
                 **{name: jnp.zeros_like(attn[name]) for name in ('q_bias', 'v_bias') if name in attn}},
        'temporal_fc': {'kernel': jnp.zeros((w, w), dtype), 'bias': jnp.zeros((w,), dtype)},
    }
  return {**params, 'bt_adapter': adapter}
