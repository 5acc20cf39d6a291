"""The device mesh and the one table that maps logical axis names onto it.

Mesh axes: `data` (pure data parallelism), `fsdp` (data parallelism with parameters, gradients and
optimizer state sharded), `tensor` (heads and MLP width split across devices). Parameters carry logical
names (`embed`, `mlp`, `heads`, ...; see `models/layers.py`), activations `activation_*` names.
A dimension a mesh axis does not divide (Q-Former's 12 heads on tensor=8, the 32001-row vocab) is
replicated instead of sharded (`spec_for` notes each such case).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'tensor')

LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ('activation_batch', ('data', 'fsdp')),
    ('activation_length', None),
    ('activation_embed', None),
    ('activation_heads', 'tensor'),
    ('activation_mlp', 'tensor'),
    ('activation_vocab', 'tensor'),
    # parameters
    ('embed', 'fsdp'),
    ('source_embed', None),  # input width of a cross-tower projection (vision -> Q-Former -> LLM)
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('head_dim', None),
    ('vocab', 'tensor'),
    ('layers', None),
    ('norm', None),
)


def parse_mesh(spec: str | Mapping[str, int] | None, num_devices: int | None = None) -> dict[str, int]:
  """'fsdp=8' or 'data=2,fsdp=2,tensor=2' -> {'data': .., 'fsdp': .., 'tensor': ..}.

  Unnamed axes are 1, except that with nothing given every device goes to `fsdp`; one axis may be -1
  (whatever the others leave).
  """
  num_devices = num_devices or jax.device_count()
  if isinstance(spec, str):
    sizes = {}
    for part in filter(None, (p.strip() for p in spec.split(','))):
      name, _, value = part.partition('=')
      if name not in MESH_AXES or not value.lstrip('-').isdigit():
        raise ValueError(f'bad mesh spec {spec!r}: write e.g. "fsdp=8" or "data=2,fsdp=2,tensor=2" '
                         f'(axes {MESH_AXES})')
      sizes[name] = int(value)
  else:
    sizes = dict(spec or {})
  if not sizes:
    sizes = {'fsdp': -1}
  sizes = {axis: sizes.get(axis, 1) for axis in MESH_AXES}
  if list(sizes.values()).count(-1) > 1:
    raise ValueError(f'at most one mesh axis may be -1, got {sizes}')
  known = math.prod(v for v in sizes.values() if v != -1)
  for axis, v in sizes.items():
    if v == -1:
      sizes[axis] = num_devices // known
  needed = math.prod(sizes.values())
  if needed > num_devices or (needed < num_devices and jax.process_count() > 1):
    raise ValueError(f'mesh {sizes} needs {needed} devices, but {num_devices} are available')
  return sizes


def make_mesh(spec: str | Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh with Auto axis types (what linen's logical constraints need).

  A single-process mesh may use fewer than all devices (the first ones), e.g. 'fsdp=1' for a debug run.
  """
  devices = list(devices) if devices is not None else jax.devices()
  sizes = parse_mesh(spec, len(devices))
  devices = devices[:math.prod(sizes.values())]
  return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


@contextlib.contextmanager
def activate(mesh: Mesh) -> Iterator[None]:
  """Inside: activation constraints in the models take effect on `mesh`."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    yield


def _mesh_axes(logical: Sequence[str | None]) -> list[Any]:
  rules = dict(LOGICAL_AXIS_RULES)
  unknown = [name for name in logical if name is not None and name not in rules]
  if unknown:
    raise KeyError(f'logical axes {unknown} have no rule in sharding.LOGICAL_AXIS_RULES')
  return [rules[name] if name is not None else None for name in logical]


def spec_for(shape: Sequence[int], logical: Sequence[str | None], mesh: Mesh) -> tuple[PartitionSpec, list[str]]:
  """PartitionSpec for an array of `shape` with logical axes `logical`, and notes on replicated dims.

  A mesh axis is used at most once per array (first dimension wins) and only where it divides the dim.
  """
  used, spec, notes = set(), [], []
  for dim, name, axes in zip(shape, logical, _mesh_axes(logical)):
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in axes)
    if axes and dim % size:
      notes.append(f'{name} ({dim}) is not divisible by {"x".join(axes)} ({size}): replicated')
      axes = ()
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return PartitionSpec(*spec), notes


def param_shardings(abstract_variables: Any, mesh: Mesh) -> Any:
  """Boxed abstract params (from `jax.eval_shape(model.init, ...)`) -> a matching tree of NamedShardings."""
  return jax.tree_util.tree_map(lambda box: NamedSharding(mesh, spec_for(box.value.shape, box.names, mesh)[0]),
                                _params(abstract_variables), is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _params(variables: Any) -> Any:
  return variables['params'] if isinstance(variables, Mapping) and 'params' in variables else variables


def cache_key(shardings: Any) -> tuple[Any, tuple[NamedSharding, ...]]:
  """A tree of shardings as something hashable (its structure and its leaves), to key a cache of jitted programs."""
  leaves, treedef = jax.tree_util.tree_flatten(shardings)
  return treedef, tuple(leaves)


def from_cache_key(key: tuple[Any, tuple[NamedSharding, ...]]) -> Any:
  return jax.tree_util.tree_unflatten(*key)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) dimension over ('data', 'fsdp'), the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(('data', 'fsdp'), *([None] * (ndim - 1))))


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Places this process's part of a batch (numpy) on the mesh, split along the batch dimension. With several
  processes each passes its own rows (batch_size / process_count); the global batch is their parts in process
  order (each process's devices hold a contiguous block of rows)."""
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  for k, v in batch.items():
    if np.shape(v)[0] * jax.process_count() % shards:
      raise ValueError(f'batch[{k!r}] has {np.shape(v)[0] * jax.process_count()} rows, not a multiple of data x '
                       f'fsdp = {shards}: make the batch size a multiple of it')
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
          for k, v in batch.items()}


def shard_params(params: Any, shardings: Any) -> Any:
  """Places host params (numpy or jax arrays) according to `shardings`."""
  return jax.tree_util.tree_map(jax.device_put, params, shardings)
