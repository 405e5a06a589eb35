"""Measure the exported reference model and write its metrics file and model card."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tokenizers import Tokenizer

from prism_jax.config import ModelConfig
from prism_jax.model import PrismModel
from prism_jax.reference import data as text_data
from prism_jax.reference.evaluate import expert_load, model_perplexity, unigram_perplexity
from prism_jax.reference.tokenizer import encode_documents
from prism_jax.reference.train import eval_windows

METRICS_FILE = "eval_metrics.json"
CARD_FILE = "MODEL_CARD.md"
# Windows of the eval split that tests re-measure; the card also reports the whole split.
SLICE_WINDOWS = 16
SHIPPED_EVAL = "prism_jax.reference.data.default_text('eval') split into chapters by blank lines"


def eval_stream(tokenizer: Tokenizer) -> np.ndarray:
  """Tokenize the shipped eval split into one stream, each chapter followed by end-of-text."""
  return encode_documents(tokenizer, text_data.split_documents(text_data.default_text("eval")))


def train_stream(tokenizer: Tokenizer) -> np.ndarray:
  """Tokenize the shipped training split like `eval_stream`."""
  return encode_documents(tokenizer, text_data.split_documents(text_data.default_text("train")))


def slice_windows(tokenizer: Tokenizer, seq_len: int, windows: int = SLICE_WINDOWS) -> np.ndarray:
  """Cut the fixed eval slice of the metrics file: the first `windows` windows of `eval_stream`."""
  return eval_windows(eval_stream(tokenizer), seq_len, windows)


def parameter_counts(config: ModelConfig, params: dict) -> tuple[int, int]:
  """(total, active per token) parameter counts; a token runs K of the E experts of each MoE layer."""
  total = sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(params))
  inactive = 0
  for layer in config.moe_layer_indices:
    mlp = params["layers"][layer]["mlp"]
    expert_weights = sum(int(np.size(mlp[name])) for name in ("gate", "up", "down"))
    inactive += expert_weights * (config.num_experts - config.num_experts_per_tok) // config.num_experts
  return total, total - inactive


def measure(model: PrismModel, seq_len: int, train: np.ndarray, evaluation: np.ndarray,
            eval_source: str = SHIPPED_EVAL) -> dict[str, Any]:
  """Measure perplexities (model and unigram) on the eval slice and the whole eval text, and expert load.

  `train` and `evaluation` are token streams made like `train_stream` and `eval_stream`; the
  unigram baseline counts tokens of `train`.
  """
  whole = eval_windows(evaluation, seq_len)
  part = eval_windows(evaluation, seq_len, SLICE_WINDOWS)
  model_whole, model_part = model_perplexity(model, whole), model_perplexity(model, part)
  unigram_whole = unigram_perplexity(train, whole, model.config.vocab_size)
  unigram_part = unigram_perplexity(train, part, model.config.vocab_size)
  return {
      "slice": {
          "text": eval_source,
          "tokens": "the model's tokenizer.json, each chapter followed by <|endoftext|>, concatenated",
          "windows": f"first {SLICE_WINDOWS} windows: window w = tokens[w*{seq_len} : (w+1)*{seq_len} + 1]",
          "seq_len": seq_len,
          "num_windows": SLICE_WINDOWS,
          "predicted_tokens": model_part.tokens,
      },
      "slice_perplexity": model_part.perplexity,
      "slice_mean_nll": model_part.mean_nll,
      "slice_unigram_perplexity": unigram_part.perplexity,
      "eval_windows": len(whole),
      "eval_predicted_tokens": model_whole.tokens,
      "eval_perplexity": model_whole.perplexity,
      "eval_mean_nll": model_whole.mean_nll,
      "eval_unigram_perplexity": unigram_whole.perplexity,
      "expert_load": [dataclasses.asdict(layer) for layer in expert_load(model, whole)],
  }


def write_metrics(out_dir: Path, metrics: dict[str, Any]) -> Path:
  path = out_dir / METRICS_FILE
  path.write_text(json.dumps(metrics, indent=2) + "\n")
  return path


def read_metrics(model_dir: Path) -> dict[str, Any]:
  return json.loads((model_dir / METRICS_FILE).read_text())


def _load_table(config: ModelConfig, loads: list[dict[str, Any]]) -> list[str]:
  e, k = config.num_experts, config.num_experts_per_tok
  lines = [
      f"| MoE layer | min expert share | max expert share | mean max router prob | router entropy (nats) "
      f"| top-{k} prob mass |",
      "| --- | --- | --- | --- | --- | --- |",
      f"| uniform routing | {1 / e:.2%} | {1 / e:.2%} | {1 / e:.3f} | {math.log(e):.3f} | {k / e:.3f} |",
  ]
  for layer, load in enumerate(loads):
    share = load["expert_fraction_E"]
    lines.append(f"| {layer} | {min(share):.2%} | {max(share):.2%} | {load['mean_max_prob']:.3f} "
                 f"| {load['mean_entropy']:.3f} | {load['mean_topk_mass']:.3f} |")
  lines += ["", "Share of top-k slots per expert (percent), expert 0 first:", ""]
  for layer, load in enumerate(loads):
    lines.append(f"- layer {layer}: " + " ".join(f"{100 * s:.1f}" for s in load["expert_fraction_E"]))
  return lines


def write_card(out_dir: Path, config: ModelConfig, params: dict, run: dict[str, Any], metrics: dict[str, Any],
               commands: list[str]) -> Path:
  """Write MODEL_CARD.md from the run record (pipeline.RUN_FILE) and the measured metrics."""
  total, active = parameter_counts(config, params)
  train = run["train"]
  epochs = run["tokens_seen"] / run["train_tokens"]
  ratio = metrics["eval_unigram_perplexity"] / metrics["eval_perplexity"]
  lines = [
      "# prism-jax reference MoE (King James Bible, qwen3_moe)",
      "",
      "A small Mixture-of-Experts language model trained from scratch on CPU by `prism train-reference`, so that",
      "the project has a real trained MoE to split into sub-experts without downloading weights. It models one",
      "book in one style; it is a test subject, not a useful language model.",
      "",
      "## Architecture",
      "",
      "| field | value |",
      "| --- | --- |",
      f"| family | `{config.family}` (Hugging Face `Qwen3MoeForCausalLM`) |",
      f"| layers | {config.num_layers}, all MoE |",
      f"| hidden size D | {config.hidden_size} |",
      f"| attention | {config.num_heads} query heads, {config.num_kv_heads} key/value heads, head_dim "
      f"{config.head_dim}, per-head QK-norm, RoPE theta {config.rope.theta:g} |",
      f"| experts | E = {config.num_experts} SwiGLU experts of width F = {config.moe_intermediate_size}, "
      f"top-K = {config.num_experts_per_tok}, top-k weights renormalized |",
      f"| vocabulary | {config.vocab_size} byte-level BPE tokens, end-of-text id {config.eos_token_ids[0]} |",
      f"| embeddings | untied input embedding and LM head |",
      f"| parameters | {total:,} total, {active:,} active per token |",
      f"| weights | float32, {total * 4 / 2**20:.1f} MiB |",
      "",
      "## Data",
      "",
      "King James Bible from the Debian package bible-kjv-text (public domain; see ../TEXT_SOURCE.md). One",
      "document per chapter; chapter index i (Genesis 1 = 0) goes to eval when i % 20 == 10, to calibration",
      "when i % 20 == 15, and to training otherwise, so no chapter is in two splits.",
      "",
      f"- training split: {run['train_documents']} chapters, {run['train_tokens']:,} tokens",
      f"- eval split: {run['eval_documents']} chapters, {run['eval_tokens']:,} tokens",
      "",
      "## Training",
      "",
      f"- {train['steps']} AdamW steps (b2 {train['adam_b2']}, weight decay {train['weight_decay']} on matrices), "
      f"batch {train['batch_size']} x {train['seq_len']} tokens",
      f"- learning rate: linear warmup over {train['warmup_steps']} steps to {train['peak_learning_rate']:g}, "
      f"cosine decay to {train['peak_learning_rate'] * train['final_lr_fraction']:g}; gradient clipping at "
      f"global norm {train['grad_clip_norm']:g}",
      f"- loss: next-token cross-entropy + {train['load_balance_weight']:g} x Switch load-balancing loss "
      "(E * sum_e f_e P_e, averaged over layers)",
      f"- tokens seen: {run['tokens_seen']:,} ({epochs:.2f} passes over the training split), seed {train['seed']}",
      f"- time: {run['train_seconds'] / 60:.1f} minutes of training steps (evaluation and checkpoints not counted) "
      f"on {run['machine']}; JAX on CPU, float32",
      "",
      "## Results",
      "",
      f"Held-out perplexity on the whole eval split ({metrics['eval_predicted_tokens']:,} predicted tokens in "
      f"{metrics['eval_windows']} windows of {metrics['slice']['seq_len']} tokens, each token predicted once):",
      "",
      "| model | eval perplexity | eval slice perplexity |",
      "| --- | --- | --- |",
      f"| this model | {metrics['eval_perplexity']:.3f} | {metrics['slice_perplexity']:.4f} |",
      f"| unigram (training-split token frequencies, add-one) | {metrics['eval_unigram_perplexity']:.1f} "
      f"| {metrics['slice_unigram_perplexity']:.1f} |",
      "",
      f"The unigram baseline's perplexity is {ratio:.1f} times the model's. The eval slice "
      f"({metrics['slice']['windows']}; {metrics['slice']['predicted_tokens']:,} predicted tokens) is what "
      f"tests/test_reference_model.py re-measures after `prism convert`; its exact figures are in {METRICS_FILE}.",
      "",
      "## Expert load (whole eval split, full budget)",
      "",
      "Share of each expert in the top-k slots of all tokens (balance), and how peaked each token's router",
      "distribution is (specialization), against the values of uniform routing:",
      "",
      *_load_table(config, metrics["expert_load"]),
      "",
      "## Reproduce",
      "",
      "```",
      *commands,
      "```",
      "",
      "Runs are reproducible for a fixed seed up to floating-point summation order on the machine.",
      "",
  ]
  path = out_dir / CARD_FILE
  path.write_text("\n".join(lines))
  return path
