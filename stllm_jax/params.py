"""Param trees: which leaves are frozen, and the split into trainable and frozen parts and back.

A leaf is named by its path joined with '/' ('llm/blocks/attn/query/kernel'); `train.frozen` and
`init.new_params` are regular expressions over these names, matched in full.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import flax


def flat(params: Mapping) -> dict[str, Any]:
  """{'a/b/c': leaf} of a nested param dict."""
  return flax.traverse_util.flatten_dict(dict(params), sep='/')


def nested(flat_params: Mapping[str, Any]) -> dict:
  return flax.traverse_util.unflatten_dict(dict(flat_params), sep='/')


def is_frozen(path: str, patterns: tuple[str, ...]) -> bool:
  return any(re.fullmatch(p, path) for p in patterns)


def split_params(params: Any, frozen_patterns: tuple[str, ...]) -> tuple[dict, dict]:
  """(trainable, frozen): two nested dicts with disjoint leaves whose union is `params`."""
  leaves = flat(params)
  trainable = {k: v for k, v in leaves.items() if not is_frozen(k, frozen_patterns)}
  frozen = {k: v for k, v in leaves.items() if is_frozen(k, frozen_patterns)}
  return nested(trainable), nested(frozen)


def merge_params(trainable: Mapping, frozen: Mapping) -> dict:
  return nested({**flat(frozen), **flat(trainable)})
