"""Convert a Hugging Face MoE checkpoint into a prism checkpoint, streaming one layer at a time.

Everything that can be checked without reading tensor data is checked first. That covers the
family and every config field, the full set of tensor keys (each consumed by one table row,
none missing), every shape and dtype, truncated files and the output directory. Only then
are tensors read, one item (layer) at a time, and written with `CheckpointWriter`, so peak
memory stays near one layer's expert block and the output appears only when complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from prism_jax.checkpoint import CheckpointWriter
from prism_jax.config import ModelConfig, WeightDtype

from converters.errors import ConversionError
from converters.export import check_output_dir
from converters.family import Family
from converters.key_table import ExpertLayout, ItemTable, item_tables
from converters.params_tree import expected_item_shapes, set_path
from converters.registry import get_family
from converters.safetensors_io import FLOAT_DTYPES, TensorInfo, TensorReader, find_tensors

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
# Non-weight buffers that some older checkpoints saved. The runtime recomputes them from the config.
IGNORED_KEY_SUFFIXES = (".rotary_emb.inv_freq",)
_LISTED = 10


@dataclasses.dataclass(frozen=True)
class ConversionPlan:
  """A validated conversion: the config, the tensors on disk and the table of every output item."""

  hf_dir: Path
  family: Family
  config: ModelConfig
  tensors: dict[str, TensorInfo]
  tables: list[ItemTable]
  shapes: dict[str, dict[str, tuple[int, ...]]]
  tokenizer_files: list[Path]


def _listing(names: list[str]) -> str:
  shown = ", ".join(names[:_LISTED])
  return f"[{shown}{f', ... ({len(names) - _LISTED} more)' if len(names) > _LISTED else ''}]"


def read_config(hf_dir: Path, dtype: WeightDtype = "float32") -> tuple[Family, ModelConfig]:
  """Read config.json of a Hugging Face checkpoint directory and return its family and ModelConfig."""
  path = hf_dir / "config.json"
  if not path.is_file():
    raise ConversionError(f"{hf_dir} has no config.json; pass a Hugging Face checkpoint directory")
  try:
    data = json.loads(path.read_text())
  except json.JSONDecodeError as error:
    raise ConversionError(f"{path} is not valid JSON: {error}") from error
  family = get_family(data.get("model_type"))
  return family, family.config_from_hf(data, source=str(path), dtype=dtype)


def detect_layouts(family: Family, config: ModelConfig, keys: set[str]) -> list[ExpertLayout]:
  """Expert layout of each layer: the first of the family's layouts whose marker key is present.

  A layer with no marker gets the released layout, so missing-tensor errors name released keys.
  """
  layouts = []
  for layer in range(config.num_layers):
    prefix = f"model.layers.{layer}."
    found = [layout for layout in family.expert_layouts if prefix + layout.marker in keys]
    layouts.append(found[0] if found else family.expert_layouts[0])
  return layouts


def plan_conversion(hf_dir: str | os.PathLike, dtype: WeightDtype = "float32") -> ConversionPlan:
  """Validate a checkpoint from its config and safetensors headers, reading no tensor data."""
  hf_dir = Path(hf_dir)
  if not hf_dir.is_dir():
    raise ConversionError(f"{hf_dir} is not a directory; pass a Hugging Face checkpoint directory")
  family, config = read_config(hf_dir, dtype)
  tensors = find_tensors(hf_dir)
  tables = item_tables(config, detect_layouts(family, config, set(tensors)))
  shapes = expected_item_shapes(config)

  consumed, missing, problems = set(), [], []
  for table in tables:
    covered = sorted(path for row in table.rows for path in row.ours)
    if covered != sorted(shapes[table.item]):
      raise AssertionError(f"{family.model_type} key table for {table.item} covers {covered}, but the model has "
                           f"{sorted(shapes[table.item])}")
    for row in table.rows:
      keys = row.hf_keys(table.prefix, config.num_experts)
      expected = row.transform.hf_shapes([shapes[table.item][path] for path in row.ours])
      for key, shape in zip(keys, expected):
        consumed.add(key)
        if key not in tensors:
          missing.append(key)
        elif tensors[key].shape != shape:
          problems.append(f"Tensor {key} in {tensors[key].file.name} has shape {list(tensors[key].shape)}, but "
                          f"config.json implies {list(shape)}.")
        elif tensors[key].dtype not in FLOAT_DTYPES:
          problems.append(f"Tensor {key} in {tensors[key].file.name} has dtype {tensors[key].dtype}, but only "
                          f"{list(FLOAT_DTYPES)} weights are supported (quantized checkpoints are not).")
  if config.tie_word_embeddings and "lm_head.weight" in tensors:
    # transformers ignores a stored output layer when the embeddings are tied, and so do we.
    consumed.add("lm_head.weight")
  consumed.update(k for k in tensors if k.endswith(IGNORED_KEY_SUFFIXES))
  leftovers = sorted(set(tensors) - consumed)

  if missing:
    problems.insert(0, f"Tensors {_listing(missing)} ({len(missing)} in all) that the {family.model_type} config "
                       "requires are missing. Check that every shard is present and that config.json belongs to "
                       "these weights.")
  if leftovers:
    problems.append(f"Tensors {_listing(leftovers)} ({len(leftovers)} in all) are not consumed by the "
                    f"{family.model_type} key table. Either the checkpoint has parts this converter does not handle, "
                    "or config.json disagrees with the weights (for example in num_hidden_layers or num_experts).")
  if problems:
    raise ConversionError(f"cannot convert {hf_dir}:\n  " + "\n  ".join(problems))

  tokenizer_files = [hf_dir / name for name in TOKENIZER_FILES if (hf_dir / name).is_file()]
  return ConversionPlan(hf_dir, family, config, tensors, tables, shapes, tokenizer_files)


def convert_checkpoint(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: WeightDtype = "float32",
                       overwrite: bool = False) -> Path:
  """Convert a Hugging Face checkpoint directory into a prism checkpoint at `out_dir` and return its path."""
  out_dir = Path(out_dir)
  check_output_dir(out_dir, overwrite)
  plan = plan_conversion(hf_dir, dtype)
  config = plan.config
  target = np.dtype(jnp.dtype(dtype))
  layouts = sorted({table.layout.name for table in plan.tables if table.layout is not None})
  logger.info("converting %s: %s, %d layers, %d experts (top %d), expert layout %s, %d tensors", plan.hf_dir,
              config.family, config.num_layers, config.num_experts, config.num_experts_per_tok, "+".join(layouts),
              len(plan.tensors))

  writer = CheckpointWriter(out_dir, overwrite=overwrite)
  try:
    with TensorReader(plan.tensors) as reader:
      for table in tqdm(plan.tables, desc="convert", unit="item", disable=None):
        tree: dict = {}
        for row in table.rows:
          keys = row.hf_keys(table.prefix, config.num_experts)
          our_shapes = [plan.shapes[table.item][path] for path in row.ours]
          for path, array in zip(row.ours, row.transform.load(reader, keys, our_shapes, target)):
            set_path(tree, path, array)
          reader.release()
        writer.write_item(table.item, tree)
        del tree
    writer.write_tokenizer(plan.tokenizer_files)
    source = f"{config.family} from {plan.hf_dir.resolve()} ({'+'.join(layouts)} experts)"
    return writer.commit(config, source)
  except BaseException:
    writer.abort()
    raise
