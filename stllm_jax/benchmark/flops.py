"""Model FLOPs of one train step, counted analytically from the config (matmuls only; 1 multiply-add = 2 FLOPs).

    frozen towers, forward only (2 FLOPs per weight per token, plus attention):
      EVA-ViT per frame: patch embedding, per block qkv / scores / values / out / fc1 / fc2 (bidirectional)
      Q-Former per frame over [K queries : Lq text]: self-attention on K + Lq, cross-attention of the K queries
        to the image tokens (every cross_attention_freq-th layer), query FFN on K, text FFN on Lq
    BT-Adapter (model.vision.bt_adapter.depth > 0; trainable, 6 per weight per token): per layer a temporal
      attention over the T frames of each patch (qkv, out, temporal_fc) and a whole EVA block per frame over
      [CLS ; patches]; the gradient then flows back through the frozen Q-Former to the image tokens (one more
      Q-Former forward's worth: input gradients only) and through the projection's input too
    projection (trainable, its input is frozen): forward + weight gradient = 4 FLOPs per weight per token
    LLM on [n_keep visual : L text] (trainable): 6 FLOPs per weight per token (forward, input and weight
      gradients); causal attention scores and values 2 x 2 x S^2 x H x hd / 2 per layer, x 3 for training;
      the LM head on the L text positions only (the step computes no logits at visual positions)
    MVM (train.mvm_weight > 0): head on the n_keep kept positions (x 3), teacher = LLM forward (2 per weight)
      on the Nv unmasked visual tokens, with its own causal attention
Embedding lookups, norms, softmax and elementwise ops are not counted (XLA's cost analysis counts them).
"""

from __future__ import annotations

from typing import Any

from stllm_jax.models.stllm import STLLMConfig


def vit_forward_per_frame(cfg: STLLMConfig) -> int:
  v = cfg.vision
  tokens, patches = v.num_tokens, v.num_tokens - 1
  patch_embed = 2 * patches * (v.patch_size ** 2 * 3) * v.width
  projections = 2 * tokens * (3 * v.width * v.width + v.width * v.width + 2 * v.width * v.mlp_dim)
  attention = 2 * 2 * tokens * tokens * v.width  # scores and values, all heads
  return patch_embed + v.depth * (projections + attention)


def qformer_forward_per_frame(cfg: STLLMConfig, qformer_text_len: int) -> int:
  q, image_tokens, image_width = cfg.qformer, cfg.vision.num_tokens, cfg.vision.width
  k, seq = q.num_query_tokens, q.num_query_tokens + qformer_text_len
  self_attention = 2 * seq * 4 * q.width * q.width + 2 * 2 * seq * seq * q.width
  cross_attention = (2 * k * 2 * q.width * q.width  # query and out projections on the K queries
                     + 2 * image_tokens * 2 * image_width * q.width  # key and value from the image tokens
                     + 2 * 2 * k * image_tokens * q.width)  # scores and values
  ffns = 2 * (k + qformer_text_len) * 2 * q.width * q.mlp_dim  # query FFN on K, text FFN on Lq
  cross_layers = len(range(0, q.num_layers, q.cross_attention_freq))
  return q.num_layers * (self_attention + ffns) + cross_layers * cross_attention


def bt_adapter_forward_per_video(cfg: STLLMConfig, num_frames: int) -> int:
  """Forward FLOPs of the BT-Adapter on one video of `num_frames` frames (temporal + spatial layers)."""
  v, t = cfg.vision, num_frames
  patches = v.num_tokens - 1
  temporal = (2 * patches * t * 5 * v.width * v.width  # qkv (3), out, temporal_fc on every patch of every frame
              + patches * 2 * 2 * t * t * v.width)  # scores and values over the T frames of each patch
  spatial = t * (2 * v.num_tokens * (4 * v.width * v.width + 2 * v.width * v.mlp_dim)  # qkv, out, fc1, fc2
                 + 2 * 2 * v.num_tokens * v.num_tokens * v.width)  # scores and values over [CLS ; patches]
  return v.bt_adapter.depth * (temporal + spatial)


def llm_weight_flops_per_token(cfg: STLLMConfig) -> int:
  """Forward FLOPs of the LLM's transformer blocks per token (2 per weight; no LM head, no attention)."""
  m = cfg.llm
  hd = m.attention_head_dim
  per_layer = m.width * m.num_heads * hd * 2 + m.width * m.num_kv_heads * hd * 2 + 3 * m.width * m.mlp_dim
  return 2 * m.num_layers * per_layer


def llm_causal_attention_forward(cfg: STLLMConfig, seq_len: int) -> int:
  """Scores and values of causal attention over `seq_len` tokens (half of the full square), all layers."""
  m = cfg.llm
  full = 2 * 2 * seq_len * seq_len * m.num_heads * m.attention_head_dim
  return m.num_layers * full // 2


def train_step_flops(cfg: STLLMConfig, *, batch_size: int, num_frames: int, text_len: int, qformer_text_len: int,
                     n_keep: int, mvm: bool) -> dict[str, int]:
  """FLOPs of one optimizer step over `batch_size` samples, by part; 'total' sums them."""
  b, frames_in_batch = batch_size, batch_size * num_frames
  k, d = cfg.qformer.num_query_tokens, cfg.llm.width
  num_visual = cfg.num_visual_tokens(num_frames)
  seq = n_keep + text_len
  parts = {
      'vision_forward': frames_in_batch * vit_forward_per_frame(cfg),
      'qformer_forward': frames_in_batch * qformer_forward_per_frame(cfg, qformer_text_len),
      'projection_train': frames_in_batch * k * 4 * cfg.qformer.width * d,
      'llm_train': b * 3 * seq * llm_weight_flops_per_token(cfg),
      'llm_attention_train': b * 3 * llm_causal_attention_forward(cfg, seq),
      'lm_head_train': b * 3 * text_len * 2 * d * cfg.llm.vocab_size,
  }
  if cfg.vision.bt_adapter.depth:
    parts['bt_adapter_train'] = b * 3 * bt_adapter_forward_per_video(cfg, num_frames)
    parts['qformer_input_gradient'] = parts['qformer_forward']
    parts['projection_train'] += frames_in_batch * k * 2 * cfg.qformer.width * d  # its input gradient
  if cfg.video_input == 'global_local':
    parts['global_mlp_train'] = b * 3 * k * 2 * 2 * d * cfg.global_mlp_dim
  if mvm:
    parts['mvm_head_train'] = b * 3 * n_keep * 2 * d * d
    parts['teacher_forward'] = b * (num_visual * llm_weight_flops_per_token(cfg)
                                    + llm_causal_attention_forward(cfg, num_visual))
  parts['total'] = sum(parts.values())
  return parts


def prefill_flops(cfg: STLLMConfig, batch_size: int, prefix_len: int) -> int:
  """LLM forward over the prefix (weights, causal attention) plus the LM head on the last position."""
  per_sample = (prefix_len * llm_weight_flops_per_token(cfg) + llm_causal_attention_forward(cfg, prefix_len)
                + 2 * cfg.llm.width * cfg.llm.vocab_size)
  return batch_size * per_sample


def achieved(flops: float, seconds: float, peak_tflops: float | None) -> dict[str, Any]:
  """TFLOP/s and MFU (None where the device's peak is unknown)."""
  tflops = flops / seconds / 1e12 if seconds > 0 else float('nan')
  return {'tflops_per_s': tflops, 'mfu': tflops / peak_tflops if peak_tflops else None}
