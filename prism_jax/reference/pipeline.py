"""The whole `prism train-reference` run: tokenizer, training, Hugging Face export, model card.

Every stage writes into a work directory, so running the same command again resumes:
training restarts from its last checkpoint, and a finished run goes straight to export.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from tokenizers import Tokenizer

from prism_jax.config import ModelConfig
from prism_jax.reference import card
from prism_jax.reference import data as text_data
from prism_jax.reference.recipe import TrainConfig, reference_model_config
from prism_jax.reference.tokenizer import (TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, encode_documents, end_of_text_id,
                                           save_tokenizer, train_tokenizer)
from prism_jax.reference.train import TrainResult, train

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
# Commands that rebuild the shipped model, listed in its model card.
REPRODUCE_COMMANDS = [
    "apt-get install bible-kjv-text                  # only to rebuild the text splits",
    "prism train-reference --prepare-text            # rewrites prism_jax/data/text/",
    "prism train-reference --out prism_jax/data/default_model --work runs/reference --overwrite",
    "prism convert prism_jax/data/default_model /tmp/reference-prism",
]


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """Inputs of one reference run."""

  train_text: Path | None
  eval_text: Path | None
  work_dir: Path
  out_dir: Path
  vocab_size: int
  train: TrainConfig
  overwrite: bool = False


def _documents(path: Path | None, split: text_data.Split) -> list[str]:
  text = text_data.default_text(split) if path is None else text_data.read_text(path)
  documents = text_data.split_documents(text)
  if not documents:
    raise ValueError(f"no documents in the {split} text {path or 'shipped with prism_jax'}")
  return documents


def prepare_tokenizer(documents: list[str], vocab_size: int, work_dir: Path, max_length: int) -> Tokenizer:
  """Train the tokenizer once per work directory; a rerun reads the saved one."""
  folder = work_dir / "tokenizer"
  if (folder / TOKENIZER_FILE).is_file():
    tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
    if tokenizer.get_vocab_size() != vocab_size:
      raise ValueError(f"{folder} contains a tokenizer of {tokenizer.get_vocab_size()} tokens, but vocab_size is "
                       f"{vocab_size}; use another --work directory")
    return tokenizer
  tokenizer = train_tokenizer(documents, vocab_size)
  save_tokenizer(tokenizer, folder, max_length)
  return tokenizer


def run(spec: RunSpec) -> Path:
  """Train (or resume), export to spec.out_dir in Hugging Face format, write the model card."""
  began = time.time()
  if spec.out_dir.exists() and any(spec.out_dir.iterdir()) and not spec.overwrite:
    raise FileExistsError(f"output directory {spec.out_dir} exists and is not empty; pass --overwrite to replace it")
  spec.work_dir.mkdir(parents=True, exist_ok=True)
  train_documents = _documents(spec.train_text, "train")
  eval_documents = _documents(spec.eval_text, "eval")
  config = reference_model_config(spec.vocab_size)
  tokenizer = prepare_tokenizer(train_documents, spec.vocab_size, spec.work_dir, config.max_position_embeddings)
  config = reference_model_config(spec.vocab_size, end_of_text_id(tokenizer))
  train_stream = encode_documents(tokenizer, train_documents)
  eval_stream = encode_documents(tokenizer, eval_documents)
  logger.info("training text: %d documents, %d tokens; eval text: %d documents, %d tokens",
              len(train_documents), len(train_stream), len(eval_documents), len(eval_stream))

  result = train(config, spec.train, train_stream, eval_stream, spec.work_dir)
  np.savez(spec.work_dir / "params.npz", **_flatten(result.params))
  record = {
      "model": config.to_dict(),
      "train": dataclasses.asdict(spec.train),
      "vocab_size": spec.vocab_size,
      "train_documents": len(train_documents),
      "train_tokens": int(len(train_stream)),
      "eval_documents": len(eval_documents),
      "eval_tokens": int(len(eval_stream)),
      "tokens_seen": result.tokens_seen,
      "train_seconds": round(result.train_seconds, 1),
      "final_eval_loss": result.final_eval_loss,
      "machine": _machine(),
  }
  (spec.work_dir / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")
  logger.info("trained %d steps (%d tokens) in %.0f s of step time; eval loss %.4f",
              result.steps, result.tokens_seen, result.train_seconds, result.final_eval_loss)

  export_dir = export_model(config, result, spec.work_dir, spec.out_dir)
  eval_source = card.SHIPPED_EVAL if spec.eval_text is None else f"{spec.eval_text} split by blank lines"
  write_model_card(export_dir, spec.work_dir, spec.train.seq_len, train_stream, eval_stream, eval_source)
  logger.info("run finished in %.0f s", time.time() - began)
  return export_dir


def export_model(config: ModelConfig, result: TrainResult, work_dir: Path, out_dir: Path) -> Path:
  """Write the Hugging Face directory (safetensors, config, tokenizer files) to `out_dir`."""
  from converters.export import export_params  # pylint: disable=import-outside-toplevel

  tokenizer_files = [work_dir / "tokenizer" / TOKENIZER_FILE, work_dir / "tokenizer" / TOKENIZER_CONFIG_FILE]
  # The caller has already checked that out_dir may be replaced.
  export_params(config, result.params, out_dir, tokenizer_files=tokenizer_files, overwrite=True)
  logger.info("exported the model to %s", out_dir)
  return out_dir


def write_model_card(model_dir: Path, work_dir: Path, seq_len: int, train_stream: np.ndarray,
                     eval_stream: np.ndarray, eval_source: str) -> Path:
  """Convert the exported model with the converter, measure it, write eval_metrics.json and MODEL_CARD.md.

  Measuring the converted checkpoint, not the in-memory weights, makes the figures the ones a
  user gets after `prism convert`.
  """
  from converters.convert import convert_checkpoint  # pylint: disable=import-outside-toplevel

  from prism_jax.model import load  # pylint: disable=import-outside-toplevel

  converted = convert_checkpoint(model_dir, work_dir / "converted", overwrite=True)
  model = load(converted)
  metrics = card.measure(model, seq_len, train_stream, eval_stream, eval_source)
  card.write_metrics(model_dir, metrics)
  run_record = json.loads((work_dir / RUN_FILE).read_text())
  params = jax.tree_util.tree_map(np.asarray, nnx.to_pure_dict(model.state))
  path = card.write_card(model_dir, model.config, params, run_record, metrics, REPRODUCE_COMMANDS)
  logger.info("eval perplexity %.3f (unigram %.1f); wrote %s", metrics["eval_perplexity"],
              metrics["eval_unigram_perplexity"], path)
  return path


def _machine() -> str:
  """CPU model and core count, for the model card."""
  model = platform.processor() or platform.machine()
  cpuinfo = Path("/proc/cpuinfo")
  if cpuinfo.is_file():
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")]
    model = names[0] if names else model
  return f"{model}, {os.cpu_count()} CPU cores visible"


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}.{key}" if prefix else str(key)
    if isinstance(value, dict):
      flat.update(_flatten(value, name))
    else:
      flat[name] = np.asarray(value)
  return flat
