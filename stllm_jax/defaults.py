"""The config every experiment starts from: config files take `base_config()` and change what they choose."""

import ml_collections

from stllm_jax import configlib
from stllm_jax.data import pipeline
from stllm_jax.data.random_batches import RandomDataConfig
from stllm_jax.models import stllm
from stllm_jax.step import TrainConfig

# Params that a run may add to its initial weights (created fresh, then listed at start-up): the MVM head,
# the global-local MLP f_m, the BT-Adapter (started from the ViT's last blocks) and LoRA adapters do not
# exist in the InstructBLIP weights training starts from.
NEW_PARAMS = ('mvm_dense/.*', 'mvm_norm/.*', 'global_down/.*', 'global_up/.*', 'bt_adapter/.*', '.*/lora/.*')


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.mesh = 'fsdp=-1'  # e.g. 'data=2,fsdp=4' or 'fsdp=8,tensor=2'; -1 = the remaining devices
  config.model = stllm.default_config()
  config.train = configlib.to_config_dict(TrainConfig())
  config.data = pipeline.default_config()  # VideoChat2-format datasets; see random_data() for smoke runs
  # Initial weights: a directory written by `python -m stllm_jax.convert`; '' = random initialisation.
  config.init = ml_collections.ConfigDict({'checkpoint': '', 'new_params': NEW_PARAMS})
  # On CPUs only, how malloc treats freed host memory (stllm_jax/host_memory.py): 'system' (glibc's defaults) or
  # 'kept' (kept for the next step: faster for steps with temporaries of hundreds of MiB, configs/bench_small.py;
  # slower for small steps like the demo's).
  config.host_malloc = 'system'
  return config


def random_data(**overrides) -> ml_collections.ConfigDict:
  """`config.data` for random batches of the right shapes (smoke runs, benchmarks): no files needed."""
  data = configlib.to_config_dict(RandomDataConfig())
  data.update(overrides)
  return data
