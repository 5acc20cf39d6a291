"""Mesh construction, the logical-axis rule table, and a sharded forward on 8 simulated CPU devices."""

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

from conftest import random_batch
from stllm_jax import sharding
from stllm_jax.models import stllm
from stllm_jax.models.stllm import STLLM


def test_mesh_has_auto_axes_and_named_sizes():
  mesh = sharding.make_mesh('data=2,fsdp=2,tensor=2')
  assert mesh.axis_names == ('data', 'fsdp', 'tensor')
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}
  assert all(t == AxisType.Auto for t in mesh.axis_types)
  assert sharding.parse_mesh(None, 8) == {'data': 1, 'fsdp': 8, 'tensor': 1}
  assert sharding.parse_mesh('tensor=2,fsdp=-1', 8) == {'data': 1, 'fsdp': 4, 'tensor': 2}
  assert sharding.make_mesh('fsdp=2').devices.size == 2  # a single process may use the first devices only


@pytest.mark.parametrize('spec, message', [('fsdp=16', 'needs 16 devices, but 8'), ('model=8', 'bad mesh spec'),
                                           ('fsdp=-1,data=-1', 'at most one mesh axis may be -1')])
def test_bad_mesh_specs_are_explained(spec, message):
  with pytest.raises(ValueError, match=message):
    sharding.parse_mesh(spec, 8)


def test_rules_map_parameters_and_replicate_what_does_not_divide():
  mesh = sharding.make_mesh('fsdp=2,tensor=4')
  spec, notes = sharding.spec_for((4096, 32, 128), ('embed', 'heads', 'head_dim'), mesh)
  assert spec == PartitionSpec('fsdp', 'tensor', None) and not notes
  spec, notes = sharding.spec_for((768, 6, 64), ('embed', 'heads', 'head_dim'), mesh)  # 6 heads on tensor=4
  assert spec == PartitionSpec('fsdp', None, None)
  assert notes == ['heads (6) is not divisible by tensor (4): replicated']
  spec, _ = sharding.spec_for((4, 4096, 11008), ('layers', 'embed', 'mlp'), mesh)
  assert spec == PartitionSpec(None, 'fsdp', 'tensor')
  with pytest.raises(KeyError, match='no rule'):
    sharding.spec_for((2,), ('unheard_of',), mesh)


def test_every_parameter_of_the_7b_model_has_a_rule():
  mesh = sharding.make_mesh('fsdp=8')
  abstract = stllm.abstract_variables(stllm.default_config())
  shardings = sharding.param_shardings(abstract, mesh)
  query = shardings['llm']['blocks']['layers']['attention']['query']['kernel']
  assert query.spec == PartitionSpec(None, 'fsdp', None, None)
  # vocab 32001 rows cannot be split 8 ways along vocab, but the rule puts embed (4096) on fsdp
  assert shardings['llm']['embed']['embedding'].spec == PartitionSpec(None, 'fsdp')


def test_sharded_forward_equals_single_device(converted, rng):
  cfg, params = converted
  batch = random_batch(rng, stllm.model_config(cfg), batch_size=4, num_frames=2)
  single = jax.jit(lambda p, b: STLLM(cfg).apply({'params': p}, b))(params, batch)

  mesh = sharding.make_mesh('data=2,fsdp=2,tensor=2')
  abstract = stllm.abstract_variables(cfg)
  placed = sharding.shard_params(params, sharding.param_shardings(abstract, mesh))
  kernel = placed['llm']['blocks']['layers']['mlp']['up']['kernel']
  assert kernel.sharding.spec == PartitionSpec(None, 'fsdp', 'tensor')
  assert len({d for s in kernel.addressable_shards for d in [s.device]}) == 8
  with sharding.activate(mesh):
    sharded = jax.jit(lambda p, b: STLLM(cfg).apply({'params': p}, b))(placed, sharding.shard_batch(batch, mesh))
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=2e-5, atol=2e-5)


def test_batch_that_does_not_split_is_explained(rng):
  mesh = sharding.make_mesh('data=2,fsdp=2,tensor=2')
  with pytest.raises(ValueError, match='3 rows, not a multiple of data x fsdp = 4'):
    sharding.shard_batch({'input_ids': np.zeros((3, 5), np.int32)}, mesh)
