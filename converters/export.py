"""Export our parameters back to a Hugging Face checkpoint: config.json, model.safetensors, tokenizer.

The tensors use the released per-expert names of the family (e.g. Mixtral
`block_sparse_moe.experts.{e}.w1.weight`), which transformers 4 and 5 both load. The output
directory appears only when complete: everything is written into `<out>.partial` first.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Iterable

import numpy as np
from safetensors.numpy import save_file

from prism_jax.checkpoint import TOKENIZER_DIR, load_params
from prism_jax.config import ModelConfig

from converters.errors import ConversionError
from converters.key_table import item_tables
from converters.params_tree import expected_item_shapes, flatten, get_path, items_of
from converters.registry import get_family

logger = logging.getLogger(__name__)


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
  """Raise FileExistsError when `out_dir` contains files and `overwrite` is false, or is not a directory."""
  if out_dir.exists() and not out_dir.is_dir():
    raise FileExistsError(f"output path {out_dir} is a file, not a directory; choose another path")
  if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
    raise FileExistsError(f"output directory {out_dir} exists and is not empty; pass overwrite=True "
                          "(--overwrite) to replace it or choose another path")


def hf_tensors(config: ModelConfig, params: dict) -> dict[str, np.ndarray]:
  """{Hugging Face key: tensor} for expert-layout (N=1) params, checked against the config's shapes."""
  family = get_family(config.family)
  expected = expected_item_shapes(config)
  items = dict(items_of(params))
  unknown = sorted(set(items) - set(expected))
  if unknown:
    raise ConversionError(f"params contain items {unknown} that a {config.family} model with this config does not "
                          f"have (expected {sorted(expected)})")
  layouts = [family.expert_layouts[0]] * config.num_layers
  tensors: dict[str, np.ndarray] = {}
  for table in item_tables(config, layouts):
    if table.item not in items:
      raise ConversionError(f"params have no item {table.item!r}; export needs the whole model")
    leaves = {path: np.asarray(leaf) for path, leaf in flatten(items[table.item])}
    if set(leaves) != set(expected[table.item]):
      raise ConversionError(
          f"params item {table.item} has paths {sorted(leaves)}, but the model expects "
          f"{sorted(expected[table.item])}; export takes expert-layout params (N=1), not a partitioned model")
    for path, shape in expected[table.item].items():
      if leaves[path].shape != shape:
        raise ConversionError(f"parameter {table.item}.{path} has shape {leaves[path].shape}, expected {shape}")
    for row in table.rows:
      arrays = row.transform.save([get_path(items[table.item], path) for path in row.ours])
      tensors.update(zip(row.hf_keys(table.prefix, config.num_experts), arrays))
  return tensors


def export_params(config: ModelConfig, params: dict, out_dir: str | os.PathLike, *,
                  tokenizer_files: Iterable[str | os.PathLike] = (), overwrite: bool = False) -> Path:
  """Write a Hugging Face checkpoint directory for expert-layout params and return its path.

  Writes config.json (the family's fields), generation_config.json (unless a tokenizer file of
  that name is given), model.safetensors and copies of `tokenizer_files`.
  """
  out_dir = Path(out_dir)
  check_output_dir(out_dir, overwrite)
  hf_config = get_family(config.family).config_to_hf(config)
  tokenizer_files = [Path(f) for f in tokenizer_files]
  missing = [str(f) for f in tokenizer_files if not f.is_file()]
  if missing:
    raise FileNotFoundError(f"tokenizer files {missing} do not exist")
  # NOTE: keeps a Hugging Face copy of every tensor in memory, because one file is written at the end.
  tensors = hf_tensors(config, params)

  tmp_dir = out_dir.with_name(out_dir.name + ".partial")
  shutil.rmtree(tmp_dir, ignore_errors=True)
  tmp_dir.mkdir(parents=True)
  try:
    (tmp_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if "generation_config.json" not in {f.name for f in tokenizer_files}:
      generation = {key: hf_config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
      (tmp_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_file(tensors, tmp_dir / "model.safetensors", metadata={"format": "pt"})
    for file in tokenizer_files:
      shutil.copy2(file, tmp_dir / file.name)
    if out_dir.exists():
      shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
    os.replace(tmp_dir, out_dir)
  except BaseException:
    shutil.rmtree(tmp_dir, ignore_errors=True)
    raise
  logger.info("exported %s (%d tensors) to %s", config.family, len(tensors), out_dir)
  return out_dir


def export_checkpoint(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
  """Export a prism checkpoint directory (with its tokenizer files) to Hugging Face format."""
  ckpt_dir = Path(ckpt_dir)
  config, params, _ = load_params(ckpt_dir)
  tokenizer_dir = ckpt_dir / TOKENIZER_DIR
  files = sorted(p for p in tokenizer_dir.iterdir() if p.is_file()) if tokenizer_dir.is_dir() else []
  return export_params(config, params, out_dir, tokenizer_files=files, overwrite=overwrite)
