"""The PyTorch reference train step for the A/B: Hugging Face modules, random weights, the same work as ours.

    frames [B, T, H, W, 3] --(no_grad) InstructBLIP vision_model (+ post_layernorm = ln_vision) per frame
      --(no_grad) qformer with the instruction--> [B*T, K, Dq] --language_projection (trained)--> [B, T*K, D]
      --random gather of n_keep tokens per sample, in order--> [V_kept : text embeddings]
      --LlamaForCausalLM.model (inputs_embeds)--> hidden --lm_head on the L text positions--> LM loss on answers
      --backward, AdamW step on the LLM and the projection

No MVM (the A/B runs with train.mvm_weight = 0 on both sides). Weights are float32 (or the config's dtype when
bfloat16) and random (`hf.hf_instructblip_config` of the same config).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from stllm_jax.convert import hf, reference
from stllm_jax.models.stllm import STLLMConfig


class TorchTrainStep:
  """One callable train step on host numpy batches (our batch format)."""

  def __init__(self, model_cfg: STLLMConfig, train_cfg: Any, threads: int, seed: int = 0):
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    self.torch = torch
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    config = transformers.InstructBlipConfig(
        **{k: v for k, v in hf.hf_instructblip_config(model_cfg).items() if k != 'model_type'})
    dtype = torch.bfloat16 if model_cfg.dtype == 'bfloat16' else torch.float32
    model = transformers.InstructBlipForConditionalGeneration(config).to(dtype).eval()
    self.towers = model  # its vision_model, qformer and query_tokens run without gradient
    self.projection, self.lm = model.language_projection, model.language_model
    if not isinstance(self.lm, transformers.LlamaForCausalLM):
      raise TypeError(f'expected InstructBLIP language_model to be LlamaForCausalLM, got {type(self.lm).__name__}')
    for module in (model.vision_model, model.qformer):
      module.requires_grad_(False)
    model.query_tokens.requires_grad_(False)
    self.num_query_tokens = model_cfg.qformer.num_query_tokens
    self.dtype = dtype
    trainable = list(self.lm.parameters()) + list(self.projection.parameters())
    self.optimizer = torch.optim.AdamW(trainable, lr=train_cfg.lr, betas=(train_cfg.adam_b1, train_cfg.adam_b2),
                                       eps=train_cfg.adam_eps, weight_decay=train_cfg.weight_decay)
    self.generator = torch.Generator().manual_seed(seed)

  def visual_tokens(self, batch: Mapping[str, np.ndarray]):
    """[B, T*K, D], the frozen towers without gradient, the projection with."""
    b, t = batch['frames'].shape[:2]
    k = self.num_query_tokens
    queries = reference.frame_queries(self.towers, batch, self.dtype)  # [B*T, K, Dq], no gradient
    return self.projection(queries).reshape(b, t * k, -1)

  def keep(self, visual, n_keep: int):
    """A random subset of n_keep tokens per sample, in order (what masking.keep_indices does)."""
    torch = self.torch
    b, n_visual, d = visual.shape
    if n_keep >= n_visual:
      return visual
    scores = torch.rand(b, n_visual, generator=self.generator)
    index = torch.sort(torch.topk(scores, n_keep, dim=1).indices, dim=1).values
    return torch.gather(visual, 1, index[:, :, None].expand(b, n_keep, d))

  def __call__(self, batch: Mapping[str, np.ndarray], n_keep: int) -> float:
    torch = self.torch
    kept = self.keep(self.visual_tokens(batch), n_keep)  # [B, n_keep, D]
    ids = torch.from_numpy(batch['input_ids']).long()
    text = self.lm.get_input_embeddings()(ids)
    embeds = torch.cat([kept.to(text.dtype), text], 1)
    mask = torch.cat([torch.ones(kept.shape[:2], dtype=torch.long), torch.from_numpy(batch['attention_mask']).long()], 1)
    hidden = self.lm.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    text_len = ids.shape[1]
    logits = self.lm.lm_head(hidden[:, n_keep - 1:n_keep - 1 + text_len]).float()  # [B, L, V]
    answer = torch.from_numpy(batch['answer_mask']).float()
    token_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1),
                                                   reduction='none').reshape(ids.shape)
    loss = (token_loss * answer).sum() / answer.sum().clamp(min=1.0)
    loss.backward()
    self.optimizer.step()
    self.optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())
