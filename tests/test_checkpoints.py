"""Weights directories and training workdirs read back for inference; checksums of frozen weights."""

import jax
import numpy as np
import pytest

from stllm_jax import checkpoints, train
from stllm_jax.errors import UserError


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
  loaded = checkpoints.load_model(str(workdir))
  assert loaded.description == f'step 2 of the run in {workdir}'
  # frozen towers are the run's seeded initialisation; the LLM has moved away from it
  np.testing.assert_array_equal(loaded.params['vision']['patch_embed']['kernel'],
                                tiny_params['vision']['patch_embed']['kernel'])
  assert not np.array_equal(loaded.params['llm']['lm_head']['kernel'], tiny_params['llm']['lm_head']['kernel'])
  assert loaded.model_config.llm.width == config.model.llm.width


def test_weights_directory_round_trip(tiny_run, tmp_path):
  loaded = checkpoints.load_model(str(tiny_run[1]))
  checkpoints.save_weights(str(tmp_path / 'weights'), loaded.params, loaded.model_config.to_dict())
  again = checkpoints.load_model(str(tmp_path / 'weights'))
  jax.tree_util.tree_map(np.testing.assert_array_equal, again.params, loaded.params)
  assert again.description == f'weights {tmp_path / "weights"}'
  with pytest.raises(FileExistsError, match='already exists'):
    checkpoints.save_weights(str(tmp_path / 'weights'), loaded.params, loaded.model_config.to_dict())


def test_neither_weights_nor_workdir_is_explained(tmp_path):
  with pytest.raises(UserError, match='neither a weights directory .* nor a .*training workdir'):
    checkpoints.load_model(str(tmp_path))
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
