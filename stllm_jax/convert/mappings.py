"""Source-name -> parameter-path tables: the one place that knows how other checkpoints name things.

Each rule is `(regex over the source name, fn(match, array) -> [(our path, array)])`. Paths are unscanned
(`layers_{i}`); `strict.load_strict` stacks them for scanned models and checks shapes, so a rule only
states the layout change: torch `Linear` weights are [out, in] and our kernels [in, out...].
"""

from __future__ import annotations

import re
from typing import Callable

import numpy as np

from stllm_jax.convert.strict import Rule

# Named regex groups are renamed through these tables before they fill a path template.
RENAMES = {
    'norm': {'weight': 'scale', 'bias': 'bias'},  # torch LayerNorm / RMSNorm -> ours
    'param': {'weight': 'kernel', 'bias': 'bias'},  # torch Linear -> ours
    'attn': {'attention': 'self_attention', 'crossattention': 'cross_attention'},
    'ffn': {'': 'text_ffn', '_query': 'query_ffn'},
    'proj': {'q': 'query', 'k': 'key', 'v': 'value', 'o': 'out'},
    'llama_norm': {'input_layernorm': 'attention_norm', 'post_attention_layernorm': 'mlp_norm'},
}


def _path(template: str, m: re.Match) -> str:
  """'vision/blocks/layers_{0}/{attn}/{param}' filled from the regex groups (named ones renamed)."""
  return template.format(*m.groups(), **{k: RENAMES[k][v] for k, v in m.groupdict().items()})


def copy(template: str) -> Callable:
  return lambda m, a: [(_path(template, m), a)]


def linear(template: str) -> Callable:
  """torch Linear: weight [out, in] -> kernel [in, out] (split into heads by the loader if needed); a bias
  (when the regex's `param` group says so) is copied."""
  def fn(m, a):
    is_weight = m.groupdict().get('param', 'weight') == 'weight'
    return [(_path(template, m), a.T if is_weight else a)]
  return fn


def conv(template: str) -> Callable:
  """torch Conv2d weight [out, in, kh, kw] -> flax kernel [kh, kw, in, out]."""
  return lambda m, a: [(_path(template, m), a.transpose(2, 3, 1, 0))]


def fused_qv_bias(prefix_template: str) -> Callable:
  """Hugging Face's BLIP qkv bias [3D] = [q_bias, 0, v_bias] -> EVA's `q_bias` and `v_bias`.

  The k part must be zero: EVA has no k bias, so a non-zero one cannot be represented and is refused.
  """

  def fn(m, a):
    q, k, v = np.split(a, 3)
    if np.any(k != 0):
      raise ValueError(f'its k bias is not zero (max |k| = {np.abs(k).max():.3g}); EVA-ViT has no k bias')
    prefix = _path(prefix_template, m)
    return [(f'{prefix}/q_bias', q), (f'{prefix}/v_bias', v)]

  return fn


W_OR_B = r'(?P<param>weight|bias)'
NORM = r'(?P<norm>weight|bias)'


# ---------------------------------------------------------------------------------------------- LLaMA

def llama_rules(source_prefix: str, target_prefix: str) -> list[Rule]:
  """Hugging Face `LlamaForCausalLM` names (after `source_prefix`) -> our `Llama` (under `target_prefix`)."""
  s, t = re.escape(source_prefix), target_prefix
  layer, blocks = rf'{s}model\.layers\.(\d+)\.', t + 'blocks/layers_{0}/'
  return [
      (rf'{s}model\.embed_tokens\.weight', copy(f'{t}embed/embedding')),
      (layer + r'self_attn\.(?P<proj>[qkvo])_proj\.weight', linear(blocks + 'attention/{proj}/kernel')),
      (layer + r'mlp\.(gate|up|down)_proj\.weight', linear(blocks + 'mlp/{1}/kernel')),
      (layer + r'(?P<llama_norm>input_layernorm|post_attention_layernorm)\.weight', copy(blocks + '{llama_norm}/scale')),
      (rf'{s}model\.norm\.weight', copy(f'{t}final_norm/scale')),
      (rf'{s}lm_head\.weight', linear(f'{t}lm_head/kernel')),
  ]


# ---------------------------------------------------------------------------------------- InstructBLIP

def hf_instructblip_rules() -> list[Rule]:
  """Hugging Face `InstructBlipForConditionalGeneration` names -> our `STLLM` tree."""
  vision = r'vision_model\.'
  block, vblock = vision + r'encoder\.layers\.(\d+)\.', 'vision/blocks/layers_{0}/'
  qlayer, qblock = r'qformer\.encoder\.layer\.(\d+)\.', 'qformer/layers_{0}/'
  attn = r'(?P<attn>attention|crossattention)\.'
  return [
      (r'query_tokens', copy('qformer/query_tokens')),
      # EVA-ViT and ln_vision
      (vision + r'embeddings\.class_embedding', copy('vision/cls_token')),
      (vision + r'embeddings\.position_embedding', copy('vision/pos_embed')),
      (vision + r'embeddings\.patch_embedding\.weight', conv('vision/patch_embed/kernel')),
      (vision + r'embeddings\.patch_embedding\.bias', copy('vision/patch_embed/bias')),
      (block + r'layer_norm([12])\.' + NORM, copy(vblock + 'norm{1}/{norm}')),
      (block + r'self_attn\.qkv\.weight', linear(vblock + 'attn/qkv/kernel')),
      (block + r'self_attn\.qkv\.bias', fused_qv_bias(vblock + 'attn')),
      (block + r'self_attn\.projection\.' + W_OR_B, linear(vblock + 'attn/out/{param}')),
      (block + r'mlp\.fc([12])\.' + W_OR_B, linear(vblock + 'fc{1}/{param}')),
      (vision + r'post_layernorm\.' + NORM, copy('ln_vision/{norm}')),
      # Q-Former
      (r'qformer\.embeddings\.(word|position)_embeddings\.weight', copy('qformer/{0}_embeddings/embedding')),
      (r'qformer\.embeddings\.layernorm\.' + NORM, copy('qformer/embed_norm/{norm}')),
      (qlayer + attn + r'attention\.(query|key|value)\.' + W_OR_B, linear(qblock + '{attn}/{2}/{param}')),
      (qlayer + attn + r'output\.dense\.' + W_OR_B, linear(qblock + '{attn}/out/{param}')),
      (qlayer + attn + r'output\.LayerNorm\.' + NORM, copy(qblock + '{attn}/norm/{norm}')),
      (qlayer + r'intermediate(?P<ffn>|_query)\.dense\.' + W_OR_B, linear(qblock + '{ffn}/fc1/{param}')),
      (qlayer + r'output(?P<ffn>|_query)\.dense\.' + W_OR_B, linear(qblock + '{ffn}/fc2/{param}')),
      (qlayer + r'output(?P<ffn>|_query)\.LayerNorm\.' + NORM, copy(qblock + '{ffn}/norm/{norm}')),
      # projection and LLM
      (r'language_projection\.' + W_OR_B, linear('projection/{param}')),
      *llama_rules('language_model.', 'llm/'),
  ]
