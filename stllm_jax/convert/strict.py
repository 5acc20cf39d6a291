"""Strict, streaming assembly of a parameter tree from named source tensors.

A checkpoint loads only if every source tensor is used exactly once and every target leaf is filled with
an array of the right shape; otherwise `CheckpointMismatch` lists what is missing, unused and mis-shaped.
Sources are read one at a time (a mapping whose values may be loaded lazily), converted to the target
dtype at once, and kept on the host, so peak memory stays near one copy of the output.

Name mappings (`stllm_jax.convert.mappings`) speak of unscanned layers (`blocks/layers_3/...`); where the
model scans its layers (`blocks/layers/...` with a leading layer axis) the per-layer arrays are stacked here.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax
import jax
import ml_dtypes
import numpy as np

# (source-name regex, fn(match, array) -> [(target path, array), ...]); the regex must match the whole name.
Rule = tuple[str, Callable[[re.Match, np.ndarray], list[tuple[str, np.ndarray]]]]

SCAN_SEGMENT = 'layers'  # path segment of a scanned layer stack (see models.layers.LayerStack)


class CheckpointMismatch(ValueError):
  """The source tensors do not fill the model exactly; the message lists every problem."""

  def __init__(self, missing, unused, misshaped, other, source_name):
    self.missing, self.unused, self.misshaped, self.other = missing, unused, misshaped, other
    lines = [f'{source_name} does not match the model:']
    for title, items in (('missing (no source tensor for these model parameters)', missing),
                         ('unused (no model parameter takes these source tensors)', unused),
                         ('mis-shaped', misshaped), ('invalid', other)):
      if items:
        lines.append(f'  {title}: {len(items)}')
        lines.extend(f'    {item}' for item in items[:50])
        if len(items) > 50:
          lines.append(f'    ... and {len(items) - 50} more')
    super().__init__('\n'.join(lines))


def to_numpy(value: Any) -> np.ndarray:
  """torch tensor (any float dtype, bf16 included) or array-like -> numpy, exactly."""
  if hasattr(value, 'detach'):  # torch.Tensor, without importing torch here
    import torch  # pylint: disable=g-import-not-at-top
    value = value.detach().cpu()
    if value.dtype == torch.bfloat16:
      return value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return value.numpy()
  return np.asarray(value)


def refine_shape(source: Sequence[int], target: Sequence[int]) -> bool:
  """True when `target` only splits dims of `source` into consecutive groups ([D, H*hd] -> [D, H, hd]).

  A transposed matrix does not pass, even when the element counts agree.
  """
  target = list(target)
  pos = 0
  for dim in source:
    size = 1
    while pos < len(target) and size < dim:
      size *= target[pos]
      pos += 1
    if size != dim:
      return False
  return all(d == 1 for d in target[pos:])


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
  return flax.traverse_util.flatten_dict(tree, sep='/')


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  return flax.traverse_util.unflatten_dict(dict(flat), sep='/')


def _scanned(path: str) -> tuple[str, str] | None:
  """'llm/blocks/layers/mlp/up/kernel' -> ('llm/blocks/', '/mlp/up/kernel'), else None."""
  parts = path.split('/')
  if SCAN_SEGMENT not in parts:
    return None
  i = parts.index(SCAN_SEGMENT)
  return '/'.join(parts[:i]) + '/', '/' + '/'.join(parts[i + 1:])


def unscanned_template(template: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], Any]]:
  """Flat {path: leaf with .shape/.dtype} -> {unscanned path: (shape, dtype)}, one entry per layer."""
  out = {}
  for path, leaf in template.items():
    split = _scanned(path)
    if split is None:
      out[path] = (tuple(leaf.shape), leaf.dtype)
    else:
      head, tail = split
      for i in range(leaf.shape[0]):
        out[f'{head}{SCAN_SEGMENT}_{i}{tail}'] = (tuple(leaf.shape[1:]), leaf.dtype)
  return out


@dataclasses.dataclass
class _Assembly:
  expected: dict[str, tuple[tuple[int, ...], Any]]
  filled: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  filled_by: dict[str, str] = dataclasses.field(default_factory=dict)
  unused: list[str] = dataclasses.field(default_factory=list)
  misshaped: list[str] = dataclasses.field(default_factory=list)
  misshaped_paths: set[str] = dataclasses.field(default_factory=set)
  other: list[str] = dataclasses.field(default_factory=list)


def load_strict(tensors: Mapping[str, Any] | Iterable[tuple[str, Any]], rules: Sequence[Rule],
                template: Mapping[str, Any], source_name: str = 'the checkpoint',
                progress: Callable[[Iterable], Iterable] | None = None) -> dict[str, Any]:
  """Fills the flat `template` {path: leaf with .shape/.dtype} from `tensors`; returns a nested numpy tree.

  `tensors` maps source names to arrays, torch tensors, or zero-argument callables that load one (lazy).
  """
  state = _Assembly(unscanned_template(template))
  compiled = [(re.compile(pattern), fn) for pattern, fn in rules]
  items = tensors.items() if isinstance(tensors, Mapping) else tensors
  for name, value in (progress(items) if progress else items):
    rule = next(((m, fn) for pattern, fn in compiled if (m := pattern.fullmatch(name))), None)
    if rule is None:
      state.unused.append(f'{name}')
      continue
    array = to_numpy(value() if callable(value) else value)
    try:
      targets = rule[1](rule[0], array)
    except ValueError as err:
      state.other.append(f'{name}: {err}')
      continue
    for path, target_array in targets:
      _fill(state, name, path, target_array)
    del array
  missing = [f'{p} {list(shape)}' for p, (shape, _) in state.expected.items()
             if p not in state.filled and p not in state.misshaped_paths]
  if missing or state.unused or state.misshaped or state.other:
    raise CheckpointMismatch(missing, state.unused, state.misshaped, state.other, source_name)
  return unflatten(_restack(state.filled, template))


def _fill(state: _Assembly, name: str, path: str, array: np.ndarray) -> None:
  if path not in state.expected:
    state.unused.append(f'{name} {list(array.shape)} (would go to {path}, which the model does not have)')
    return
  if path in state.filled:
    state.other.append(f'{name}: {path} was already filled from {state.filled_by[path]}')
    return
  shape, dtype = state.expected[path]
  if not refine_shape(array.shape, shape):
    state.misshaped.append(f'{name} {list(array.shape)} -> {path} expects {list(shape)}')
    state.misshaped_paths.add(path)
    return
  state.filled[path] = np.ascontiguousarray(array.reshape(shape).astype(dtype, copy=False))
  state.filled_by[path] = name


def _restack(filled: dict[str, np.ndarray], flat_template: Mapping[str, Any]) -> dict[str, np.ndarray]:
  out = {}
  for path, leaf in flat_template.items():
    split = _scanned(path)
    if split is None:
      out[path] = filled.pop(path)
    else:
      head, tail = split
      out[path] = np.stack([filled.pop(f'{head}{SCAN_SEGMENT}_{i}{tail}') for i in range(leaf.shape[0])])
  return out


def abstract_leaves(abstract_variables: Any) -> dict[str, jax.ShapeDtypeStruct]:
  """Unboxed flat {path: ShapeDtypeStruct} of an `eval_shape`d init's params."""
  params = flax.linen.meta.unbox(abstract_variables)
  params = params.get('params', params)
  return flatten(params)


def num_elements(tree: Any) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))
