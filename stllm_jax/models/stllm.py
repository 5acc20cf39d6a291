"""ST-LLM: every spatio-temporal video token goes into the LLM.

    frames [B, T, H, W, 3] --EVA-ViT--> [B*T, 257, Dv] --ln_vision--> --Q-Former(+instruction)--> [B*T, K, Dq]
      --projection--> frame tokens [B, T, K, D] --arrange_video--> visual tokens V [B, Nv, D]
      --[V : text embeddings]--> LLaMA --> logits [B, Nv + L, vocab]

`video_input` picks how frame tokens become V: `all` concatenates them in time order (Nv = T*K, the
paper's method); `mean` averages over frames (Nv = K, the paper's baseline); `global_local` (for long
videos) averages all T frames into V0, takes `num_local_frames` of them (segment middles) and adds
f_m(V0) = up(ReLU(down(V0))) to each, with `up` zero-initialised (Nv = num_local_frames*K). There are no
separators and no frame or time embeddings: RoPE over the flat sequence carries the order. The training
step composes the same methods with the dynamic-masking gather between `visual_tokens` and `embed_inputs`.

Contract (stable): `STLLM(config.model).apply({'params': params}, batch)` with `batch` holding
`frames` [B, T, H, W, 3] channels-last, uint8 RGB (normalised here, `normalized_frames`) or float already
normalised (`transforms.normalize`), `qformer_input_ids` / `qformer_attention_mask`
int32 [B, Lq], `input_ids` / `attention_mask` int32 [B, L] (the text after the visual tokens); it returns
float32 logits [B, Nv + L, vocab].

With `model.vision.bt_adapter.depth` > 0 the BT-Adapter (`bt_adapter.py`, params `bt_adapter/`) mixes the
frames of each video beside the ViT (ST-LLM's QA / MVBench model). Training mode is explicit:
`apply(..., deterministic=False, rngs={'dropout': key})` turns on the Q-Former's dropout
(`model.qformer.dropout`) and the adapter's drop path; every call without it is deterministic.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from stllm_jax import configlib
from stllm_jax.data import transforms
from stllm_jax.models import layers
from stllm_jax.models.bt_adapter import BTAdapter
from stllm_jax.models.eva_vit import EVAViT, VisionConfig
from stllm_jax.models.layers import Array
from stllm_jax.models.llama import Llama, LlamaConfig
from stllm_jax.models.qformer import QFormer, QFormerConfig

VIDEO_INPUTS = ('all', 'mean', 'global_local')
ATTENTION_IMPLS = {'auto': None, 'explicit': 'explicit', 'xla': 'xla', 'cudnn': 'cudnn'}
BATCH_KEYS = ('frames', 'qformer_input_ids', 'qformer_attention_mask', 'input_ids', 'attention_mask')


@dataclasses.dataclass(frozen=True)
class STLLMConfig:
  """Defaults are the paper's 7B model (InstructBLIP-Vicuna-7B base)."""
  vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
  qformer: QFormerConfig = dataclasses.field(default_factory=QFormerConfig)
  llm: LlamaConfig = dataclasses.field(default_factory=LlamaConfig)
  ln_vision_eps: float = 1e-5  # LAVIS; Hugging Face InstructBLIP uses the vision eps (1e-6)
  video_input: str = 'all'
  num_local_frames: int = 16  # global_local: frames kept as spatio-temporal tokens
  global_mlp_dim: int = 1024  # global_local: hidden width of f_m
  mvm_head: bool = False  # the masked-video-modelling head (Linear D->D, LayerNorm), used in training only
  mvm_norm_eps: float = 1e-5
  dtype: str = 'float32'  # compute dtype of every tower; 'bfloat16' on accelerators
  attention_impl: str = 'auto'  # 'auto' | 'explicit' | 'xla' | 'cudnn' (layers.attention)

  def validate(self) -> None:
    self.vision.validate('model.vision')
    self.qformer.validate('model.qformer')
    self.llm.validate('model.llm')
    if self.video_input not in VIDEO_INPUTS:
      raise ValueError(f'model.video_input={self.video_input!r}; choose one of {VIDEO_INPUTS}')
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f'model.attention_impl={self.attention_impl!r}; choose one of {tuple(ATTENTION_IMPLS)}')
    layers.as_dtype(self.dtype)

  def num_visual_tokens(self, num_frames: int) -> int:
    """Visual tokens the LLM sees for `num_frames` frames (before any masking)."""
    k = self.qformer.num_query_tokens
    return {'all': num_frames * k, 'mean': k, 'global_local': self.num_local_frames * k}[self.video_input]


def model_config(config: Any) -> STLLMConfig:
  """`config.model` (ConfigDict, dict or STLLMConfig) -> validated STLLMConfig."""
  cfg = configlib.from_dict(STLLMConfig, config, 'model')
  cfg.validate()
  return cfg


def default_config() -> ml_collections.ConfigDict:
  """The 7B model as a ConfigDict, for config files to start from."""
  return configlib.to_config_dict(STLLMConfig())


def local_frame_indices(num_frames: int, num_local: int) -> np.ndarray:
  """Middles of `num_local` equal segments of `num_frames` frames (64 -> 16: 2, 6, ..., 62).

  The released model's formula, int(seg / 2 + round(seg * i)) with seg = num_frames / num_local (its
  `get_residual_index`); it differs from int((i + 0.5) * seg) by one frame for some counts (T=20 -> 5).
  """
  if num_frames < num_local:
    raise ValueError(f'global_local input needs at least num_local_frames={num_local} frames, got {num_frames}')
  seg = num_frames / num_local
  return np.array([int(seg / 2 + np.round(seg * i)) for i in range(num_local)], np.int32)


def normalized_frames(frames: Array) -> Array:
  """uint8 RGB frames -> CLIP-normalised float32 by table lookup (`transforms.UINT8_NORMALIZED`): the same bits as
  `transforms.normalize` on the host, on every backend (arithmetic here could be contracted into FMAs). Float
  frames are taken as normalised already and returned as they are."""
  if frames.dtype != jnp.uint8:
    return frames
  return jnp.asarray(transforms.UINT8_NORMALIZED)[frames.astype(jnp.int32), jnp.arange(3)]  # [..., 3] float32


def check_batch(batch: Mapping[str, Any]) -> None:
  """Names any missing key or inconsistent shape in a model batch."""
  missing = [k for k in BATCH_KEYS if k not in batch]
  if missing:
    raise KeyError(f'the batch lacks {missing}; a model batch holds {list(BATCH_KEYS)}')
  frames = batch['frames']
  if frames.ndim != 5:
    raise ValueError(f'batch["frames"] must be [B, T, H, W, 3], got shape {tuple(frames.shape)}')
  if not (frames.dtype == np.uint8 or jnp.issubdtype(frames.dtype, jnp.floating)):
    raise ValueError(f'batch["frames"] must be uint8 RGB or normalised float frames, got {frames.dtype}')
  b = frames.shape[0]
  for pair in (('qformer_input_ids', 'qformer_attention_mask'), ('input_ids', 'attention_mask')):
    shapes = [tuple(batch[k].shape) for k in pair]
    if len(shapes[0]) != 2 or shapes[0] != shapes[1] or shapes[0][0] != b:
      raise ValueError(f'batch[{pair[0]!r}] and batch[{pair[1]!r}] must both be [B={b}, L], got {shapes}')


class STLLM(nn.Module):
  config: Any  # config.model: ConfigDict, dict or STLLMConfig

  def setup(self):
    cfg = self.cfg = model_config(self.config)
    dtype = layers.as_dtype(cfg.dtype)
    impl = ATTENTION_IMPLS[cfg.attention_impl]
    self.vision = EVAViT(cfg.vision, dtype, impl)
    if cfg.vision.bt_adapter.depth:
      self.bt_adapter = BTAdapter(cfg.vision, dtype, impl)
    # ln_vision is computed in float32 (as LAVIS does); its output is cast to the compute dtype.
    self.ln_vision = layers.LayerNorm(cfg.ln_vision_eps, dtype=dtype, param_dtype=layers.as_dtype(cfg.vision.param_dtype))
    self.qformer = QFormer(cfg.qformer, dtype, impl)
    self.projection = layers.dense(cfg.llm.width, ('source_embed', 'embed'), dtype=dtype,
                                   param_dtype=layers.as_dtype(cfg.llm.param_dtype), init_std=cfg.llm.init_std)
    self.llm = Llama(cfg.llm, dtype, impl)
    pdt = layers.as_dtype(cfg.llm.param_dtype)
    # The parts the released code adds to InstructBLIP start as it starts them: down_proj's weight as PyTorch's
    # Linear default with a zero bias, up_proj all zeros (f_m starts at zero), the MVM head's Linear wholly
    # PyTorch's default.
    torch_default = layers.torch_linear_init(cfg.llm.width)
    if cfg.video_input == 'global_local':
      self.global_down = layers.Dense(cfg.global_mlp_dim, ('embed', 'mlp'), dtype=dtype, param_dtype=pdt,
                                      kernel_init=torch_default)
      self.global_up = layers.Dense(cfg.llm.width, ('mlp', 'embed'), dtype=dtype, param_dtype=pdt,
                                    kernel_init=nn.initializers.zeros)
    if cfg.mvm_head:
      self.mvm_dense = layers.Dense(cfg.llm.width, ('embed', 'mlp'), dtype=dtype, param_dtype=pdt,
                                    kernel_init=torch_default, bias_init=torch_default)
      self.mvm_norm = layers.LayerNorm(cfg.mvm_norm_eps, dtype=dtype, param_dtype=pdt)

  def vision_tokens(self, frames: Array, deterministic: bool = True) -> Array:
    """frames [B, T, H, W, 3] (uint8 or normalised float) -> the vision tower's tokens [B*T, 257, Dv] (before
    ln_vision), through the BT-Adapter when the model has one (it sees the T frames of each video together)."""
    b, t = frames.shape[:2]
    images = normalized_frames(frames).reshape(b * t, *frames.shape[2:])  # [B*T, H, W, 3]
    depth = self.cfg.vision.bt_adapter.depth
    if not depth:
      return self.vision(images)
    last_blocks, pos_embed = self.vision(images, last_blocks=depth)  # [depth, B*T, 257, Dv], [1, 257, Dv]
    tokens = self.bt_adapter(last_blocks.reshape(depth, b, t, *last_blocks.shape[2:]), pos_embed,
                             deterministic)  # [B, T, 257, Dv]
    return tokens.reshape(b * t, *tokens.shape[2:])

  def encode_frames(self, frames: Array, qformer_input_ids: Array, qformer_attention_mask: Array,
                    deterministic: bool = True) -> Array:
    """frames [B, T, H, W, 3] -> frame tokens [B, T, K, D]; the same instruction is used for every frame."""
    self._check_training_rng(deterministic)
    b, t = frames.shape[:2]
    image_tokens = self.ln_vision(self.vision_tokens(frames, deterministic))  # [B*T, 257, Dv]
    queries = self.qformer(image_tokens, jnp.repeat(qformer_input_ids, t, axis=0),
                           jnp.repeat(qformer_attention_mask, t, axis=0), deterministic)  # [B*T, K, Dq]
    tokens = self.projection(queries)  # [B*T, K, D]
    return tokens.reshape(b, t, *tokens.shape[1:])

  def _check_training_rng(self, deterministic: bool) -> None:
    """Training mode with dropout or drop path to apply needs a 'dropout' rng: say so plainly."""
    adapter = self.cfg.vision.bt_adapter
    stochastic = self.cfg.qformer.dropout > 0 or (adapter.depth > 0 and adapter.drop_path > 0)
    if not deterministic and stochastic and not self.has_rng('dropout'):
      raise ValueError("training mode (deterministic=False) applies dropout / drop path and needs a 'dropout' "
                       "rng: apply(..., deterministic=False, rngs={'dropout': key})")

  def arrange_video(self, frame_tokens: Array) -> Array:
    """frame tokens [B, T, K, D] -> visual tokens V [B, Nv, D] according to `video_input`."""
    b, t, k, d = frame_tokens.shape
    mode = self.cfg.video_input
    if mode == 'mean':
      return jnp.mean(frame_tokens, axis=1)  # [B, K, D]
    if mode == 'global_local':
      global_tokens = jnp.mean(frame_tokens, axis=1)  # V0 [B, K, D]
      residual = self.global_up(nn.relu(self.global_down(global_tokens)))  # f_m(V0) [B, K, D]
      frame_tokens = frame_tokens[:, local_frame_indices(t, self.cfg.num_local_frames)] + residual[:, None]
      t = self.cfg.num_local_frames
    return frame_tokens.reshape(b, t * k, d)  # time-major: frame 0's K tokens, then frame 1's...

  def visual_tokens(self, batch: Mapping[str, Array], deterministic: bool = True) -> Array:
    """The batch's video as the LLM's visual tokens V [B, Nv, D] (no masking)."""
    return self.arrange_video(self.encode_frames(batch['frames'], batch['qformer_input_ids'],
                                                 batch['qformer_attention_mask'], deterministic))

  def mvm_head(self, hidden: Array) -> Array:
    """The student side of masked video modelling: LayerNorm(Linear(hidden)), [B, N, D]."""
    return self.mvm_norm(self.mvm_dense(hidden))

  def embed_inputs(self, visual_tokens: Array, input_ids: Array, attention_mask: Array) -> tuple[Array, Array]:
    """[V : C]: visual tokens first, then the text embeddings; returns (embeddings, mask) [B, Nv + L, ...]."""
    text = self.llm.embed_tokens(input_ids)  # [B, L, D]
    b, n_visual = visual_tokens.shape[:2]
    embeddings = jnp.concatenate([visual_tokens.astype(text.dtype), text], axis=1)
    mask = jnp.concatenate([jnp.ones((b, n_visual), attention_mask.dtype), attention_mask], axis=1)
    return embeddings, mask

  def __call__(self, batch: Mapping[str, Array], deterministic: bool = True) -> Array:
    check_batch(batch)
    embeddings, mask = self.embed_inputs(self.visual_tokens(batch, deterministic), batch['input_ids'],
                                         batch['attention_mask'])
    return self.llm.logits(self.llm(embeddings, mask))

  def training_pass(self, batch: Mapping[str, Array], keep: Array | None, n_keep: Array | int,
                    with_teacher: bool, deterministic: bool = False) -> TrainingPass:
    """The training forward of paper section 3.2: the student on the masked video, the teacher on all of it.

    keep int32 [B, n_slots] (`masking.keep_indices`): each sample's kept visual tokens in order in its first
    `n_keep` slots (`n_keep` may be traced), padding after; None = no masking (every token, n_keep = Nv).
    The LLM reads [kept tokens ; text ; padding slots]: positions run on over the real tokens, and the
    padding, last in a causal sequence, is seen by no real token. The text is right-padded (as the pipeline and
    random batches give it), so every row is real tokens, then padding: the LLM masks by key lengths
    (`padding_last`, what cuDNN attention takes at any length). `with_teacher`: the MVM sides too.
    """
    check_batch(batch)
    visual = self.visual_tokens(batch, deterministic)  # [B, Nv, D]
    b, n_visual = visual.shape[:2]
    if keep is None:
      keep, n_keep = jnp.broadcast_to(jnp.arange(n_visual, dtype=jnp.int32), (b, n_visual)), n_visual
    kept = jnp.take_along_axis(visual, keep[:, :, None], axis=1)  # [B, n_slots, D]
    text = self.llm.embed_tokens(batch['input_ids'])  # [B, L, D]
    n_slots, text_len = keep.shape[1], text.shape[1]
    slot_mask = jnp.arange(n_slots) < n_keep  # [n_slots]: real kept tokens, then padding
    order = real_tokens_first(n_slots, text_len, n_keep)  # [n_slots + L] into [slots ; text]
    embeddings = jnp.concatenate([kept.astype(text.dtype), text], axis=1)[:, order]
    mask = jnp.concatenate([jnp.broadcast_to(slot_mask, (b, n_slots)).astype(batch['attention_mask'].dtype),
                            batch['attention_mask']], axis=1)[:, order]
    hidden = self.llm(embeddings, mask, padding_last=True)  # [B, n_slots + L, D]
    # The hidden state just before each text token predicts it (the last kept visual one predicts the first).
    text_logits = self.llm.logits(jax.lax.dynamic_slice_in_dim(hidden, n_keep - 1, text_len, axis=1))
    if not with_teacher:
      return TrainingPass(text_logits, None, None, slot_mask)
    # Visual tokens first + causal attention: the teacher's visual outputs depend on the visual prefix only.
    teacher = self.llm(jax.lax.stop_gradient(visual), jnp.ones((b, n_visual), jnp.int32),
                       padding_last=True)  # [B, Nv, D]
    teacher = jax.lax.stop_gradient(jnp.take_along_axis(teacher, keep[:, :, None], axis=1))  # [B, n_slots, D]
    return TrainingPass(text_logits, self.mvm_head(hidden[:, :n_slots]), teacher, slot_mask)

  def initialize(self, batch: Mapping[str, Array]) -> Array:
    """`__call__` plus the training-only parts (MVM head): the method `init` runs to create every parameter."""
    logits = self(batch)
    if self.cfg.mvm_head:
      self.mvm_head(jnp.zeros((1, 1, self.cfg.llm.width), logits.dtype))
    return logits


class TrainingPass(NamedTuple):
  text_logits: Array  # float32 [B, L, vocab]: position j predicts input_ids[:, j]
  student: Array | None  # [B, n_slots, D]: the MVM head on the student's hidden states at the kept slots
  teacher: Array | None  # [B, n_slots, D]: the unmasked pass's hidden states at the same tokens (no gradient)
  slot_mask: Array  # bool [n_slots]: the real kept tokens (the rest is padding no loss may read)


def real_tokens_first(n_slots: int, text_len: int, n_keep: Array | int) -> Array:
  """int32 [n_slots + L]: the order that takes [n_slots kept slots ; L text] to [n_keep real slots ; text ;
  padding slots], so the sequence's positions run on over the real tokens."""
  i = jnp.arange(n_slots + text_len, dtype=jnp.int32)
  return jnp.where(i < n_keep, i, jnp.where(i < n_keep + text_len, n_slots + i - n_keep, i - text_len))


def dummy_batch(config: Any, batch_size: int = 1, num_frames: int = 0, text_len: int = 1,
                qformer_text_len: int = 1) -> dict[str, np.ndarray]:
  """An all-zeros batch of the right shapes and dtypes (for init, eval_shape and compilation).

  num_frames 0: the fewest frames the model accepts.
  """
  cfg = model_config(config)
  num_frames = num_frames or (cfg.num_local_frames if cfg.video_input == 'global_local' else 1)
  size = cfg.vision.image_size
  ids = lambda n: np.zeros((batch_size, n), np.int32)
  return dict(frames=np.zeros((batch_size, num_frames, size, size, 3), np.float32),
              qformer_input_ids=ids(qformer_text_len), qformer_attention_mask=ids(qformer_text_len) + 1,
              input_ids=ids(text_len), attention_mask=ids(text_len) + 1)


def abstract_variables(config: Any) -> Any:
  """Shapes, dtypes and logical axes of every parameter (boxed), without allocating memory. Traced once per model
  config and process (tracing the 7B model's init takes seconds); each call gets its own containers."""
  return layers.fresh_containers(_abstract_variables(model_config(config)))


@functools.lru_cache(maxsize=8)
def _abstract_variables(cfg: STLLMConfig) -> Any:
  return jax.eval_shape(functools.partial(STLLM(cfg).init, method='initialize'), jax.random.key(0), dummy_batch(cfg))


def init_params(config: Any, rng: jax.Array) -> Any:
  """Freshly initialised (unboxed) params; compiled once per model config (op-by-op is far slower)."""
  return _init_fn(model_config(config))(rng)


@functools.lru_cache(maxsize=8)
def _init_fn(cfg: STLLMConfig):
  batch = dummy_batch(cfg)
  return jax.jit(lambda key: nn.meta.unbox(STLLM(cfg).init(key, batch, method='initialize'))['params'])
