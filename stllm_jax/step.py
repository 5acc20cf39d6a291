"""One optimizer step of ST-LLM training, as pure functions of arrays.

    the model's training pass (`STLLM.training_pass`):
      visual tokens V [B, Nv, D]  (frozen towers + trainable projection / f_m / BT-Adapter; frozen params
        get no gradient; the Q-Former's dropout and the adapter's drop path where the config has them)
      -> dynamic mask: n_keep random tokens per sample, padded to n_slots (static: one compiled step per
         bucket; n_keep is traced, so the kept count is exact)
      -> [V_kept : text : padding] -> LLaMA -> hidden [B, n_slots + L, D]
      -> text logits (the positions before each text token); MVM student = mvm_head(hidden at the kept
         positions), teacher = the same LLM on the unmasked visual prefix, under stop_gradient (visual tokens
         first + causal attention => the teacher's visual outputs depend only on that prefix)
    then here: LM loss on answer tokens only, MVM loss over the real kept tokens, accumulation, the update.

The batch is split into `grad_accum_steps` micro-batches (scanned); the LM loss is normalised by the
answer-token count of the whole batch, so accumulation equals one large batch. A step whose loss or
gradient is not finite, or that explodes while staying finite (loss above `max_loss`, or an update larger
than `max_update_ratio` times the params), is rejected: it changes nothing (params and optimizer state are
kept) and is reported (`accepted` in its metrics).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import optax

from stllm_jax import configlib, losses, masking
from stllm_jax import params as params_lib
from stllm_jax.models import layers
from stllm_jax.models.stllm import STLLM, model_config

MODEL_BATCH_KEYS = ('frames', 'qformer_input_ids', 'qformer_attention_mask', 'input_ids', 'attention_mask',
                    'answer_mask')


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 0  # optimizer steps of the run; 0 = epochs x dataset size / batch_size
  epochs: float = 2.0
  batch_size: int = 128  # global, per optimizer step
  grad_accum_steps: int = 1  # micro-batches per step (each batch_size / grad_accum_steps samples)
  lr: float = 2e-5
  warmup_fraction: float = 0.03  # linear warmup, then cosine decay to end_lr
  end_lr: float = 0.0
  weight_decay: float = 0.0
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  adam_eps: float = 1e-8
  grad_clip_norm: float = 0.0  # 0 = no clipping (the released runs)
  # Params whose path ('vision/blocks/layers/fc1/kernel') fully matches one of these get no gradient,
  # no update and no optimizer state.
  frozen: tuple[str, ...] = ('vision/.*', 'ln_vision/.*', 'qformer/.*')
  masking: masking.MaskingConfig = dataclasses.field(default_factory=masking.MaskingConfig)
  mvm_weight: float = 1.0  # 0 = no MVM loss (and no teacher pass)
  mvm_loss: str = 'cosine'  # 'cosine' (released code) or 'mse' (paper Eq. 4)
  max_loss: float = 1e4  # a step with a larger (finite) loss is rejected as exploding; 0 = no limit
  max_update_ratio: float = 1.0  # ... and one whose update norm exceeds this times the params' norm; 0 = no limit
  max_nonfinite_in_a_row: int = 10  # this many rejected steps in a row stop the run
  log_every: int = 10
  checkpoint_every: int = 500
  checkpoints_to_keep: int = 3

  def validate(self) -> None:
    self.masking.validate()
    at_least = dict(steps=0, batch_size=1, grad_accum_steps=1, log_every=1, checkpoint_every=1,
                    checkpoints_to_keep=1, max_nonfinite_in_a_row=1)
    for name, low in at_least.items():
      if getattr(self, name) < low:
        raise ValueError(f'train.{name} must be >= {low}, got {getattr(self, name)}')
    not_negative = ('lr', 'end_lr', 'weight_decay', 'warmup_fraction', 'grad_clip_norm', 'mvm_weight', 'max_loss',
                    'max_update_ratio')
    for name in not_negative:
      if not getattr(self, name) >= 0:  # NaN fails too
        raise ValueError(f'train.{name} must be >= 0, got {getattr(self, name)}')
    if not self.steps and not self.epochs > 0:
      raise ValueError(f'train.epochs must be > 0 when train.steps is 0, got {self.epochs}')
    if self.batch_size % self.grad_accum_steps:
      raise ValueError(f'train.batch_size={self.batch_size} is not a multiple of '
                       f'train.grad_accum_steps={self.grad_accum_steps}')
    if self.mvm_loss not in losses.MVM_LOSSES:
      raise ValueError(f'train.mvm_loss={self.mvm_loss!r}; choose one of {losses.MVM_LOSSES}')
    for pattern in self.frozen:
      re.compile(pattern)


def train_config(config: Any) -> TrainConfig:
  cfg = configlib.from_dict(TrainConfig, config, 'train')
  cfg.validate()
  return cfg


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 [], loop steps done (skipped non-finite steps included)
  params: Any  # the trainable params only
  opt_state: Any
  rng: jax.Array  # uint32 key data; split once per step


# ------------------------------------------------------------------------------------------ optimizer

def make_schedule(cfg: TrainConfig, total_steps: int) -> optax.Schedule:
  warmup = int(cfg.warmup_fraction * total_steps)
  return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(total_steps, warmup + 1), cfg.end_lr)


def make_optimizer(cfg: TrainConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
  adamw = optax.adamw(schedule, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), adamw) if cfg.grad_clip_norm > 0 else adamw


def init_state(trainable: Any, tx: optax.GradientTransformation, seed: int, trainable_shardings: Any,
               mesh: jax.sharding.Mesh) -> TrainState:
  """A fresh TrainState placed on `mesh`: params and their Adam moments sharded alike, scalars replicated."""
  shardings = state_shardings(trainable, tx, trainable_shardings, mesh)
  make = lambda params: TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                                   rng=jax.random.key_data(jax.random.key(seed)))
  return jax.jit(make, out_shardings=shardings)(trainable)


def state_shardings(trainable: Any, tx: optax.GradientTransformation, trainable_shardings: Any,
                    mesh: jax.sharding.Mesh) -> TrainState:
  """The TrainState's shardings (`trainable` may be abstract): Adam moments as their params, scalars replicated."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  opt_shardings = optax.tree_map_params(tx, lambda _, sharding: sharding, jax.eval_shape(tx.init, trainable),
                                        trainable_shardings, transform_non_params=lambda _: replicated,
                                        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  return TrainState(step=replicated, params=trainable_shardings, opt_state=opt_shardings, rng=replicated)


# ------------------------------------------------------------------------------------------ the loss

def micro_batch_loss(trainable: Any, frozen: Any, batch: Mapping[str, jax.Array], key: jax.Array,
                     n_keep: jax.Array, *, model: STLLM, cfg: TrainConfig, n_slots: int, lm_norm: jax.Array,
                     mvm_norm: float) -> tuple[jax.Array, dict]:
  """Loss of one micro-batch, already scaled for summation over micro-batches: the model's training pass
  keeps `n_keep` visual tokens per sample (padded to `n_slots`), with dropout / drop path where the model
  config has them."""
  mask_key, dropout_key = jax.random.split(key)
  b, num_frames = batch['frames'].shape[:2]
  num_visual = model_config(model.config).num_visual_tokens(num_frames)
  keep = masking.keep_indices(mask_key, b, num_visual, n_slots, n_keep) if cfg.masking.enabled else None
  out = model.apply({'params': params_lib.merge_params(trainable, frozen)}, batch, keep, n_keep, cfg.mvm_weight > 0,
                    deterministic=False, rngs={'dropout': dropout_key}, method='training_pass')
  lm_sum, lm_count = losses.lm_loss_sum(out.text_logits, batch['input_ids'], batch['answer_mask'])
  loss = lm_sum / lm_norm
  mvm = jnp.zeros((), jnp.float32)
  if cfg.mvm_weight > 0:
    mvm = losses.mvm_loss(out.student, out.teacher, cfg.mvm_loss, out.slot_mask)
    loss = loss + cfg.mvm_weight * mvm / mvm_norm
  return loss, {'lm_sum': lm_sum, 'lm_count': lm_count, 'mvm': mvm}


def split_micro_batches(batch: Mapping[str, jax.Array], n: int) -> dict[str, jax.Array]:
  """[B, ...] -> [n, B/n, ...] taking every n-th sample, so each micro-batch spans every data shard."""
  def split(x):
    x = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
    return layers.constrain(x, (None, 'activation_batch', *([None] * (x.ndim - 2))))
  return {k: split(v) for k, v in batch.items()}


def train_step(state: TrainState, frozen: Any, batch: Mapping[str, jax.Array], n_keep: jax.Array, *,
               model: STLLM, cfg: TrainConfig, tx: optax.GradientTransformation, schedule: optax.Schedule,
               n_slots: int) -> tuple[TrainState, dict]:
  """One optimizer step over `batch` (all of MODEL_BATCH_KEYS), keeping `n_keep` (int32 [], traced) visual
  tokens per sample in `n_slots` (static: one program per bucket) slots (`masking.step_mask_plan`)."""
  batch = {k: batch[k] for k in MODEL_BATCH_KEYS}
  n_micro = cfg.grad_accum_steps
  rng, step_key = jax.random.split(jax.random.wrap_key_data(state.rng))
  lm_norm = jnp.maximum(jnp.sum(batch['answer_mask']).astype(jnp.float32), 1.0)
  loss_fn = functools.partial(micro_batch_loss, model=model, cfg=cfg, n_slots=n_slots, lm_norm=lm_norm,
                              mvm_norm=float(n_micro))
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def accumulate(carry, micro):
    grads, loss, lm_sum, mvm = carry
    (micro_loss, aux), micro_grads = grad_fn(state.params, frozen, micro['batch'], micro['key'], n_keep)
    grads = jax.tree_util.tree_map(jnp.add, grads, micro_grads)
    return (grads, loss + micro_loss, lm_sum + aux['lm_sum'], mvm + aux['mvm'] / n_micro), None

  zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
  micro = {'batch': split_micro_batches(batch, n_micro), 'key': jax.random.split(step_key, n_micro)}
  init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
  (grads, loss, lm_sum, mvm), _ = jax.lax.scan(accumulate, init, micro)

  grad_norm = optax.tree.norm(grads)
  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  update_norm, param_norm = optax.tree.norm(updates), optax.tree.norm(state.params)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  accepted = finite & step_is_sane(loss, update_norm, param_norm, cfg)
  new_params = optax.apply_updates(state.params, updates)
  keep_if_accepted = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(accepted, n, o), new, old)
  new_state = TrainState(step=state.step + 1, params=keep_if_accepted(new_params, state.params),
                         opt_state=keep_if_accepted(new_opt_state, state.opt_state),
                         rng=jax.random.key_data(rng))
  metrics = {'loss': loss, 'lm_loss': lm_sum / lm_norm, 'mvm_loss': mvm, 'grad_norm': grad_norm,
             'update_norm': update_norm, 'param_norm': param_norm, 'finite': finite, 'accepted': accepted,
             'lr': schedule(optimizer_count(state.opt_state))}
  return new_state, metrics


def step_is_sane(loss: jax.Array, update_norm: jax.Array, param_norm: jax.Array, cfg: TrainConfig) -> jax.Array:
  """False for an exploding step (loss and gradient finite): loss above `max_loss`, an update too large for float32,
  or one larger than `max_update_ratio` times the params (params all zero, e.g. fresh LoRA-B only, bound
  nothing)."""
  loss_ok = (cfg.max_loss <= 0) | (loss <= cfg.max_loss)
  update_ok = (cfg.max_update_ratio <= 0) | (param_norm == 0) | (update_norm <= cfg.max_update_ratio * param_norm)
  return loss_ok & jnp.isfinite(update_norm) & update_ok


def optimizer_count(opt_state: Any) -> jax.Array:
  """Updates applied so far (what the schedule is at; Adam and the schedule keep equal counts)."""
  return optax.tree_utils.tree_get_all_with_path(opt_state, 'count')[0][1]


def compiled_programs(step_fn: Callable) -> int:
  """How many programs a jitted function has compiled so far (one per distinct shape / static arg)."""
  return step_fn._cache_size()  # pylint: disable=protected-access
