"""EVA-ViT-g/14, the frozen image encoder of BLIP-2 / InstructBLIP.

A plain pre-norm ViT: patch embedding, a CLS token, learned absolute positions, and `depth` blocks.
Particular to EVA: the fused qkv projection has no bias of its own, instead a `q_bias` and a `v_bias`
(the k bias is zero); LayerNorm eps 1e-6; exact GELU; no final norm (ST-LLM applies `ln_vision`, which
lives in the composition). BLIP-2 keeps 39 of the checkpoint's 40 blocks.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from stllm_jax.models import layers
from stllm_jax.models.layers import Array, Dtype


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
  remat_policy: str = 'none'

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
  config: VisionConfig
  dtype: Dtype
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, None]:
    cfg = self.config
    pdt = layers.as_dtype(cfg.param_dtype)
    norm = lambda name: layers.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, param_dtype=pdt, name=name)
    x = x + VisionAttention(cfg, self.dtype, self.attention_impl, name='attn')(norm('norm1')(x))
    dense = lambda features, axes, name: layers.dense(features, axes, name=name, dtype=self.dtype, param_dtype=pdt,
                                                      init_std=cfg.init_std)
    h = dense(cfg.mlp_dim, ('embed', 'mlp'), 'fc1')(norm('norm2')(x))
    h = nn.gelu(layers.constrain(h, ('activation_batch', 'activation_length', 'activation_mlp')), approximate=False)
    x = x + dense(cfg.width, ('mlp', 'embed'), 'fc2')(h)
    return layers.constrain(x, ('activation_batch', 'activation_length', 'activation_embed')), None


class EVAViT(nn.Module):
  """images float [N, H, W, 3] (normalised, channels-last) -> tokens [N, 1 + patches, width]."""
  config: VisionConfig
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, images: Array) -> Array:
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
    return layers.LayerStack(VisionBlock, cfg, cfg.depth, cfg.scan_layers, cfg.remat_policy, self.dtype,
                             self.attention_impl, name='blocks')(x)
