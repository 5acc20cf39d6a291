"""A PyTorch EVA-ViT + BT-Adapter vision tower, written from the structure of the released
`stllm/models/eva_btadapter.py` (TencentARC/ST-LLM) and independent of stllm_jax's models: the PyTorch side of
`convert verify` for ST-LLM's QA model (transformers has no BT-Adapter) and of the adapter's parity tests.

Its parameter names are the released ones, so `state_dict()` has the keys of a released checkpoint's
`visual_encoder.*`: `cls_token`, `pos_embed`, `patch_embed.proj.*`, `blocks.N.*`, `BTAdapter_cls`,
`BTAdapter_position.weight`, `BTAdapter_T.N.*`, `BTAdapter_S.N.*`. It keeps the released layout: the branch
is one sequence [B, 1 + P*T, W] with the patches in patch-major `(p t)` order. Inference only (the drop
path of the released layers is the identity there).
"""

import torch
from torch import nn
import torch.nn.functional as F


class EvaAttention(nn.Module):
  """qkv without bias of its own; q and v biases (the k bias is zero); output projection with bias."""

  def __init__(self, width: int, num_heads: int):
    super().__init__()
    self.num_heads = num_heads
    self.qkv = nn.Linear(width, 3 * width, bias=False)
    self.q_bias = nn.Parameter(torch.zeros(width))
    self.v_bias = nn.Parameter(torch.zeros(width))
    self.proj = nn.Linear(width, width)

  def forward(self, x):  # [N, L, W]
    n, length, width = x.shape
    bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
    qkv = F.linear(x, self.qkv.weight, bias).reshape(n, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # [N, H, L, hd]
    weights = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    return self.proj((weights @ v).transpose(1, 2).reshape(n, length, width))


class Mlp(nn.Module):
  def __init__(self, width: int, hidden: int):
    super().__init__()
    self.fc1 = nn.Linear(width, hidden)
    self.fc2 = nn.Linear(hidden, width)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))


class EvaBlock(nn.Module):
  def __init__(self, width: int, num_heads: int, mlp_dim: int, eps: float):
    super().__init__()
    self.norm1 = nn.LayerNorm(width, eps=eps)
    self.attn = EvaAttention(width, num_heads)
    self.norm2 = nn.LayerNorm(width, eps=eps)
    self.mlp = Mlp(width, mlp_dim)

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class TemporalLayer(nn.Module):
  """BTAdapter_T.k: each patch attends over its frames; the CLS passes through."""

  def __init__(self, width: int, num_heads: int):
    super().__init__()
    self.norm1 = nn.LayerNorm(width, eps=1e-6)
    self.attn = EvaAttention(width, num_heads)
    self.temporal_fc = nn.Linear(width, width)

  def forward(self, x, num_frames):  # [B, 1 + P*T, W], patches (p t)
    cls, patches = x[:, :1], x[:, 1:]
    b, pt, width = patches.shape
    per_patch = patches.reshape(b * (pt // num_frames), num_frames, width)  # [B*P, T, W]
    update = self.temporal_fc(self.attn(self.norm1(per_patch))).reshape(b, pt, width)
    return torch.cat([cls, patches + update], dim=1)


class SpatialLayer(EvaBlock):
  """BTAdapter_S.k: an EVA block (LayerNorm eps 1e-5) run per frame over [CLS ; that frame's patches]."""

  def __init__(self, width: int, num_heads: int, mlp_dim: int):
    super().__init__(width, num_heads, mlp_dim, eps=1e-5)

  def forward(self, x, num_frames):  # [B, 1 + P*T, W], patches (p t)
    b, length, width = x.shape
    p, t = (length - 1) // num_frames, num_frames
    cls = x[:, :1].unsqueeze(1).expand(b, t, 1, width).reshape(b * t, 1, width)
    frames = x[:, 1:].reshape(b, p, t, width).permute(0, 2, 1, 3).reshape(b * t, p, width)  # [(b t), P, W]
    out = self.attn(self.norm1(torch.cat([cls, frames], dim=1)))  # [(b t), 1+P, W]
    cls_update = out[:, :1].reshape(b, t, 1, width).mean(dim=1)
    patch_update = out[:, 1:].reshape(b, t, p, width).permute(0, 2, 1, 3).reshape(b, p * t, width)  # (p t)
    x = x + torch.cat([cls_update, patch_update], dim=1)
    return x + self.mlp(self.norm2(x))


class EvaViTWithBTAdapter(nn.Module):
  """video [B, T, 3, H, W] -> tokens [B*T, 1+P, W] for ln_vision."""

  def __init__(self, image_size: int, patch_size: int, width: int, depth: int, num_heads: int, mlp_dim: int,
               adapter_depth: int, max_frames: int, vit_norm_eps: float = 1e-6):
    super().__init__()
    num_patches = (image_size // patch_size) ** 2
    self.patch_embed = nn.Module()
    self.patch_embed.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
    self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, width))
    self.blocks = nn.ModuleList([EvaBlock(width, num_heads, mlp_dim, eps=vit_norm_eps) for _ in range(depth)])
    self.BTAdapter_cls = nn.Parameter(torch.zeros(1, 1, width))
    self.BTAdapter_position = nn.Embedding(max_frames, width)
    self.BTAdapter_T = nn.ModuleList([TemporalLayer(width, num_heads) for _ in range(adapter_depth)])
    self.BTAdapter_S = nn.ModuleList([SpatialLayer(width, num_heads, mlp_dim) for _ in range(adapter_depth)])

  def forward(self, video):
    b, t = video.shape[:2]
    x = self.patch_embed.proj(video.flatten(0, 1)).flatten(2).transpose(1, 2)  # [(b t), P, W]
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
    first = len(self.blocks) - len(self.BTAdapter_T)
    branch = None
    for index, block in enumerate(self.blocks):
      x = block(x)
      if index >= first:
        k = index - first
        branch = self.branch_input(x, b, t) if k == 0 else self.branch_update(x, branch, b, t)
        branch = self.BTAdapter_S[k](self.BTAdapter_T[k](branch, t), t)
    p, width = x.shape[1] - 1, x.shape[2]
    cls = branch[:, :1].expand(b, t, width).reshape(b * t, 1, width)
    patches = branch[:, 1:].reshape(b, p, t, width).permute(0, 2, 1, 3).reshape(b * t, p, width)
    return (x + torch.cat([cls, patches], dim=1)) / 2

  def branch_input(self, x, b, t):
    """The first adapter layer's input: block output + pos_embed + frame positions, the CLS averaged."""
    tokens = x.reshape(b, t, *x.shape[1:])  # [B, T, 1+P, W]
    frame_cls = tokens[:, :, 0].mean(dim=1, keepdim=True)  # [B, 1, W]
    adapter_cls = self.BTAdapter_cls + self.pos_embed[:, :1]  # [1, 1, W]
    patches = tokens[:, :, 1:] + self.pos_embed[:, 1:].unsqueeze(1)  # [B, T, P, W]
    patches = patches + self.BTAdapter_position(torch.arange(t))[None, :, None]
    patches = patches.permute(0, 2, 1, 3).flatten(1, 2)  # [B, P*T, W] in (p t) order
    return torch.cat([(frame_cls + adapter_cls) / 2, patches], dim=1)

  def branch_update(self, x, branch, b, t):
    tokens = x.reshape(b, t, *x.shape[1:])
    frame_cls = tokens[:, :, 0].mean(dim=1, keepdim=True)
    patches = tokens[:, :, 1:].permute(0, 2, 1, 3).flatten(1, 2)
    return torch.cat([frame_cls, patches], dim=1) + branch
