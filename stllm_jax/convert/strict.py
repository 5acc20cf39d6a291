"""Strict, streaming assembly of a parameter tree from named source tensors.

A checkpoint loads only if every source tensor is used exactly once and every target leaf is filled with
an array of the right shape; otherwise `CheckpointMismatch` lists what is missing, unused and mis-shaped,
each by its source name and its target path (a missing one by the name the rules would read it from).
"Used" includes a rule that checks a tensor and stores nothing (a buffer the model computes, a block the
model deliberately lacks) and a duplicate that must equal another tensor (`same_as`).
Sources are read one at a time (a mapping or iterable whose values may be loaded lazily) and copied into
output leaves allocated once in the target dtype, so peak memory stays near one copy of the output.

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
  return {path: (slot.shape, slot.dtype) for path, slot in _slots(template).items()}


def unscanned_view(flat_params: Mapping[str, Any]) -> dict[str, Callable[[], np.ndarray]]:
  """Flat params (scanned stacks included) -> {unscanned path: loader of that layer's array}; the inverse
  of what `load_strict` assembles, for writing params back out one tensor at a time."""
  out = {}
  for path, leaf in flat_params.items():
    split = _scanned(path)
    if split is None:
      out[path] = lambda leaf=leaf: np.asarray(leaf)
    else:
      head, tail = split
      for i in range(leaf.shape[0]):
        out[f'{head}{SCAN_SEGMENT}_{i}{tail}'] = lambda leaf=leaf, i=i: np.asarray(leaf[i])
  return out


@dataclasses.dataclass(frozen=True)
class _Slot:
  """Where one unscanned path lands: the template leaf, and its layer index when that leaf is a scanned stack."""
  shape: tuple[int, ...]
  dtype: Any
  leaf: str
  index: int | None


@dataclasses.dataclass
class _Assembly:
  slots: dict[str, _Slot]
  template: Mapping[str, Any]
  leaves: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # output leaves, allocated on first use
  filled_by: dict[str, str] = dataclasses.field(default_factory=dict)  # unscanned path -> source name
  seen: set[str] = dataclasses.field(default_factory=set)
  duplicates: dict[str, list[tuple[str, np.ndarray]]] = dataclasses.field(default_factory=dict)
  unused: list[str] = dataclasses.field(default_factory=list)
  misshaped: list[str] = dataclasses.field(default_factory=list)
  misshaped_paths: set[str] = dataclasses.field(default_factory=set)
  other: list[str] = dataclasses.field(default_factory=list)


SAME_AS = '='  # a rule target '=path' means: this source tensor must equal the one that fills `path`


def same_as(path: str) -> str:
  """Rule target for a second copy of a tensor (e.g. a shared embedding saved twice): checked, not stored."""
  return SAME_AS + path


def _slots(template: Mapping[str, Any]) -> dict[str, _Slot]:
  out = {}
  for path, leaf in template.items():
    split = _scanned(path)
    if split is None:
      out[path] = _Slot(tuple(leaf.shape), np.dtype(leaf.dtype), path, None)
    else:
      head, tail = split
      for i in range(leaf.shape[0]):
        out[f'{head}{SCAN_SEGMENT}_{i}{tail}'] = _Slot(tuple(leaf.shape[1:]), np.dtype(leaf.dtype), path, i)
  return out


def load_strict(tensors: Mapping[str, Any] | Iterable[tuple[str, Any]], rules: Sequence[Rule],
                template: Mapping[str, Any], source_name: str = 'the checkpoint',
                progress: Callable[[Iterable], Iterable] | None = None) -> dict[str, Any]:
  """Fills the flat `template` {path: leaf with .shape/.dtype} from `tensors`; returns a nested numpy tree.

  `tensors` maps source names to arrays, torch tensors, or zero-argument callables that load one (lazy); an
  iterable of (name, value) pairs works too (a name given twice is an error). A rule may map a tensor to
  nothing (a checked buffer, a dropped block) or to `same_as(path)` (a duplicate that must equal `path`).
  Each output leaf is allocated once, in the template's dtype, and every source tensor is copied into it, so
  the result never aliases a (memory-mapped) source; scanned stacks are filled layer by layer in place.
  """
  state = _Assembly(_slots(template), template)
  compiled = [(re.compile(pattern), fn) for pattern, fn in rules]
  items = tensors.items() if isinstance(tensors, Mapping) else tensors
  for name, value in (progress(items) if progress else items):
    if name in state.seen:
      state.other.append(f'{name}: given twice by the source')
      continue
    state.seen.add(name)
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
      if path.startswith(SAME_AS):
        _check_duplicate(state, name, path[len(SAME_AS):], target_array)
      else:
        _fill(state, name, path, target_array)
    del array, targets
  for path, copies in state.duplicates.items():
    state.other.extend(f'{name}: a copy of {path}, which no source tensor fills' for name, _ in copies)
  missing = [_missing(rules, p, slot.shape) for p, slot in state.slots.items()
             if p not in state.filled_by and p not in state.misshaped_paths]
  if missing or state.unused or state.misshaped or state.other:
    raise CheckpointMismatch(missing, state.unused, state.misshaped, state.other, source_name)
  return unflatten(state.leaves)


def expected_source(rules: Sequence[Rule], path: str) -> str | None:
  """The source name the first rule that can say so would fill `path` from (a transform's `source_name`)."""
  for pattern, fn in rules:
    name = fn.source_name(pattern, path) if hasattr(fn, 'source_name') else None
    if name is not None:
      return name
  return None


def _missing(rules: Sequence[Rule], path: str, shape: tuple[int, ...]) -> str:
  """'source name -> path [shape]' of a parameter no source tensor fills ('path [shape]' if no rule names one)."""
  name = expected_source(rules, path)
  return f'{path} {list(shape)}' if name is None else f'{name} -> {path} {list(shape)}'


def _view(state: _Assembly, path: str) -> np.ndarray:
  """The part of an output leaf that `path` fills (allocating the leaf on first use)."""
  slot = state.slots[path]
  leaf = state.leaves.get(slot.leaf)
  if leaf is None:
    template_leaf = state.template[slot.leaf]
    leaf = state.leaves[slot.leaf] = np.empty(tuple(template_leaf.shape), np.dtype(template_leaf.dtype))
  return leaf if slot.index is None else leaf[slot.index]


def _fill(state: _Assembly, name: str, path: str, array: np.ndarray) -> None:
  slot = state.slots.get(path)
  if slot is None:
    state.unused.append(f'{name} {list(array.shape)} (would go to {path}, which the model does not have)')
    return
  if path in state.filled_by:
    state.other.append(f'{name}: {path} was already filled from {state.filled_by[path]}')
    return
  if not refine_shape(array.shape, slot.shape):
    state.misshaped.append(f'{name} {list(array.shape)} -> {path} expects {list(slot.shape)}')
    state.misshaped_paths.add(path)
    return
  _view(state, path)[...] = array.reshape(slot.shape)  # one copy, cast to the template dtype
  state.filled_by[path] = name
  for copy_name, copy in state.duplicates.pop(path, []):
    _compare(state, copy_name, path, copy)


def _check_duplicate(state: _Assembly, name: str, path: str, array: np.ndarray) -> None:
  if path not in state.slots:
    state.unused.append(f'{name} {list(array.shape)} (a copy of {path}, which the model does not have)')
  elif path in state.filled_by:
    _compare(state, name, path, array)
  else:  # the original comes later: keep this copy until then
    state.duplicates.setdefault(path, []).append((name, np.array(array)))


def _compare(state: _Assembly, name: str, path: str, array: np.ndarray) -> None:
  filled = _view(state, path)
  if not refine_shape(array.shape, filled.shape):
    state.misshaped.append(f'{name} {list(array.shape)} (a copy of {path}) expects {list(filled.shape)}')
  elif not np.array_equal(array.reshape(filled.shape).astype(filled.dtype), filled):
    state.other.append(f'{name}: should be a copy of {state.filled_by[path]} (-> {path}) but differs from it')


def abstract_leaves(abstract_variables: Any) -> dict[str, jax.ShapeDtypeStruct]:
  """Unboxed flat {path: ShapeDtypeStruct} of an `eval_shape`d init's params."""
  params = flax.linen.meta.unbox(abstract_variables)
  params = params.get('params', params)
  return flatten(params)


def num_elements(tree: Any) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))
