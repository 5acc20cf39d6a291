"""EVA-ViT-g/14, the frozen image encoder of BLIP-2 / InstructBLIP.

A plain pre-norm ViT: patch embedding, a CLS token, learned absolute positions, and `depth` blocks.
Particular to EVA: the fused qkv projection has no bias of its own, instead a `q_bias` and a `v_bias`
(the k bias is zero); LayerNorm eps 1e-6; exact GELU; no final norm (ST-LLM applies `ln_vision`, which
lives in the composition). BLIP-2 keeps 39 of the checkpoint's 40 blocks.

For the BT-Adapter (`bt_adapter.py`) the tower can also return the outputs of its last k blocks, and its
blocks expose their two residual branches (`attention`, `mlp`) for the adapter's spatial layers.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from stllm_jax.models import layers
from stllm_jax.models.layers import Array, Dtype


@dataclasses.dataclass(frozen=True)
class BTAdapterConfig:
  """The BT-Adapter beside the ViT (ST-LLM's QA / MVBench model: depth 3); see `bt_adapter.py`."""
  depth: int = 0  # temporal + spatial layer pairs, fed by the ViT's last `depth` blocks; 0 = no adapter
  max_frames: int = 64  # rows of the frame-position table: the most frames a video may have
  temporal_norm_eps: float = 1e-6  # norm1 of the temporal layers
  spatial_norm_eps: float = 1e-5  # both norms of the spatial layers (torch's default, not the ViT's 1e-6)
  drop_path: float = 0.1  # stochastic depth of the last layer pair; linear from 0 over the pairs (training only)

  def drop_path_rates(self) -> tuple[float, ...]:
    """One rate per layer pair: 0, 0.05, 0.1 for depth 3."""
    return tuple(float(r) for r in np.linspace(0.0, self.drop_path, self.depth))

  def validate(self, where: str, vit_depth: int) -> None:
    if not 0 <= self.depth <= vit_depth:
      raise ValueError(f'{where}.depth={self.depth} must be in 0..{vit_depth} (the ViT\'s depth): each adapter '
                       'layer pair reads one of the ViT\'s last blocks')
    if self.max_frames < 1:
      raise ValueError(f'{where}.max_frames must be >= 1, got {self.max_frames}')
    if not 0.0 <= self.drop_path < 1.0:
      raise ValueError(f'{where}.drop_path must be in [0, 1), got {self.drop_path}')
    for name in ('temporal_norm_eps', 'spatial_norm_eps'):
      if getattr(self, name) <= 0:
        raise ValueError(f'{where}.{name} must be > 0, got {getattr(self, name)}')


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  image_size: int = 224
  patch_size: int = 14
  width: int = 1408
  depth: int = 39
  num_heads: int = 16
  mlp_dim: int = 6144
  layer_norm_eps: float = 1e-6
  qkv_bias: bool = True  # EVA's separate q_bias and v_bias
  param_dtype: str = 'float32'
  init_std: float = 0.02  # std of fresh Dense kernels (BERT/LLaMA's 0.02; larger for tiny from-scratch towers)
  embed_init_std: float = 0.02  # std of the fresh CLS token and position embedding
  scan_layers: bool = True
  scan_unroll: int = 1  # scanned layers per iteration of the compiled loop; depth: no loop (small models on CPUs)
  remat_policy: str = 'none'
  bt_adapter: BTAdapterConfig = dataclasses.field(default_factory=BTAdapterConfig)

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def num_tokens(self) -> int:
    """Patches plus the CLS token: 257 for 224 / 14."""
    return (self.image_size // self.patch_size) ** 2 + 1

  def validate(self, where: str = 'vision') -> None:
    if self.width % self.num_heads:
      raise ValueError(f'{where}.width={self.width} is not a multiple of {where}.num_heads={self.num_heads}')
    if self.image_size % self.patch_size:
      raise ValueError(f'{where}.image_size={self.image_size} is not a multiple of {where}.patch_size={self.patch_size}')
    layers.check_scan_unroll(self.scan_unroll, where)
    self.bt_adapter.validate(f'{where}.bt_adapter', self.depth)


class PatchEmbed(nn.Module):
  """images [N, H, W, C] -> patch embeddings [N, (H/p)*(W/p), D], row-major over the grid.

  The stride-p, p x p convolution of EVA's patch embedding written as one matmul over reshaped patches
  (same params as `nn.Conv`: kernel [p, p, C, D], bias [D]). Same result; its gradient is far cheaper than a
  convolution's inside the scanned micro-batches of a train step on XLA:CPU (measured 50x).
  """
  width: int
  patch_size: int
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(self, images: Array) -> Array:
    n, h, w, c = images.shape
    p = self.patch_size
    kernel = self.param('kernel', layers.param_init(nn.initializers.lecun_normal(), (None, None, None, 'embed')),
                        (p, p, c, self.width), self.param_dtype)
    bias = self.param('bias', layers.param_init(nn.initializers.zeros, ('embed',)), (self.width,), self.param_dtype)
    patches = images.astype(self.dtype).reshape(n, h // p, p, w // p, p, c)  # [N, gy, p, gx, p, C]
    out = jnp.einsum('nyaxbc,abcd->nyxd', patches, kernel.astype(self.dtype)) + bias.astype(self.dtype)
    return out.reshape(n, (h // p) * (w // p), self.width)


class VisionAttention(nn.Module):
  config: VisionConfig
  dtype: Dtype
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:  # [N, P, D]
    cfg = self.config
    pdt = layers.as_dtype(cfg.param_dtype)
    heads = (cfg.num_heads, cfg.head_dim)
    qkv = layers.dense((3, *heads), ('embed', None, 'heads', 'head_dim'), use_bias=False, name='qkv',
                       dtype=self.dtype, param_dtype=pdt, init_std=cfg.init_std)(x)  # [N, P, 3, H, hd]
    query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if cfg.qkv_bias:
      bias_init = layers.param_init(nn.initializers.zeros, ('heads', 'head_dim'))
      query = query + self.param('q_bias', bias_init, heads, pdt).astype(self.dtype)
      value = value + self.param('v_bias', bias_init, heads, pdt).astype(self.dtype)
    out = layers.attention(query, key, value, None, self.attention_impl)  # [N, P, H, hd]
    out = layers.constrain(out, ('activation_batch', 'activation_length', 'activation_heads', None))
    return layers.dense(cfg.width, ('heads', 'head_dim', 'embed'), axis=(-2, -1), name='out',
                        dtype=self.dtype, param_dtype=pdt, init_std=cfg.init_std)(out)


class VisionBlock(nn.Module):
  """Pre-norm block: x + attention(x), then + mlp(x). Each residual branch is a method of its own (the
  BT-Adapter's spatial layers are these blocks with another residual pattern)."""
  config: VisionConfig
  dtype: Dtype
  attention_impl: str | None = None

  def setup(self):
    cfg = self.config
    pdt = layers.as_dtype(cfg.param_dtype)
    norm = lambda: layers.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, param_dtype=pdt)
    dense = lambda features, axes: layers.dense(features, axes, dtype=self.dtype, param_dtype=pdt,
                                                init_std=cfg.init_std)
    self.norm1 = norm()
    self.attn = VisionAttention(cfg, self.dtype, self.attention_impl)
    self.norm2 = norm()
    self.fc1 = dense(cfg.mlp_dim, ('embed', 'mlp'))
    self.fc2 = dense(cfg.width, ('mlp', 'embed'))

  def attention(self, x: Array) -> Array:  # [N, P, D] -> [N, P, D]
    return self.attn(self.norm1(x))

  def mlp(self, x: Array) -> Array:  # [N, P, D] -> [N, P, D]
    h = self.fc1(self.norm2(x))
    h = nn.gelu(layers.constrain(h, ('activation_batch', 'activation_length', 'activation_mlp')), approximate=False)
    return self.fc2(h)

  def __call__(self, x: Array) -> tuple[Array, None]:
    x = x + self.attention(x)
    x = x + self.mlp(x)
    return layers.constrain(x, ('activation_batch', 'activation_length', 'activation_embed')), None


class EVAViT(nn.Module):
  """images float [N, H, W, 3] (normalised, channels-last) -> tokens [N, 1 + patches, width]."""
  config: VisionConfig
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, images: Array, last_blocks: int = 0) -> Array | tuple[Array, Array]:
    """The last block's tokens [N, 257, D]; with `last_blocks` = k > 0, what the BT-Adapter reads instead:
    (the outputs of the last k blocks [k, N, 257, D], the position embedding [1, 257, D])."""
    cfg = self.config
    pdt = layers.as_dtype(cfg.param_dtype)
    expected = (cfg.image_size, cfg.image_size, 3)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
      raise ValueError(f'the vision tower takes images [N, {cfg.image_size}, {cfg.image_size}, 3] '
                       f'(channels-last), got shape {tuple(images.shape)}')
    patches = PatchEmbed(cfg.width, cfg.patch_size, self.dtype, pdt, name='patch_embed')(images)  # [N, 256, D]
    init = layers.param_init(nn.initializers.normal(cfg.embed_init_std), (None, None, 'embed'))
    cls_token = self.param('cls_token', init, (1, 1, cfg.width), pdt).astype(self.dtype)
    pos_embed = self.param('pos_embed', init, (1, cfg.num_tokens, cfg.width), pdt).astype(self.dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls_token, (images.shape[0], 1, cfg.width)), patches], axis=1)
    x = layers.constrain(x + pos_embed, ('activation_batch', 'activation_length', 'activation_embed'))
    blocks = layers.LayerStack(VisionBlock, cfg, cfg.depth, cfg.scan_layers, cfg.remat_policy, self.dtype,
                               self.attention_impl, unroll=cfg.scan_unroll, name='blocks')
    if not last_blocks:
      return blocks(x)
    return blocks(x, keep_last=last_blocks), pos_embed  # [k, N, 257, D], [1, 257, D]
