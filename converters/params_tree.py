"""Helpers for our pure-dict parameter trees: dotted paths, items, and the shapes a config expects."""

from __future__ import annotations

from typing import Any, Iterator

import jax
import numpy as np
from flax import nnx

from prism_jax.checkpoint import layer_item
from prism_jax.config import ModelConfig
from prism_jax.decoder import Decoder


def get_path(tree: dict, path: str) -> Any:
  node = tree
  for part in path.split("."):
    node = node[part]
  return node


def set_path(tree: dict, path: str, value: Any) -> None:
  parts = path.split(".")
  node = tree
  for part in parts[:-1]:
    node = node.setdefault(part, {})
  node[parts[-1]] = value


def flatten(tree: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
  """Yield (dotted path, leaf) pairs."""
  for key, value in tree.items():
    path = f"{prefix}.{key}" if prefix else str(key)
    if isinstance(value, dict):
      yield from flatten(value, path)
    else:
      yield path, value


def expected_item_shapes(config: ModelConfig) -> dict[str, dict[str, tuple[int, ...]]]:
  """{item name: {dotted path: shape}} of an expert-layout (N=1) model, without allocating weights."""
  abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
  tree = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  shapes = jax.tree_util.tree_map(lambda x: tuple(x.shape), tree)
  return {name: dict(flatten(subtree)) for name, subtree in items_of(shapes)}


def items_of(params: dict) -> Iterator[tuple[str, dict]]:
  """Yield (checkpoint item name, subtree), layers as "layer_000", ... in order."""
  for key, value in params.items():
    if key == "layers":
      for layer in sorted(value, key=int):
        yield layer_item(int(layer)), value[layer]
    else:
      yield key, value


def as_numpy(tree: dict) -> dict:
  return jax.tree_util.tree_map(np.asarray, tree)
