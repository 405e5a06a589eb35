"""On-disk prism checkpoint: config, orbax parameters saved item by item, tokenizer.

Layout of a checkpoint directory:

  config.json      the ModelConfig
  prism.json       format version, fingerprint, source description
  params/<item>/   one orbax checkpoint per item: "embed", "final_norm", "lm_head",
                   "layer_000", ... (so writing and reading stream one layer at a time)
  tokenizer/       tokenizer files copied from the source checkpoint, if any
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import orbax.checkpoint as ocp

from prism_jax.config import ModelConfig

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"


def layer_item(layer: int) -> str:
  return f"layer_{layer:03d}"


def fingerprint(config: ModelConfig, router_weights: Iterable[np.ndarray]) -> str:
  """Hash of the config and every MoE router weight: identifies a checkpoint cheaply."""
  digest = hashlib.sha256(config.to_json().encode())
  for weight in router_weights:
    digest.update(np.ascontiguousarray(np.asarray(weight, np.float32)).tobytes())
  return digest.hexdigest()[:16]


class CheckpointWriter:
  """Writes a checkpoint item by item into `<out>.partial`, renamed into place by `commit`."""

  def __init__(self, out_dir: str | os.PathLike, *, overwrite: bool = False):
    self.out_dir = Path(out_dir)
    if self.out_dir.exists() and any(self.out_dir.iterdir()) and not overwrite:
      raise FileExistsError(f"output directory {self.out_dir} exists and is not empty; pass overwrite=True "
                            "(--overwrite) to replace it or choose another path")
    self.tmp_dir = self.out_dir.with_name(self.out_dir.name + ".partial")
    if self.tmp_dir.exists():
      shutil.rmtree(self.tmp_dir)
    (self.tmp_dir / PARAMS_DIR).mkdir(parents=True)
    self._checkpointer = ocp.StandardCheckpointer()
    self._routers: list[np.ndarray] = []

  def write_item(self, name: str, tree: dict) -> None:
    self._checkpointer.save((self.tmp_dir / PARAMS_DIR / name).absolute(), tree)
    self._checkpointer.wait_until_finished()
    mlp = tree.get("mlp", {}) if isinstance(tree, dict) else {}
    if "router" in mlp:
      self._routers.append(np.asarray(mlp["router"]))

  def write_tokenizer(self, files: Iterable[Path]) -> None:
    files = list(files)
    if not files:
      return
    (self.tmp_dir / TOKENIZER_DIR).mkdir()
    for f in files:
      shutil.copy2(f, self.tmp_dir / TOKENIZER_DIR / f.name)

  def commit(self, config: ModelConfig, source: str) -> Path:
    (self.tmp_dir / "config.json").write_text(config.to_json())
    meta = {"format_version": FORMAT_VERSION, "fingerprint": fingerprint(config, self._routers), "source": source}
    (self.tmp_dir / "prism.json").write_text(json.dumps(meta, indent=2))
    self._checkpointer.close()
    if self.out_dir.exists():
      shutil.rmtree(self.out_dir)
    os.replace(self.tmp_dir, self.out_dir)
    logger.info("wrote checkpoint %s (fingerprint %s)", self.out_dir, meta["fingerprint"])
    return self.out_dir

  def abort(self) -> None:
    self._checkpointer.close()
    shutil.rmtree(self.tmp_dir, ignore_errors=True)


def save_params(out_dir: str | os.PathLike, config: ModelConfig, params: dict, *, source: str,
                tokenizer_files: Iterable[Path] = (), overwrite: bool = False) -> Path:
  """Save a whole expert-layout (N=1) pure-dict param tree as a checkpoint."""
  writer = CheckpointWriter(out_dir, overwrite=overwrite)
  try:
    for name, tree in split_items(params):
      writer.write_item(name, tree)
    writer.write_tokenizer(tokenizer_files)
    return writer.commit(config, source)
  except BaseException:
    writer.abort()
    raise


def split_items(params: dict) -> Iterator[tuple[str, dict]]:
  """Yield (item name, subtree) for a pure-dict param tree."""
  for key, value in params.items():
    if key == "layers":
      for layer, tree in sorted(value.items(), key=lambda kv: int(kv[0])):
        yield layer_item(int(layer)), tree
    else:
      yield key, value


def read_meta(path: str | os.PathLike) -> tuple[ModelConfig, dict]:
  path = Path(path)
  if not (path / "config.json").is_file() or not (path / "prism.json").is_file():
    raise FileNotFoundError(f"{path} is not a prism checkpoint (config.json or prism.json missing); "
                            "create one with `prism convert HF_DIR OUT_DIR`")
  config = ModelConfig.from_dict(json.loads((path / "config.json").read_text()))
  meta = json.loads((path / "prism.json").read_text())
  if meta.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path}: checkpoint format {meta.get('format_version')} is not the supported {FORMAT_VERSION}")
  return config, meta


def load_item(path: str | os.PathLike, name: str) -> dict:
  item = (Path(path) / PARAMS_DIR / name).absolute()
  if not item.exists():
    raise FileNotFoundError(f"checkpoint item {item} is missing; the checkpoint is incomplete, convert it again")
  with ocp.StandardCheckpointer() as checkpointer:
    tree = checkpointer.restore(item)
  return _to_numpy(tree)


def load_params(path: str | os.PathLike) -> tuple[ModelConfig, dict, dict]:
  """Load (config, expert-layout pure-dict params, metadata) from a checkpoint directory."""
  config, meta = read_meta(path)
  params: dict = {"layers": {}}
  for name in ("embed", "final_norm") + (() if config.tie_word_embeddings else ("lm_head",)):
    params[name] = load_item(path, name)
  for layer in range(config.num_layers):
    params["layers"][layer] = load_item(path, layer_item(layer))
  return config, params, meta


def _to_numpy(tree):
  if isinstance(tree, dict):
    return {k: _to_numpy(v) for k, v in tree.items()}
  return np.asarray(tree)
