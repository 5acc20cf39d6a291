"""Typed views of ml_collections configs.

Config files build `ml_collections.ConfigDict`s (overridable on the command line); modules take frozen
dataclasses. `from_dict` turns one into the other and names any unknown or mistyped key, so a typo such as
`--config.model.llm.num_layer=2` fails at once instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import types
import typing
from typing import Any, Mapping, TypeVar

import ml_collections

T = TypeVar('T')


def to_dict(value: Any) -> Any:
  """ConfigDicts (nested) to plain dicts; other values unchanged."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {k: to_dict(v) for k, v in value.items()}
  return value


def from_dict(cls: type[T], values: Any, where: str) -> T:
  """Builds dataclass `cls` from a mapping (or returns `values` if it already is one).

  Nested dataclass fields are built recursively; `where` is the dotted config path used in errors.
  """
  if isinstance(values, cls):
    return values
  values = to_dict(values)
  if not isinstance(values, Mapping):
    raise TypeError(f'{where} must be a mapping of fields of {cls.__name__}, got {type(values).__name__}')
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = [k for k in values if k not in fields]
  if unknown:
    hints = []
    for key in unknown:
      close = difflib.get_close_matches(key, fields, n=1)
      hints.append(f'{where}.{key}' + (f' (did you mean {where}.{close[0]}?)' if close else ''))
    raise ValueError(f'unknown config keys: {", ".join(hints)}. Known keys of {where}: {", ".join(fields)}')
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for key, value in values.items():
    kind = hints[key]
    if dataclasses.is_dataclass(kind):
      kwargs[key] = from_dict(kind, value, f'{where}.{key}')
    else:
      kwargs[key] = _coerce(kind, value, f'{where}.{key}')
  return cls(**kwargs)


def _coerce(kind: Any, value: Any, where: str) -> Any:
  if typing.get_origin(kind) is tuple:
    if not isinstance(value, (list, tuple)):
      raise TypeError(f'{where} must be a sequence, got {value!r}')
    return tuple(value)
  if kind is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if kind in (int, float, str, bool) and not isinstance(value, kind):
    raise TypeError(f'{where} must be {kind.__name__}, got {value!r} ({type(value).__name__})')
  if kind is int and isinstance(value, bool):
    raise TypeError(f'{where} must be int, got {value!r}')
  return value


def to_config_dict(instance: Any) -> ml_collections.ConfigDict:
  """A dataclass (nested) as a ConfigDict, for config files to start from."""
  return ml_collections.ConfigDict(dataclasses.asdict(instance))


def load_config_module(path: str) -> types.ModuleType:
  """A config file as a module (its `get_config()` and its constants), with a clear error for a bad path."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file {path!r} does not exist (configs live in configs/, e.g. configs/tiny.py)')
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise AttributeError(f'{path} has no get_config() function')
  return module


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """Runs `get_config()` of a config file (as `--config path` does), with a clear error for a bad path."""
  return load_config_module(path).get_config()
