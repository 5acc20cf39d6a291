"""PyTorch references for `convert verify`: the model a source describes, run with transformers' modules.

The reference is built from the *source* tensors, not from our converted params, so a conversion mistake
shows up as a logit difference:
  hf-instructblip / hf-llama   `from_pretrained` of the source directory, as Hugging Face loads it;
  lavis / stllm                Hugging Face's InstructBLIP filled through `mappings.lavis_name_to_hf`, the
                               plain renaming Hugging Face's own conversion of LAVIS checkpoints performs (written
                               apart from our rule tables), plus ST-LLM's global-local MLP in torch; for the QA
                               model (a BT-Adapter) also `bt_adapter_reference`'s EVA-ViT + BT-Adapter tower, filled
                               by the checkpoint's own names (`visual_encoder.*`), as transformers has no adapter.
Its forward is ST-LLM's: per frame EVA-ViT (with the adapter: the tower, over all T frames of a video together)
-> ln_vision -> Q-Former with the instruction -> projection, the frame tokens arranged as the model's
`video_input` says (ST-LLM's own local-frame indices for global-local), then LLaMA on [visual tokens : text
embeddings]. Weights are float32; `round_to_bfloat16` rounds them first, to compare with a checkpoint stored in
bfloat16.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable

import numpy as np

from stllm_jax.convert import hf, mappings, strict
from stllm_jax.models import stllm


VIT_PREFIX = 'visual_encoder.'  # LAVIS / ST-LLM: the EVA-ViT, and the QA model's BT-Adapter beside its blocks


@dataclasses.dataclass
class Reference:
  """The PyTorch model of a source: Hugging Face's InstructBLIP, ST-LLM's heads, the QA model's adapter tower."""
  model: Any  # InstructBlipForConditionalGeneration (its vision_model's post_layernorm is ln_vision)
  heads: dict[str, Any] = dataclasses.field(default_factory=dict)  # ST-LLM head tensors ('down_proj.weight', ...)
  tower: Any = None  # EVA-ViT + BT-Adapter (`bt_adapter_tower`): replaces the per-frame ViT of model.vision_model


def _torch():
  import torch  # pylint: disable=g-import-not-at-top
  return torch


def as_reference_weight(tensor: Any, round_to_bfloat16: bool):
  """A source tensor as a float32 torch tensor (rounded through bfloat16 if asked)."""
  torch = _torch()
  if not hasattr(tensor, 'detach'):
    array = np.asarray(tensor)
    tensor = torch.from_numpy(np.ascontiguousarray(array.astype(np.float32)))
  tensor = tensor.detach()
  if tensor.is_floating_point():
    tensor = tensor.to(torch.bfloat16) if round_to_bfloat16 else tensor
    return tensor.float().contiguous()
  return tensor


def _round_module_(model: Any, round_to_bfloat16: bool) -> Any:
  torch = _torch()
  model = model.float().eval()
  if round_to_bfloat16:
    with torch.no_grad():
      for p in model.parameters():
        p.copy_(p.to(torch.bfloat16).float())
  return model


def _add_mean_rows(weight, rows: int):
  """ST-LLM's [PAD] rows as the conversion adds them: the mean of the existing rows."""
  torch = _torch()
  if weight.shape[0] >= rows:
    return weight
  mean = weight.double().mean(dim=0, keepdim=True).to(weight.dtype)
  return torch.cat([weight] + [mean] * (rows - weight.shape[0]), dim=0)


def hf_instructblip(directory: str, round_to_bfloat16: bool = False) -> Any:
  import transformers  # pylint: disable=g-import-not-at-top
  model = transformers.InstructBlipForConditionalGeneration.from_pretrained(directory, dtype=_torch().float32)
  return _round_module_(model, round_to_bfloat16)


def hf_llama(directory: str, vocab_size: int, round_to_bfloat16: bool = False) -> Any:
  """`LlamaForCausalLM` of `directory`, its vocabulary grown to `vocab_size` rows the way the conversion does."""
  import transformers  # pylint: disable=g-import-not-at-top
  torch = _torch()
  model = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)
  if vocab_size > model.config.vocab_size:
    with torch.no_grad():
      embed = _add_mean_rows(model.get_input_embeddings().weight.data, vocab_size)
      head = _add_mean_rows(model.lm_head.weight.data, vocab_size)
      model.resize_token_embeddings(vocab_size, mean_resizing=False)
      model.get_input_embeddings().weight.data.copy_(embed)
      model.lm_head.weight.data.copy_(head)
  return _round_module_(model, round_to_bfloat16)


def bt_adapter_tower(vision: Any, state: dict[str, Any] | None = None) -> Any:
  """`bt_adapter_reference.EvaViTWithBTAdapter` with the architecture of our `model.vision` (a VisionConfig):
  holding the tensors of `state` (released names after `visual_encoder.`; the tensors themselves, not copies),
  or, without `state`, on the meta device (names and shapes only)."""
  from stllm_jax.convert import bt_adapter_reference  # pylint: disable=g-import-not-at-top
  with _torch().device('meta'):
    tower = bt_adapter_reference.EvaViTWithBTAdapter(
        image_size=vision.image_size, patch_size=vision.patch_size, width=vision.width, depth=vision.depth,
        num_heads=vision.num_heads, mlp_dim=vision.mlp_dim, adapter_depth=vision.bt_adapter.depth,
        max_frames=vision.bt_adapter.max_frames, vit_norm_eps=vision.layer_norm_eps)
  if state is not None:
    tower.load_state_dict(state, strict=True, assign=True)
  return tower.eval()


def lavis_instructblip(tensors: Iterable[tuple[str, Any]], model_config: Any, prefix: str = '',
                       round_to_bfloat16: bool = False) -> Reference:
  """Hugging Face InstructBLIP, ST-LLM heads {name: tensor} and, for a model with a BT-Adapter, the EVA-ViT +
  BT-Adapter tower, from LAVIS- or ST-LLM-named tensors.

  `prefix`: where the non-LLM modules live (`model.stllm_model.` in ST-LLM checkpoints). Buffers, the
  ST-LLM copy of the embedding and EVA blocks past the model's depth are not weights of the reference. The
  tower shares the ViT's tensors with Hugging Face's vision_model (which then only gives ln_vision).
  """
  import transformers  # pylint: disable=g-import-not-at-top
  torch = _torch()
  cfg = stllm.model_config(model_config)
  config = transformers.InstructBlipConfig(
      **{k: v for k, v in hf.hf_instructblip_config(model_config).items() if k != 'model_type'})
  state, heads, qv_biases, tower_state = {}, {}, {}, {}
  for name, value in tensors:
    local = name[len(prefix):] if prefix and name.startswith(prefix) else name
    if _not_a_weight(local, name, prefix, cfg.vision.depth):
      continue
    tensor = as_reference_weight(strict.to_numpy(value() if callable(value) else value), round_to_bfloat16)
    if cfg.vision.bt_adapter.depth and local.startswith(VIT_PREFIX):
      tower_state[local[len(VIT_PREFIX):]] = tensor
      if local.startswith(VIT_PREFIX + 'BTAdapter_'):
        continue
    head = local.split('.')[0]
    if head in ('mvm_decoder', 'down_proj', 'up_proj'):
      heads[local] = tensor
      continue
    bias = re.fullmatch(r'visual_encoder\.blocks\.(\d+)\.attn\.([qv])_bias', local)
    if bias:
      qv_biases.setdefault(int(bias.group(1)), {})[bias.group(2)] = tensor
      continue
    state[mappings.lavis_name_to_hf(local)] = tensor
  for block, biases in qv_biases.items():
    q, v = biases['q'], biases['v']
    state[f'vision_model.encoder.layers.{block}.self_attn.qkv.bias'] = torch.cat([q, torch.zeros_like(q), v])
  vocab = config.text_config.vocab_size
  for key in ('language_model.model.embed_tokens.weight', 'language_model.lm_head.weight'):
    if key in state:
      state[key] = _add_mean_rows(state[key], vocab)
  from transformers.initialization import no_init_weights  # pylint: disable=g-import-not-at-top
  with no_init_weights():  # uninitialised params (never touched, then replaced); buffers are computed as usual
    model = transformers.InstructBlipForConditionalGeneration(config)
  model.load_state_dict(state, strict=True, assign=True)
  model.vision_model.post_layernorm.eps = cfg.ln_vision_eps  # LAVIS: 1e-5, where HF uses the vision eps
  tower = bt_adapter_tower(cfg.vision, tower_state) if cfg.vision.bt_adapter.depth else None
  return Reference(model.float().eval(), heads, tower)


def _not_a_weight(local: str, name: str, prefix: str, depth: int) -> bool:
  if local.endswith(('position_ids', 'rotary_emb.inv_freq')) or local == 'residual_index':
    return True
  if prefix and name.startswith(prefix) and local == 'embed_tokens.weight':  # ST-LLM's copy of the embedding
    return True
  block = re.match(r'visual_encoder\.blocks\.(\d+)\.', local)
  return bool(block) and int(block.group(1)) >= depth  # EVA-ViT-g's block 39, which BLIP-2 does not use


def frame_queries(model: Any, batch: dict[str, np.ndarray], dtype: Any = None, tower: Any = None):
  """The Q-Former query outputs [B*T, K, Dq] of every frame, without gradient: a Hugging Face InstructBLIP's
  vision_model (its post_layernorm is ln_vision) and qformer, the batch's instruction repeated for each frame.
  `dtype` casts the pixels (the model's dtype when it is not float32); `tower` (EVA-ViT + BT-Adapter, which
  sees a video's frames together) replaces the vision_model's per-frame ViT, before its post_layernorm."""
  torch = _torch()
  frames = batch['frames']
  b, t = frames.shape[:2]
  k = model.query_tokens.shape[1]
  with torch.no_grad():
    video = torch.from_numpy(np.ascontiguousarray(frames.transpose(0, 1, 4, 2, 3)))  # [B, T, 3, H, W]
    video = video if dtype is None else video.to(dtype)
    if tower is None:
      image_tokens = model.vision_model(pixel_values=video.flatten(0, 1))[0]  # [B*T, P, Dv]
    else:
      image_tokens = model.vision_model.post_layernorm(tower(video))
    qids = torch.from_numpy(np.asarray(batch['qformer_input_ids'])).long().repeat_interleave(t, 0)
    qmask = torch.from_numpy(np.asarray(batch['qformer_attention_mask'])).long().repeat_interleave(t, 0)
    return model.qformer(
        input_ids=qids, attention_mask=torch.cat([torch.ones(b * t, k, dtype=torch.long), qmask], 1),
        query_embeds=model.query_tokens.expand(b * t, -1, -1), encoder_hidden_states=image_tokens,
        encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long))[0][:, :k]


def visual_tokens(reference: Reference, model_config: Any, batch: dict[str, np.ndarray]):
  """The visual tokens V [B, Nv, D] of ST-LLM, computed with the Hugging Face modules (and the adapter tower)."""
  torch = _torch()
  cfg = stllm.model_config(model_config)
  b, t = batch['frames'].shape[:2]
  heads = reference.heads
  with torch.no_grad():
    queries = frame_queries(reference.model, batch, tower=reference.tower)
    tokens = reference.model.language_projection(queries).reshape(b, t, cfg.qformer.num_query_tokens, -1)
    if cfg.video_input == 'mean':
      return tokens.mean(dim=1)
    if cfg.video_input == 'global_local':
      global_tokens = tokens.mean(dim=1)
      down = torch.nn.functional.linear(global_tokens, heads['down_proj.weight'], heads['down_proj.bias'])
      residual = torch.nn.functional.linear(torch.relu(down), heads['up_proj.weight'], heads['up_proj.bias'])
      tokens = tokens[:, list(stllm.local_frame_indices(t, cfg.num_local_frames))] + residual[:, None]
    return tokens.reshape(b, -1, tokens.shape[-1])


def stllm_logits(reference: Reference, model_config: Any, batch: dict[str, np.ndarray]) -> np.ndarray:
  """float32 logits [B, Nv + L, vocab] of ST-LLM on `batch` (our batch format)."""
  torch = _torch()
  visual = visual_tokens(reference, model_config, batch)
  with torch.no_grad():
    lm = reference.model.language_model
    text = lm.get_input_embeddings()(torch.tensor(batch['input_ids']).long())
    mask = torch.cat([torch.ones(visual.shape[:2], dtype=torch.long), torch.tensor(batch['attention_mask']).long()], 1)
    return lm(inputs_embeds=torch.cat([visual, text], 1), attention_mask=mask).logits.float().numpy()


def llama_logits(model: Any, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
  torch = _torch()
  with torch.no_grad():
    return model(input_ids=torch.tensor(input_ids).long(),
                 attention_mask=torch.tensor(attention_mask).long()).logits.float().numpy()
