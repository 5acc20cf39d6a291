"""Weights directories and training workdirs read back for inference; checksums of frozen weights."""

import jax
import numpy as np
import pytest

from stllm_jax import checkpoints, loading, sharding, train
from stllm_jax.errors import UserError
from stllm_jax.models import stllm


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory, tiny_config):
  """A 2-step tiny run with frozen towers (vision, Q-Former) and its workdir."""
  workdir = tmp_path_factory.mktemp('run')
  config = tiny_config()
  config.mesh = 'fsdp=1'
  config.train.update(steps=2, log_every=1)
  config.train.masking.keep_buckets = (0.7,)
  config.data.text_buckets = (16,)
  train.train(config, str(workdir))
  return config, workdir


def test_workdir_loads_trained_and_frozen_parts(tiny_run, tiny_params):
  config, workdir = tiny_run
  loaded = loading.load_model(str(workdir))
  assert loaded.description == f'step 2 of the run in {workdir}'
  # frozen towers are the run's seeded initialisation; the LLM has moved away from it
  np.testing.assert_array_equal(loaded.params['vision']['patch_embed']['kernel'],
                                tiny_params['vision']['patch_embed']['kernel'])
  assert not np.array_equal(loaded.params['llm']['lm_head']['kernel'], tiny_params['llm']['lm_head']['kernel'])
  assert loaded.model_config.llm.width == config.model.llm.width


def test_weights_directory_round_trip(tiny_run, tmp_path):
  loaded = loading.load_model(str(tiny_run[1]))
  checkpoints.save_weights(str(tmp_path / 'weights'), loaded.params, loaded.model_config.to_dict())
  again = loading.load_model(str(tmp_path / 'weights'))
  jax.tree_util.tree_map(np.testing.assert_array_equal, again.params, loaded.params)
  assert again.description == f'weights {tmp_path / "weights"}'
  with pytest.raises(FileExistsError, match='already exists'):
    checkpoints.save_weights(str(tmp_path / 'weights'), loaded.params, loaded.model_config.to_dict())


def test_neither_weights_nor_workdir_is_explained(tmp_path):
  with pytest.raises(UserError, match='neither a weights directory .* nor a .*training workdir'):
    loading.load_model(str(tmp_path))
  assert not (tmp_path / 'checkpoints').exists()  # looking did not create anything


def test_checksums_tell_changed_weights_apart(tiny_params):
  sums = checkpoints.checksums(tiny_params['qformer'])
  assert checkpoints.checksum_mismatches(sums, sums) == []
  changed = jax.tree_util.tree_map(lambda x: x, tiny_params['qformer'])
  changed['query_tokens'] = changed['query_tokens'] + 1e-2
  assert checkpoints.checksum_mismatches(sums, checkpoints.checksums(changed)) == ["['query_tokens']"]


def test_resuming_with_other_frozen_weights_is_refused(tiny_run):
  config, workdir = tiny_run
  config = config.copy_and_resolve_references()
  config.seed = 1  # another random initialisation of the frozen towers
  config.train.steps = 3
  with pytest.raises(UserError, match='other frozen weights'):
    train.train(config, str(workdir))


def test_a_bt_adapter_starts_from_the_vits_last_blocks_when_the_weights_lack_it(tiny_config, tiny_params, tmp_path):
  """From InstructBLIP weights (no adapter) the QA recipe's adapter starts as the released code starts it."""
  weights = str(tmp_path / 'weights')
  checkpoints.save_weights(weights, jax.tree_util.tree_map(np.asarray, tiny_params), tiny_config().model.to_dict())
  config = tiny_config()
  config.model.vision.bt_adapter.depth = 1
  config.init.checkpoint = weights
  model_cfg = stllm.model_config(config.model)
  mesh = sharding.make_mesh('fsdp=1')
  shardings = sharding.param_shardings(stllm.abstract_variables(model_cfg), mesh)
  messages = []
  params = loading.initial_params(config, model_cfg, shardings, messages.append)
  assert any('BT-Adapter started from ViT blocks 1-1' in m for m in messages), messages
  adapter, vision = params['bt_adapter'], params['vision']['blocks']['layers']
  last_block = jax.tree_util.tree_map(lambda x: np.asarray(x[-1]), vision)  # scanned: block 1 of 2
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.tree_util.tree_map(np.asarray, adapter['spatial_0']),
                         last_block)
  assert not np.any(np.asarray(adapter['temporal_0']['temporal_fc']['kernel']))
  assert not np.any(np.asarray(adapter['cls_token'])) and 0.9 < float(np.std(adapter['frame_position'])) < 1.1
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.tree_util.tree_map(np.asarray, params['llm']),
                         jax.tree_util.tree_map(np.asarray, tiny_params['llm']))  # the rest as loaded


def test_from_weights_only_the_missing_leaves_are_initialised(tiny_config, tiny_params, tmp_path, monkeypatch):
  """Starting from weights that lack the MVM head, the head is the seeded init's and no random copy of the stored
  leaves is ever made (a 7B start would hold the LLM twice): live device memory grows by about one model."""
  stored = jax.tree_util.tree_map(np.asarray, {k: v for k, v in tiny_params.items() if not k.startswith('mvm_')})
  weights = str(tmp_path / 'weights')
  checkpoints.save_weights(weights, stored, tiny_config().model.to_dict())
  config = tiny_config()
  config.init.checkpoint = weights
  config.seed = 3
  model_cfg = stllm.model_config(config.model)
  shardings = sharding.param_shardings(stllm.abstract_variables(model_cfg), sharding.make_mesh('fsdp=1'))
  live_bytes = lambda: sum(x.nbytes for x in jax.live_arrays())
  model_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(tiny_params))
  before, grown = live_bytes(), []
  load_weights = checkpoints.load_weights
  monkeypatch.setattr(checkpoints, 'load_weights',
                      lambda *args: grown.append(live_bytes() - before) or load_weights(*args))
  params = loading.initial_params(config, model_cfg, shardings)
  assert grown and grown[0] < 0.1 * model_bytes, (grown, model_bytes)  # nothing random made before the load
  seeded = stllm.init_params(config.model, jax.random.key(3))
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.tree_util.tree_map(np.asarray, params['mvm_dense']),
                         jax.tree_util.tree_map(np.asarray, seeded['mvm_dense']))
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.tree_util.tree_map(np.asarray, params['llm']),
                         stored['llm'])  # the rest as stored
