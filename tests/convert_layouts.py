"""Tiny random PyTorch checkpoints in every layout the converter reads, written inside the tests.

One random Hugging Face InstructBLIP with the architecture of configs/tiny.py is the ground truth. From it:
  hf_dir(...)        save_pretrained (single safetensors), sharded safetensors, or sharded .bin with an index
  lavis_files(...)   eva_vit_g.pth (with the extra block 39 -> index `depth`), instruct_blip_*.pth under
                     'model' (Qformer.bert.*, position_ids buffer, query_tokens, ln_vision, llm_proj) and a
                     Vicuna directory one vocabulary row short (the [PAD] row is the converter's to add), with
                     transformers-4.28-style rotary_emb.inv_freq buffers, as sharded .bin
  stllm_dir(...)     the ST-LLM release layout: bf16 sharded pytorch_model-*.bin + index, LLM keys model.* /
                     lm_head.weight, the rest under model.stllm_model. (llama_proj, mvm_decoder, down_proj/up_proj,
                     the embedding's second copy, residual_index), optionally the QA model's BT-Adapter
                     (visual_encoder.BTAdapter_*, random and non-zero everywhere, in float16)
The LAVIS names are written here from Hugging Face names with their own table (a third statement of the
mapping, beside `mappings` and `mappings.LAVIS_TO_HF_RENAMES`); the BT-Adapter's names from the released
`stllm/models/eva_btadapter.py` with a table of their own too (`bt_adapter_shapes`).
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import torch
import transformers

from conftest import randomize_
from stllm_jax import configlib
from stllm_jax.convert import hf
from stllm_jax.data import conversation
from stllm_jax.demo import tiny_tokenizers

TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'configs', 'tiny.py')

CORPUS = ['a red ball moves to the left', 'what colour is the square', 'the video shows a blue circle'] * 3

# Hugging Face name -> LAVIS name (q/v biases are split by `lavis_tensors`)
HF_TO_LAVIS = (
    (r'^vision_model\.embeddings\.class_embedding$', 'visual_encoder.cls_token'),
    (r'^vision_model\.embeddings\.position_embedding$', 'visual_encoder.pos_embed'),
    (r'^vision_model\.embeddings\.patch_embedding\.', 'visual_encoder.patch_embed.proj.'),
    (r'^vision_model\.encoder\.layers\.(\d+)\.layer_norm([12])\.', r'visual_encoder.blocks.\1.norm\2.'),
    (r'^vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.weight', r'visual_encoder.blocks.\1.attn.qkv.weight'),
    (r'^vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.', r'visual_encoder.blocks.\1.attn.proj.'),
    (r'^vision_model\.encoder\.layers\.(\d+)\.mlp\.', r'visual_encoder.blocks.\1.mlp.'),
    (r'^vision_model\.post_layernorm\.', 'ln_vision.'),
    (r'^qformer\.embeddings\.layernorm\.', 'Qformer.bert.embeddings.LayerNorm.'),
    (r'^qformer\.encoder\.layer\.(\d+)\.(attention|crossattention)\.attention\.', r'Qformer.bert.encoder.layer.\1.\2.self.'),
    (r'^qformer\.', 'Qformer.bert.'),
    (r'^language_projection\.', 'llm_proj.'),
    (r'^language_model\.', ''),
    (r'^query_tokens$', 'query_tokens'),
)


def hf_config_for(model_config) -> transformers.InstructBlipConfig:
  return transformers.InstructBlipConfig(**{k: v for k, v in hf.hf_instructblip_config(model_config).items()
                                            if k != 'model_type'})


def tiny_instructblip(root: str, **model_overrides):
  """The ground truth: configs/tiny.py's architecture (its LLM vocabulary the tiny tokenizer's) as a random HF
  InstructBLIP, every parameter random (seeded), and the tiny tokenizers written under `root`:
  (our config.model with `model_overrides`, the model, the LLM tokenizer directory, the Q-Former's)."""
  llm_tokenizer, qformer_tokenizer = tokenizers(root)
  cfg = configlib.load_config_file(TINY).model
  cfg.llm.vocab_size = len(conversation.load_llm_tokenizer(llm_tokenizer))
  cfg.update(model_overrides)
  torch.manual_seed(0)
  model = randomize_(transformers.InstructBlipForConditionalGeneration(hf_config_for(cfg)), seed=1)
  return cfg, model, llm_tokenizer, qformer_tokenizer


def tokenizers(directory: str) -> tuple[str, str]:
  llm = tiny_tokenizers.build_llm_tokenizer(os.path.join(directory, 'llm_tokenizer'), CORPUS, 256)
  qformer = tiny_tokenizers.build_qformer_tokenizer(os.path.join(directory, 'qformer_tokenizer'), CORPUS, 128)
  return llm, qformer


def copy_tokenizer(source: str, target: str) -> None:
  os.makedirs(target, exist_ok=True)
  for name in os.listdir(source):
    with open(os.path.join(source, name), 'rb') as f_in, open(os.path.join(target, name), 'wb') as f_out:
      f_out.write(f_in.read())


def save_bin_shards(directory: str, state: dict[str, torch.Tensor], num_shards: int,
                    prefix: str = 'pytorch_model') -> None:
  """Hugging Face's sharded .bin layout: {prefix}-0000i-of-0000n.bin and {prefix}.bin.index.json."""
  os.makedirs(directory, exist_ok=True)
  names = list(state)
  groups = np.array_split(np.arange(len(names)), num_shards)
  weight_map = {}
  for i, group in enumerate(groups):
    filename = f'{prefix}-{i + 1:05d}-of-{num_shards:05d}.bin'
    shard = {names[j]: state[names[j]].contiguous() for j in group}
    torch.save(shard, os.path.join(directory, filename))
    weight_map.update({name: filename for name in shard})
  total = sum(t.numel() * t.element_size() for t in state.values())
  with open(os.path.join(directory, f'{prefix}.bin.index.json'), 'w') as f:
    json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f)


def write_config(directory: str, config: dict) -> None:
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(config, f)


def hf_dir(directory: str, model, layout: str, llm_tokenizer: str, qformer_tokenizer: str) -> str:
  """layout: 'safetensors' (one file), 'sharded-safetensors' or 'sharded-bin'."""
  if layout == 'sharded-bin':
    model.config.save_pretrained(directory)
    save_bin_shards(directory, model.state_dict(), 3)
  else:
    model.save_pretrained(directory, max_shard_size='200KB' if layout == 'sharded-safetensors' else '10GB')
  copy_tokenizer(llm_tokenizer, directory)
  copy_tokenizer(qformer_tokenizer, os.path.join(directory, 'qformer_tokenizer'))
  return directory


def lavis_name(hf_name: str) -> str:
  for pattern, replacement in HF_TO_LAVIS:
    renamed, n = re.subn(pattern, replacement, hf_name)
    if n:
      return renamed
  raise KeyError(hf_name)


def inv_freq(model_config) -> torch.Tensor:
  llm = model_config.llm
  head_dim = llm.head_dim or llm.width // llm.num_heads
  return 1.0 / (llm.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim))


def lavis_tensors(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
  """Every tensor of a Hugging Face InstructBLIP under its LAVIS name (LLM keys as in a LLaMA directory)."""
  out = {}
  for name, tensor in hf_state.items():
    bias = re.fullmatch(r'vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias', name)
    if bias:
      q, _, v = tensor.chunk(3)
      out[f'visual_encoder.blocks.{bias.group(1)}.attn.q_bias'] = q.clone()
      out[f'visual_encoder.blocks.{bias.group(1)}.attn.v_bias'] = v.clone()
    else:
      out[lavis_name(name)] = tensor.clone()
  return out


def extra_vit_block(lavis: dict[str, torch.Tensor], depth: int, seed: int) -> dict[str, torch.Tensor]:
  """A random block `depth` shaped like block 0 (eva_vit_g.pth has 40 blocks, BLIP-2 uses 39)."""
  gen = torch.Generator().manual_seed(seed)
  prefix = 'visual_encoder.blocks.0.'
  return {f'visual_encoder.blocks.{depth}.' + k[len(prefix):]: torch.randn(v.shape, generator=gen)
          for k, v in lavis.items() if k.startswith(prefix)}


def lavis_files(directory: str, model, model_config, llm_tokenizer: str) -> dict[str, str]:
  """eva_vit_g.pth, instruct_blip_vicuna7b_trimmed.pth and a Vicuna directory (one row short of [PAD])."""
  os.makedirs(directory, exist_ok=True)
  lavis = lavis_tensors(model.state_dict())
  vit = {k[len('visual_encoder.'):]: v for k, v in lavis.items() if k.startswith('visual_encoder.')}
  vit.update({k[len('visual_encoder.'):]: v for k, v in
              extra_vit_block(lavis, model_config.vision.depth, seed=5).items()})
  blip = {k: v for k, v in lavis.items() if k.split('.')[0] in ('Qformer', 'query_tokens', 'ln_vision', 'llm_proj')}
  blip['Qformer.bert.embeddings.position_ids'] = torch.arange(model_config.qformer.max_positions)[None]
  llm = {k: v for k, v in lavis.items() if k.startswith(('model.', 'lm_head.'))}
  llm['model.embed_tokens.weight'] = llm['model.embed_tokens.weight'][:-1].clone()
  llm['lm_head.weight'] = llm['lm_head.weight'][:-1].clone()
  for i in range(model_config.llm.num_layers):
    llm[f'model.layers.{i}.self_attn.rotary_emb.inv_freq'] = inv_freq(model_config)
  paths = {'vit': os.path.join(directory, 'eva_vit_g.pth'),
           'instructblip': os.path.join(directory, 'instruct_blip_vicuna7b_trimmed.pth'),
           'llm': os.path.join(directory, 'vicuna')}
  torch.save(vit, paths['vit'])
  torch.save({'model': blip}, paths['instructblip'])
  text = dict(model.config.text_config.to_dict(), vocab_size=model_config.llm.vocab_size - 1)
  write_config(paths['llm'], text)
  save_bin_shards(paths['llm'], llm, 2)
  copy_tokenizer(llm_tokenizer, paths['llm'])
  return paths


def bt_adapter_shapes(width: int, mlp_dim: int, depth: int, max_frames: int) -> dict[str, tuple[int, ...]]:
  """{released name after `visual_encoder.`: shape} of a BT-Adapter with `depth` layer pairs."""
  attention = {'attn.qkv.weight': (3 * width, width), 'attn.q_bias': (width,), 'attn.v_bias': (width,),
               'attn.proj.weight': (width, width), 'attn.proj.bias': (width,)}
  temporal = {'norm1.weight': (width,), 'norm1.bias': (width,), **attention,
              'temporal_fc.weight': (width, width), 'temporal_fc.bias': (width,)}
  spatial = {'norm1.weight': (width,), 'norm1.bias': (width,), **attention, 'norm2.weight': (width,),
             'norm2.bias': (width,), 'mlp.fc1.weight': (mlp_dim, width), 'mlp.fc1.bias': (mlp_dim,),
             'mlp.fc2.weight': (width, mlp_dim), 'mlp.fc2.bias': (width,)}
  shapes = {'BTAdapter_cls': (1, 1, width), 'BTAdapter_position.weight': (max_frames, width)}
  for k in range(depth):
    shapes.update({f'BTAdapter_T.{k}.{name}': shape for name, shape in temporal.items()})
    shapes.update({f'BTAdapter_S.{k}.{name}': shape for name, shape in spatial.items()})
  return shapes


def bt_adapter_tensors(model_config, depth: int, max_frames: int, seed: int) -> dict[str, torch.Tensor]:
  """A random BT-Adapter under its checkpoint names (`visual_encoder.BTAdapter_*`), float16; no tensor is zero
  (the released start point has zero temporal_fc, q/v biases and CLS, which would hide mapping mistakes)."""
  gen = torch.Generator().manual_seed(seed)
  vision = model_config.vision
  out = {}
  for name, shape in bt_adapter_shapes(vision.width, vision.mlp_dim, depth, max_frames).items():
    noise = torch.randn(shape, generator=gen) * 0.05
    out['visual_encoder.' + name] = (1 + noise if '.norm' in name and name.endswith('weight') else noise).half()
  return out


def stllm_state(model, model_config, *, global_local: bool = False, mvm_head: bool = False,
                embed_copy: bool = True, num_local_frames: int = 4, bt_adapter_depth: int = 0,
                bt_adapter_frames: int = 8, seed: int = 7) -> dict[str, torch.Tensor]:
  """The tensors of a released ST-LLM checkpoint built from a Hugging Face InstructBLIP (bf16; a BT-Adapter
  with `bt_adapter_depth` layer pairs and `bt_adapter_frames` frame positions in float16)."""
  gen = torch.Generator().manual_seed(seed)
  randn = lambda *shape: torch.randn(shape, generator=gen) * 0.05
  width = model_config.llm.width
  state = {}
  for name, tensor in lavis_tensors(model.state_dict()).items():
    if name.startswith(('model.', 'lm_head.')):
      state[name] = tensor
    else:
      state['model.stllm_model.' + name.replace('llm_proj', 'llama_proj')] = tensor
  prefix = 'model.stllm_model.'
  state[prefix + 'Qformer.bert.embeddings.position_ids'] = torch.arange(model_config.qformer.max_positions)[None]
  if embed_copy:
    state[prefix + 'embed_tokens.weight'] = state['model.embed_tokens.weight']
  if mvm_head:
    state.update({prefix + 'mvm_decoder.head.weight': randn(width, width), prefix + 'mvm_decoder.head.bias': randn(width),
                  prefix + 'mvm_decoder.norm.weight': 1 + randn(width), prefix + 'mvm_decoder.norm.bias': randn(width)})
  if global_local:
    hidden = model_config.global_mlp_dim
    state.update({prefix + 'down_proj.weight': randn(hidden, width), prefix + 'down_proj.bias': randn(hidden),
                  prefix + 'up_proj.weight': randn(width, hidden), prefix + 'up_proj.bias': randn(width),
                  prefix + 'residual_index': torch.arange(num_local_frames) * 2 + 1})
  state = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in state.items()}
  if bt_adapter_depth:
    adapter = bt_adapter_tensors(model_config, bt_adapter_depth, bt_adapter_frames, seed + 1)
    state.update({prefix + name: tensor for name, tensor in adapter.items()})
  return state


def stllm_dir(directory: str, model, model_config, llm_tokenizer: str, **options) -> str:
  state = stllm_state(model, model_config, **options)
  write_config(directory, dict(model.config.text_config.to_dict(), model_type='st_llm_hf',
                               architectures=['STLLMForCausalLM'], torch_dtype='bfloat16'))
  save_bin_shards(directory, state, 3)
  copy_tokenizer(llm_tokenizer, directory)
  return directory
