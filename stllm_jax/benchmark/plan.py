"""Memory plan of a train step, compiled ahead of time from abstract inputs (nothing is allocated).

    config -> abstract params (shapes, dtypes, logical axes) -> NamedShardings on the mesh
      -> jax.ShapeDtypeStruct train state / frozen params / batch with those shardings
      -> jit(train_step).lower(...).compile() -> memory_analysis() (bytes per device)

Per-device bytes of params, optimizer state and gradients come from the shardings (shard shape x itemsize);
arguments, outputs, temporaries and generated code from XLA's memory analysis of the compiled program.
On a CPU host with simulated devices this is XLA:CPU's estimate of what the GPU/TPU program needs.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from stllm_jax import masking, sharding, step
from stllm_jax import params as params_lib
from stllm_jax.benchmark import devices
from stllm_jax.models import stllm

CAPACITIES_GIB = (40, 80)


def abstract_params(model_cfg: stllm.STLLMConfig, mesh: jax.sharding.Mesh) -> tuple[Any, Any]:
  """(params as sharded jax.ShapeDtypeStruct, their NamedShardings) for `model_cfg` on `mesh`."""
  boxed = stllm.abstract_variables(model_cfg)
  shardings = sharding.param_shardings(boxed, mesh)
  values = jax.tree_util.tree_map(lambda box: box.value, boxed['params'], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  params = jax.tree_util.tree_map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), values, shardings)
  return params, shardings


def abstract_batch(model_cfg: stllm.STLLMConfig, mesh: jax.sharding.Mesh, batch_size: int, num_frames: int,
                   text_len: int, qformer_text_len: int) -> dict[str, jax.ShapeDtypeStruct]:
  size = model_cfg.vision.image_size
  shapes = {'frames': ((batch_size, num_frames, size, size, 3), np.float32),
            'qformer_input_ids': ((batch_size, qformer_text_len), np.int32),
            'qformer_attention_mask': ((batch_size, qformer_text_len), np.int32),
            'input_ids': ((batch_size, text_len), np.int32), 'attention_mask': ((batch_size, text_len), np.int32),
            'answer_mask': ((batch_size, text_len), np.int32)}
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
          for k, (shape, dtype) in shapes.items()}


def abstract_step_inputs(model_cfg: stllm.STLLMConfig, train_cfg: step.TrainConfig, mesh: jax.sharding.Mesh,
                         batch: dict[str, jax.ShapeDtypeStruct]):
  """(jitted train step, abstract state, abstract frozen params): what `lower` takes besides the batch."""
  params, shardings = abstract_params(model_cfg, mesh)
  trainable, frozen = params_lib.split_params(params, train_cfg.frozen)
  trainable_shardings = params_lib.split_params(shardings, train_cfg.frozen)[0]
  schedule = step.make_schedule(train_cfg, max(train_cfg.steps, 1))
  tx = step.make_optimizer(train_cfg, schedule)
  state_shardings = step.state_shardings(trainable, tx, trainable_shardings, mesh)
  shapes = jax.eval_shape(lambda t: step.TrainState(step=np.zeros((), np.int32), params=t, opt_state=tx.init(t),
                                                    rng=jax.random.key_data(jax.random.key(0))), trainable)
  state = jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                                 state_shardings)
  jitted = jax.jit(functools.partial(step.train_step, model=stllm.STLLM(model_cfg), cfg=train_cfg, tx=tx,
                                     schedule=schedule),
                   static_argnames='n_slots', donate_argnames='state', out_shardings=(state_shardings, None))
  return jitted, state, frozen


def per_device_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard of each leaf)."""
  total = 0
  for leaf in jax.tree_util.tree_leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
  return total


def total_bytes(tree: Any) -> int:
  return sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree_util.tree_leaves(tree))


def memory_plan(model_cfg: stllm.STLLMConfig, train_cfg: step.TrainConfig, mesh: jax.sharding.Mesh, *,
                num_frames: int, text_len: int, qformer_text_len: int) -> dict[str, Any]:
  """Compiles the step for the largest kept-token bucket and returns per-device bytes and the verdicts."""
  num_visual = model_cfg.num_visual_tokens(num_frames)
  n_keep = largest_keep(num_visual, train_cfg.masking)
  batch = abstract_batch(model_cfg, mesh, train_cfg.batch_size, num_frames, text_len, qformer_text_len)
  jitted, state, frozen = abstract_step_inputs(model_cfg, train_cfg, mesh, batch)
  began = time.perf_counter()
  with sharding.activate(mesh):
    lowered = jitted.lower(state, frozen, batch, np.int32(n_keep), n_slots=n_keep)
  lower_s = time.perf_counter() - began
  compiled = lowered.compile()
  compile_s = time.perf_counter() - began - lower_s
  analysis = devices.compiled_memory(compiled)
  trainable_per_device = per_device_bytes(state.params)
  plan = {
      'mesh': dict(mesh.shape), 'devices': mesh.size, 'batch_size': train_cfg.batch_size,
      'grad_accum_steps': train_cfg.grad_accum_steps,
      'micro_batch_per_device': train_cfg.batch_size // train_cfg.grad_accum_steps / _batch_shards(mesh),
      'remat_llm': model_cfg.llm.remat_policy, 'dtype': model_cfg.dtype, 'param_dtype': model_cfg.llm.param_dtype,
      'num_frames': num_frames, 'n_keep': n_keep, 'num_visual': num_visual, 'text_len': text_len,
      'qformer_text_len': qformer_text_len, 'mvm': train_cfg.mvm_weight > 0,
      'lower_s': lower_s, 'compile_s': compile_s,
      'trainable_params_total_bytes': total_bytes(state.params),
      'frozen_params_total_bytes': total_bytes(frozen),
      'trainable_params_bytes_per_device': trainable_per_device,
      'frozen_params_bytes_per_device': per_device_bytes(frozen),
      'optimizer_state_bytes_per_device': per_device_bytes(state.opt_state),
      'gradients_bytes_per_device': trainable_per_device,  # one gradient per trainable param, same dtype and sharding
      'batch_bytes_per_device': per_device_bytes(batch),
      'memory_analysis': analysis,
  }
  estimate = analysis['total_bytes'] if analysis else None
  plan['estimate_bytes_per_device'] = estimate
  plan['fits'] = {f'{gib}GiB': (estimate is not None and estimate <= gib * 1024 ** 3) for gib in CAPACITIES_GIB}
  return plan


def _batch_shards(mesh: jax.sharding.Mesh) -> int:
  return mesh.shape['data'] * mesh.shape['fsdp']


def largest_keep(num_visual: int, cfg: masking.MaskingConfig) -> int:
  """The most visual-token slots a step has (the lowest mask rate's bucket): the worst case for memory."""
  return masking.fixed_rate_plan(cfg.low, num_visual, cfg).n_slots if cfg.enabled else num_visual
