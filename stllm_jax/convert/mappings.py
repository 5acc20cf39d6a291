"""Source-name <-> parameter-path tables: the one place that knows how other checkpoints name things.

Each rule is `(regex over the source name, transform)`. A transform is called as `fn(match, array) ->
[(our path, array)]` (what `strict.load_strict` runs) and, where the layout can be written back, has
`inverse(match, get, shape) -> array`: the source tensor of that name and shape rebuilt from our params
(`get(path)` returns one of our arrays). Paths are unscanned (`layers_{i}`); `strict.load_strict` stacks
them for scanned models and checks shapes, so a rule only states the layout change: torch `Linear`
weights are [out, in] and our kernels [in, out...].

Layouts:
  Hugging Face  `InstructBlipForConditionalGeneration` (`hf_instructblip_rules`), `LlamaForCausalLM`
                (`llama_rules`).
  LAVIS         `eva_vit_g.pth` (read under the prefix `visual_encoder.`), `instruct_blip_vicuna7b_trimmed.pth`
                (`ln_vision`, `Qformer.bert`, `query_tokens`, `llm_proj`), plus a Vicuna LLaMA directory
                (`lavis_rules`).
  ST-LLM        the same names under `model.stllm_model.` (projection `llama_proj`), ST-LLM's heads
                (`mvm_decoder`, `down_proj`/`up_proj`), the QA model's BT-Adapter (`visual_encoder.BTAdapter_*`,
                `bt_adapter_rules`) and the LLM (`model.*`, `lm_head`) (`stllm_rules`).
Buffers that some checkpoints carry (BERT `position_ids`, LLaMA `rotary_emb.inv_freq`, ST-LLM's
`residual_index`) are checked against what the model computes, then consumed.

Reports run a rule backwards too: a transform's `source_name(pattern, path)` is the source name it would fill
`path` from, so a parameter no source tensor fills is listed with the tensor the source lacks.
"""

from __future__ import annotations

import dataclasses
import re
import string
from typing import Callable, Iterable

import numpy as np

from stllm_jax.convert import strict
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

Getter = Callable[[str], np.ndarray]


def _path(template: str, m: re.Match) -> str:
  """'vision/blocks/layers_{0}/{attn}/{param}' filled from the regex groups (named ones renamed)."""
  return template.format(*m.groups(), **{k: RENAMES[k][v] for k, v in m.groupdict().items() if v is not None})


def _template_fields(template: str, path: str) -> dict[str, str] | None:
  """The fields of a path template in `path` ('layers_{0}/{attn}' + 'layers_3/self_attention' -> {'0': '3',
  'attn': 'self_attention'}); None if `path` is not of the template's form."""
  regex, seen = [], set()
  for literal, field, _, _ in string.Formatter().parse(template):
    regex.append(re.escape(literal))
    if field is not None:
      regex.append(f'(?P=f_{field})' if field in seen else f'(?P<f_{field}>[^/]*)')
      seen.add(field)
  m = re.fullmatch(''.join(regex), path)
  return None if m is None else {k[len('f_'):]: v for k, v in m.groupdict().items()}


def _group_values(pattern: re.Pattern, fields: dict[str, str]) -> list[str | None]:
  """The text of each group of `pattern` that fills a template with `fields` (None where no field says)."""
  names = {index - 1: name for name, index in pattern.groupindex.items()}
  values = []
  for i in range(pattern.groups):
    name = names.get(i)
    if str(i) in fields:
      values.append(fields[str(i)])
    elif name in fields:
      values.append(next((theirs for theirs, ours in RENAMES[name].items() if ours == fields[name]), None))
    else:
      values.append(None)
  return values


def _group_end(pattern: str, start: int) -> int | None:
  """The index of the ')' closing the group that opens at `start`; None if another group opens inside it."""
  i = start + 1
  while i < len(pattern) and pattern[i] not in '()':
    i += 2 if pattern[i] == '\\' else 1
  return i if i < len(pattern) and pattern[i] == ')' else None


def _fill(pattern: str, values: list[str | None]) -> str | None:
  """The text `pattern` matches when its i-th group matches values[i], for a pattern of escaped literals and
  groups; None if it holds anything else (a class, a quantifier, a nested group) or a value is unknown."""
  out, i, group = [], 0, 0
  while i < len(pattern):
    char = pattern[i]
    if char == '\\' and not pattern[i + 1].isalnum():
      out.append(pattern[i + 1])
      i += 2
    elif char == '(':
      end = _group_end(pattern, i)
      if end is None or values[group] is None or pattern[end + 1:end + 2] in ('?', '*', '+', '{'):
        return None
      out.append(values[group])
      group, i = group + 1, end + 1
    elif char in '\\.^$*+?{}[]|)':
      return None
    else:
      out.append(char)
      i += 1
  return ''.join(out)


def source_name(pattern: str, template: str, path: str) -> str | None:
  """The source name that `pattern` matches and that fills `template` as `path`, or None."""
  fields = _template_fields(template, path)
  if fields is None:
    return None
  compiled = re.compile(pattern)
  name = _fill(pattern, _group_values(compiled, fields))
  m = compiled.fullmatch(name) if name is not None else None
  return name if m and _path(template, m) == path else None


# ------------------------------------------------------------------------------------------ transforms

@dataclasses.dataclass(frozen=True)
class Copy:
  """Same values, same order (reshaped only by splitting dims, e.g. [D] -> [heads, head_dim])."""
  template: str

  def __call__(self, m: re.Match, a: np.ndarray) -> list[tuple[str, np.ndarray]]:
    return [(_path(self.template, m), a)]

  def inverse(self, m: re.Match, get: Getter, shape: tuple[int, ...]) -> np.ndarray:
    return get(_path(self.template, m)).reshape(shape)

  def source_name(self, pattern: str, path: str) -> str | None:
    return source_name(pattern, self.template, path)


@dataclasses.dataclass(frozen=True)
class Linear(Copy):
  """torch Linear: weight [out, in] -> kernel [in, out] (split into heads by the loader if needed); a bias
  (when the regex's `param` group says so) is copied."""

  @staticmethod
  def _is_weight(m: re.Match) -> bool:
    return m.groupdict().get('param', 'weight') == 'weight'

  def __call__(self, m, a):
    return [(_path(self.template, m), a.T if self._is_weight(m) else a)]

  def inverse(self, m, get, shape):
    value = get(_path(self.template, m))
    return value.reshape(shape[::-1]).T if self._is_weight(m) else value.reshape(shape)


@dataclasses.dataclass(frozen=True)
class Conv(Copy):
  """torch Conv2d weight [out, in, kh, kw] <-> flax kernel [kh, kw, in, out]."""

  def __call__(self, m, a):
    return [(_path(self.template, m), a.transpose(2, 3, 1, 0))]

  def inverse(self, m, get, shape):
    return get(_path(self.template, m)).transpose(3, 2, 0, 1).reshape(shape)


@dataclasses.dataclass(frozen=True)
class FusedQVBias(Copy):
  """Hugging Face's BLIP qkv bias [3D] = [q_bias, k_bias, v_bias] <-> EVA's `q_bias` and `v_bias`.

  EVA has no k bias, and needs none: a k bias adds q . k_bias to every score of a query row, the same value
  across the row, which softmax cancels exactly. It is dropped (`k_bias_maxima` finds non-zero ones to say so)
  and written back as zeros.
  """

  def __call__(self, m, a):
    q, _, v = np.split(a, 3)
    prefix = _path(self.template, m)
    return [(f'{prefix}/q_bias', q), (f'{prefix}/v_bias', v)]

  def inverse(self, m, get, shape):
    prefix = _path(self.template, m)
    q, v = get(f'{prefix}/q_bias').reshape(-1), get(f'{prefix}/v_bias').reshape(-1)
    return np.concatenate([q, np.zeros_like(q), v]).reshape(shape)

  def source_name(self, pattern, path):
    prefix, _, leaf = path.rpartition('/')
    return source_name(pattern, self.template, prefix) if leaf in ('q_bias', 'v_bias') else None


def with_mean_rows(a: np.ndarray, new_rows: int) -> np.ndarray:
  """[rows, D] -> [rows + new_rows, D]: each new row the mean of the existing rows (computed in float64)."""
  mean = a.astype(np.float64).mean(axis=0, keepdims=True).astype(a.dtype)
  return np.concatenate([a] + [mean] * new_rows, axis=0)


@dataclasses.dataclass(frozen=True)
class WithMeanRows(Copy):
  """An embedding or LM-head matrix [rows, D] grown by `new_rows` rows, each the mean of the existing rows
  (computed in float64): how the `[PAD]` row (id 32000) joins Vicuna's 32000-row vocabulary. The mean keeps
  the new token's embedding and logit in the range of the others; it is trained (or never attended to:
  `[PAD]` positions are masked). `transpose`: the target is a kernel [D, rows] (the LM head)."""
  new_rows: int = 1
  transpose: bool = False

  def __call__(self, m, a):
    grown = with_mean_rows(a, self.new_rows)
    return [(_path(self.template, m), grown.T if self.transpose else grown)]

  def inverse(self, m, get, shape):
    value = get(_path(self.template, m))
    return (value.T if self.transpose else value).reshape(shape)


@dataclasses.dataclass(frozen=True)
class SameAs(Copy):
  """A second copy of a tensor (ST-LLM saves the LLM's embedding again under its vision module): it must
  equal the tensor that fills `template`; nothing is stored."""

  def __call__(self, m, a):
    return [(strict.same_as(_path(self.template, m)), a)]

  def source_name(self, pattern, path):
    return None  # `template` is the original's path, filled from another tensor


@dataclasses.dataclass(frozen=True)
class Check:
  """A buffer the model computes itself: consumed after `expected(array)` confirms its value (it returns
  an error message, or '' when the buffer is what the model computes)."""
  expected: Callable[[np.ndarray], str]

  def __call__(self, m, a):
    problem = self.expected(a)
    if problem:
      raise ValueError(problem)
    return []


@dataclasses.dataclass(frozen=True)
class Drop:
  """A tensor the model deliberately does not use (BLIP-2 keeps 39 of EVA-ViT-g's 40 blocks)."""
  reason: str

  def __call__(self, m, a):
    return []


def copy(template: str) -> Copy:
  return Copy(template)


def linear(template: str) -> Linear:
  return Linear(template)


def conv(template: str) -> Conv:
  return Conv(template)


def fused_qv_bias(prefix_template: str) -> FusedQVBias:
  return FusedQVBias(prefix_template)


W_OR_B = r'(?P<param>weight|bias)'
NORM = r'(?P<norm>weight|bias)'


# ------------------------------------------------------------------------------------------- buffers

def positions_buffer(a: np.ndarray) -> str:
  """BERT's `position_ids` buffer: [[0, 1, ..., n-1]]."""
  if not np.array_equal(a.reshape(-1), np.arange(a.size)):
    return 'position_ids is not 0, 1, ..., n-1; this Q-Former does not use plain absolute positions'
  return ''


def rope_inv_freq(head_dim: int, theta: float) -> Callable[[np.ndarray], str]:
  """LLaMA's `rotary_emb.inv_freq` buffer (saved by transformers < 4.31) must match the config's RoPE."""
  expected = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))

  def check(a: np.ndarray) -> str:
    a = a.astype(np.float64).reshape(-1)
    if a.shape != expected.shape or not np.allclose(a, expected, rtol=1e-2, atol=0):
      return (f'rotary_emb.inv_freq does not match RoPE with head dim {head_dim} and theta {theta:g} '
              '(the checkpoint uses another RoPE than its config.json says)')
    return ''

  return check


def local_frames_buffer(num_local_frames: int) -> Callable[[np.ndarray], str]:
  """ST-LLM's `residual_index` buffer: the local frames of global-local input (one per local frame)."""
  def check(a: np.ndarray) -> str:
    if a.size != num_local_frames:
      return f'residual_index selects {a.size} local frames, but model.num_local_frames is {num_local_frames}'
    return ''
  return check


# ---------------------------------------------------------------------------------------------- LLaMA

def llama_rules(source_prefix: str, target_prefix: str, inv_freq: Callable[[np.ndarray], str] | None = None,
                new_vocab_rows: int = 0) -> list[Rule]:
  """Hugging Face `LlamaForCausalLM` names (after `source_prefix`) -> our `Llama` (under `target_prefix`).

  `inv_freq`: the check for old checkpoints' `rotary_emb.inv_freq` buffers (None: such buffers are refused);
  `new_vocab_rows`: rows appended to the embedding and LM head (`WithMeanRows`).
  """
  s, t = re.escape(source_prefix), target_prefix
  layer, blocks = rf'{s}model\.layers\.(\d+)\.', t + 'blocks/layers_{0}/'
  embed, head = f'{t}embed/embedding', f'{t}lm_head/kernel'
  rules = [
      (rf'{s}model\.embed_tokens\.weight', WithMeanRows(embed, new_vocab_rows) if new_vocab_rows else copy(embed)),
      (layer + r'self_attn\.(?P<proj>[qkvo])_proj\.weight', linear(blocks + 'attention/{proj}/kernel')),
      (layer + r'mlp\.(gate|up|down)_proj\.weight', linear(blocks + 'mlp/{1}/kernel')),
      (layer + r'(?P<llama_norm>input_layernorm|post_attention_layernorm)\.weight', copy(blocks + '{llama_norm}/scale')),
      (rf'{s}model\.norm\.weight', copy(f'{t}final_norm/scale')),
      (rf'{s}lm_head\.weight', WithMeanRows(head, new_vocab_rows, transpose=True) if new_vocab_rows else linear(head)),
  ]
  if inv_freq is not None:
    rules.append((rf'{s}model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq', Check(inv_freq)))
  return rules


# ---------------------------------------------------------------------------------------- InstructBLIP

HF_QKV_BIAS = r'vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias'


def k_bias_maxima(qkv_biases: Iterable[tuple[str, np.ndarray]]) -> dict[int, float]:
  """{ViT layer: max |k bias|} of the fused qkv biases (`HF_QKV_BIAS`) whose k third is not zero."""
  maxima = {}
  for name, bias in qkv_biases:
    if bias.ndim == 1 and bias.size % 3 == 0:  # any other shape is reported by the strict load
      k_max = float(np.abs(np.split(bias.astype(np.float32), 3)[1]).max())
      if k_max:
        maxima[int(re.fullmatch(HF_QKV_BIAS, name).group(1))] = k_max
  return maxima


def hf_instructblip_rules(inv_freq: Callable[[np.ndarray], str] | None = None) -> list[Rule]:
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
      (HF_QKV_BIAS, fused_qv_bias(vblock + 'attn')),
      (block + r'self_attn\.projection\.' + W_OR_B, linear(vblock + 'attn/out/{param}')),
      (block + r'mlp\.fc([12])\.' + W_OR_B, linear(vblock + 'fc{1}/{param}')),
      (vision + r'post_layernorm\.' + NORM, copy('ln_vision/{norm}')),
      # Q-Former
      (r'qformer\.embeddings\.(word|position)_embeddings\.weight', copy('qformer/{0}_embeddings/embedding')),
      (r'qformer\.embeddings\.layernorm\.' + NORM, copy('qformer/embed_norm/{norm}')),
      (r'qformer\.embeddings\.position_ids', Check(positions_buffer)),
      (qlayer + attn + r'attention\.(query|key|value)\.' + W_OR_B, linear(qblock + '{attn}/{2}/{param}')),
      (qlayer + attn + r'output\.dense\.' + W_OR_B, linear(qblock + '{attn}/out/{param}')),
      (qlayer + attn + r'output\.LayerNorm\.' + NORM, copy(qblock + '{attn}/norm/{norm}')),
      (qlayer + r'intermediate(?P<ffn>|_query)\.dense\.' + W_OR_B, linear(qblock + '{ffn}/fc1/{param}')),
      (qlayer + r'output(?P<ffn>|_query)\.dense\.' + W_OR_B, linear(qblock + '{ffn}/fc2/{param}')),
      (qlayer + r'output(?P<ffn>|_query)\.LayerNorm\.' + NORM, copy(qblock + '{ffn}/norm/{norm}')),
      # projection and LLM
      (r'language_projection\.' + W_OR_B, linear('projection/{param}')),
      *llama_rules('language_model.', 'llm/', inv_freq),
  ]


# ------------------------------------------------------------------------------ LAVIS / EVA / ST-LLM

def eva_vit_rules(prefix: str, dropped_block: int | None = None) -> list[Rule]:
  """LAVIS/EVA `VisionTransformer` names (`cls_token`, `blocks.N.attn.q_bias`, ...) after `prefix`.

  `dropped_block`: the index of a block the model does not have (39 in `eva_vit_g.pth`: BLIP-2 uses the
  output of block 38); only that one is dropped, any other extra block is reported as unused.
  """
  p = re.escape(prefix)
  block, vblock = p + r'blocks\.(\d+)\.', 'vision/blocks/layers_{0}/'
  dropped = [] if dropped_block is None else [
      (p + rf'blocks\.{dropped_block}\..+', Drop(f'EVA-ViT-g block {dropped_block}: BLIP-2 uses the blocks before it'))]
  return dropped + [
      (p + r'cls_token', copy('vision/cls_token')),
      (p + r'pos_embed', copy('vision/pos_embed')),
      (p + r'patch_embed\.proj\.weight', conv('vision/patch_embed/kernel')),
      (p + r'patch_embed\.proj\.bias', copy('vision/patch_embed/bias')),
      (block + r'norm([12])\.' + NORM, copy(vblock + 'norm{1}/{norm}')),
      (block + r'attn\.qkv\.weight', linear(vblock + 'attn/qkv/kernel')),
      (block + r'attn\.([qv])_bias', copy(vblock + 'attn/{1}_bias')),
      (block + r'attn\.proj\.' + W_OR_B, linear(vblock + 'attn/out/{param}')),
      (block + r'mlp\.fc([12])\.' + W_OR_B, linear(vblock + 'fc{1}/{param}')),
  ]


def lavis_qformer_rules(prefix: str) -> list[Rule]:
  """LAVIS `Qformer.bert.*` (a BertModel with query FFNs) and `query_tokens`, after `prefix`."""
  p = re.escape(prefix)
  bert = p + r'Qformer\.bert\.'
  qlayer, qblock = bert + r'encoder\.layer\.(\d+)\.', 'qformer/layers_{0}/'
  attn = r'(?P<attn>attention|crossattention)\.'
  return [
      (p + r'query_tokens', copy('qformer/query_tokens')),
      (bert + r'embeddings\.(word|position)_embeddings\.weight', copy('qformer/{0}_embeddings/embedding')),
      (bert + r'embeddings\.LayerNorm\.' + NORM, copy('qformer/embed_norm/{norm}')),
      (bert + r'embeddings\.position_ids', Check(positions_buffer)),
      (qlayer + attn + r'self\.(query|key|value)\.' + W_OR_B, linear(qblock + '{attn}/{2}/{param}')),
      (qlayer + attn + r'output\.dense\.' + W_OR_B, linear(qblock + '{attn}/out/{param}')),
      (qlayer + attn + r'output\.LayerNorm\.' + NORM, copy(qblock + '{attn}/norm/{norm}')),
      (qlayer + r'intermediate(?P<ffn>|_query)\.dense\.' + W_OR_B, linear(qblock + '{ffn}/fc1/{param}')),
      (qlayer + r'output(?P<ffn>|_query)\.dense\.' + W_OR_B, linear(qblock + '{ffn}/fc2/{param}')),
      (qlayer + r'output(?P<ffn>|_query)\.LayerNorm\.' + NORM, copy(qblock + '{ffn}/norm/{norm}')),
  ]


def lavis_vision_language_rules(prefix: str, projection: str, dropped_block: int | None = None) -> list[Rule]:
  """EVA-ViT (`visual_encoder.`), `ln_vision`, the Q-Former and the projection to the LLM, after `prefix`."""
  p = re.escape(prefix)
  return [
      *eva_vit_rules(prefix + 'visual_encoder.', dropped_block),
      (p + r'ln_vision\.' + NORM, copy('ln_vision/{norm}')),
      *lavis_qformer_rules(prefix),
      (p + re.escape(projection) + r'\.' + W_OR_B, linear('projection/{param}')),
  ]


def lavis_rules(dropped_vit_block: int, inv_freq: Callable[[np.ndarray], str] | None,
                new_vocab_rows: int) -> list[Rule]:
  """The paper's starting point: `eva_vit_g.pth` (keys read under `visual_encoder.`), InstructBLIP's trimmed
  checkpoint (`ln_vision`, `Qformer.bert`, `query_tokens`, `llm_proj`) and a Vicuna directory (`model.*`,
  `lm_head.weight`) whose vocabulary grows by `new_vocab_rows` ([PAD])."""
  return [*lavis_vision_language_rules('', 'llm_proj', dropped_vit_block),
          *llama_rules('', 'llm/', inv_freq, new_vocab_rows)]


STLLM_PREFIX = 'model.stllm_model.'
BT_ADAPTER_PREFIX = 'visual_encoder.'  # where ST-LLM's QA model keeps its BT-Adapter (inside the vision tower)
BT_ADAPTER_POSITION = 'BTAdapter_position.weight'  # the frame-position table: one row per frame


def bt_adapter_rules(prefix: str) -> list[Rule]:
  """The BT-Adapter of ST-LLM's QA model (`stllm/models/eva_btadapter.py`): `BTAdapter_*` after `prefix`
  (`visual_encoder.` in a checkpoint) -> our `bt_adapter/` (see `stllm_jax.models.bt_adapter`).

  Temporal layers `BTAdapter_T.k` hold norm1, an EVA attention and `temporal_fc`; spatial layers
  `BTAdapter_S.k` are whole EVA blocks (the ViT block rules' names under another prefix).
  """
  p = re.escape(prefix)
  temporal, ours_t = p + r'BTAdapter_T\.(\d+)\.', 'bt_adapter/temporal_{0}/'
  spatial, ours_s = p + r'BTAdapter_S\.(\d+)\.', 'bt_adapter/spatial_{0}/'

  def attention(layer: str, ours: str) -> list[Rule]:
    return [(layer + r'attn\.qkv\.weight', linear(ours + 'attn/qkv/kernel')),
            (layer + r'attn\.([qv])_bias', copy(ours + 'attn/{1}_bias')),
            (layer + r'attn\.proj\.' + W_OR_B, linear(ours + 'attn/out/{param}'))]

  return [
      (p + r'BTAdapter_cls', copy('bt_adapter/cls_token')),
      (p + re.escape(BT_ADAPTER_POSITION), copy('bt_adapter/frame_position')),
      (temporal + r'norm1\.' + NORM, copy(ours_t + 'norm1/{norm}')),
      *attention(temporal, ours_t),
      (temporal + r'temporal_fc\.' + W_OR_B, linear(ours_t + 'temporal_fc/{param}')),
      (spatial + r'norm([12])\.' + NORM, copy(ours_s + 'norm{1}/{norm}')),
      *attention(spatial, ours_s),
      (spatial + r'mlp\.fc([12])\.' + W_OR_B, linear(ours_s + 'fc{1}/{param}')),
  ]


# our module -> (ST-LLM module name, torch module type): the side file `export-hf` writes uses these names.
STLLM_HEADS = {'mvm_dense': ('mvm_decoder.head', 'linear'), 'mvm_norm': ('mvm_decoder.norm', 'norm'),
               'global_down': ('down_proj', 'linear'), 'global_up': ('up_proj', 'linear')}
# our top-level modules that are ST-LLM's own (InstructBLIP has none of them): `export-hf` writes them to its
# side file, the heads of STLLM_HEADS and the QA model's BT-Adapter
STLLM_OWN_MODULES = (*STLLM_HEADS, 'bt_adapter')


def stllm_head_tensors(flat_shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, tuple[int, ...]]]:
  """(ST-LLM name, torch shape) of every head tensor among our params `flat_shapes` ({path: shape})."""
  out = []
  for ours, (theirs, kind) in STLLM_HEADS.items():
    if kind == 'linear' and f'{ours}/kernel' in flat_shapes:
      out += [(f'{theirs}.weight', flat_shapes[f'{ours}/kernel'][::-1]), (f'{theirs}.bias', flat_shapes[f'{ours}/bias'])]
    elif kind == 'norm' and f'{ours}/scale' in flat_shapes:
      out += [(f'{theirs}.weight', flat_shapes[f'{ours}/scale']), (f'{theirs}.bias', flat_shapes[f'{ours}/bias'])]
  return out


def stllm_head_rules(prefix: str) -> list[Rule]:
  """ST-LLM's own modules: the MVM head (`mvm_decoder.head` Linear, `mvm_decoder.norm` LayerNorm), the
  global-local MLP f_m (`down_proj`, `up_proj`) and the QA model's BT-Adapter (`visual_encoder.BTAdapter_*`),
  after `prefix`."""
  p = re.escape(prefix)
  return [
      (p + r'mvm_decoder\.head\.' + W_OR_B, linear('mvm_dense/{param}')),
      (p + r'mvm_decoder\.norm\.' + NORM, copy('mvm_norm/{norm}')),
      (p + r'(down|up)_proj\.' + W_OR_B, linear('global_{0}/{param}')),
      *bt_adapter_rules(prefix + BT_ADAPTER_PREFIX),
  ]


def stllm_rules(inv_freq: Callable[[np.ndarray], str] | None, num_local_frames: int) -> list[Rule]:
  """A released ST-LLM checkpoint: the LLM (`model.*`, `lm_head.weight`) and everything else under
  `model.stllm_model.` (its copy of the LLM embedding included)."""
  p = re.escape(STLLM_PREFIX)
  return [
      *lavis_vision_language_rules(STLLM_PREFIX, 'llama_proj'),
      *stllm_head_rules(STLLM_PREFIX),
      (p + r'embed_tokens\.weight', SameAs('llm/embed/embedding')),
      (p + r'residual_index', Check(local_frames_buffer(num_local_frames))),
      *llama_rules('', 'llm/', inv_freq),
  ]


def bt_adapter_depth(names: Iterable[str], prefix: str) -> int:
  """The BT-Adapter's number of layer pairs: how many temporal layers `BTAdapter_T.k` there are among the
  source `names` (after `prefix`); 0 without an adapter. A gap in k or a spatial layer too many is left to the
  strict load, which names the tensors."""
  temporal = re.compile(re.escape(prefix) + r'BTAdapter_T\.(\d+)\..+')
  return len({m.group(1) for name in names if (m := temporal.fullmatch(name))})


# -------------------------------------------------------------------------- writing a layout back out

def export_tensor(rules: list[Rule], name: str, shape: tuple[int, ...], get: Getter) -> np.ndarray:
  """The source tensor `name` of `shape` rebuilt from our params through the rule that reads it."""
  for pattern, transform in rules:
    m = re.fullmatch(pattern, name)
    if m:
      if not hasattr(transform, 'inverse') or isinstance(transform, (SameAs, Check, Drop)):
        raise ValueError(f'{name} cannot be written back ({type(transform).__name__} rule)')
      return transform.inverse(m, get, tuple(shape))
  raise ValueError(f'no rule names {name}')


# ------------------------------------------------------- the HF conversion of LAVIS names (for `verify`)

# LAVIS / ST-LLM names -> Hugging Face InstructBLIP names, as a plain rename (the q/v biases are fused by
# the caller). `verify` builds its PyTorch reference from these, independently of the rules above, so a
# rule that sends a tensor to the wrong place shows up as a logit error.
LAVIS_TO_HF_RENAMES = (
    (r'^visual_encoder\.cls_token$', 'vision_model.embeddings.class_embedding'),
    (r'^visual_encoder\.pos_embed$', 'vision_model.embeddings.position_embedding'),
    (r'^visual_encoder\.patch_embed\.proj\.', 'vision_model.embeddings.patch_embedding.'),
    (r'^visual_encoder\.blocks\.(\d+)\.norm([12])\.', r'vision_model.encoder.layers.\1.layer_norm\2.'),
    (r'^visual_encoder\.blocks\.(\d+)\.attn\.qkv\.', r'vision_model.encoder.layers.\1.self_attn.qkv.'),
    (r'^visual_encoder\.blocks\.(\d+)\.attn\.proj\.', r'vision_model.encoder.layers.\1.self_attn.projection.'),
    (r'^visual_encoder\.blocks\.(\d+)\.mlp\.', r'vision_model.encoder.layers.\1.mlp.'),
    (r'^ln_vision\.', 'vision_model.post_layernorm.'),
    (r'^Qformer\.bert\.embeddings\.LayerNorm\.', 'qformer.embeddings.layernorm.'),
    (r'^Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.', r'qformer.encoder.layer.\1.\2.attention.'),
    (r'^Qformer\.bert\.', 'qformer.'),
    (r'^(llm_proj|llama_proj)\.', 'language_projection.'),
    (r'^model\.', 'language_model.model.'),
    (r'^lm_head\.', 'language_model.lm_head.'),
)


def lavis_name_to_hf(name: str) -> str:
  """'Qformer.bert.encoder.layer.0.attention.self.query.weight' -> 'qformer.encoder.layer.0.attention.attention.query.weight'."""
  for pattern, replacement in LAVIS_TO_HF_RENAMES:
    renamed, n = re.subn(pattern, replacement, name)
    if n:
      return renamed
  return name
