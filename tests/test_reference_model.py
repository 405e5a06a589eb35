"""The shipped reference model: files, conversion, held-out perplexity against its card, routing."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from tokenizers import Tokenizer

import prism_jax
from prism_jax.reference import DEFAULT_MODEL_DIR, default_model_dir
from prism_jax.reference.card import CARD_FILE, METRICS_FILE, read_metrics, slice_windows, train_stream
from prism_jax.reference.evaluate import expert_load, model_perplexity, unigram_perplexity

MODEL_DIR = DEFAULT_MODEL_DIR
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", CARD_FILE,
                  METRICS_FILE)


@pytest.fixture(scope="module")
def metrics():
  return read_metrics(MODEL_DIR)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  convert = pytest.importorskip("converters.convert")
  path = convert.convert_checkpoint(MODEL_DIR, tmp_path_factory.mktemp("reference") / "prism")
  return prism_jax.load(path)


@pytest.fixture(scope="module")
def windows(converted, metrics):
  return slice_windows(converted.tokenizer, metrics["slice"]["seq_len"], metrics["slice"]["num_windows"])


def test_shipped_files_exist():
  assert default_model_dir() == MODEL_DIR
  for name in REQUIRED_FILES:
    assert (MODEL_DIR / name).is_file(), f"{name} missing from {MODEL_DIR}"
  size = sum(p.stat().st_size for p in MODEL_DIR.iterdir())
  assert size < 25 * 2**20, f"shipped model takes {size / 2**20:.1f} MiB"


def test_shipped_config_shape():
  config = json.loads((MODEL_DIR / "config.json").read_text())
  assert config["model_type"] == "qwen3_moe"
  assert config["num_experts"] >= 16
  assert config["num_experts_per_tok"] >= 4
  assert config["moe_intermediate_size"] % 8 == 0
  assert config["num_hidden_layers"] == 4


def test_shipped_tokenizer_loads():
  tokenizer = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
  config = json.loads((MODEL_DIR / "config.json").read_text())
  assert tokenizer.get_vocab_size() == config["vocab_size"]
  assert tokenizer.token_to_id("<|endoftext|>") == config["eos_token_id"]
  text = "And God said, Let there be light: and there was light."
  assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_converted_model_matches_card(converted, windows, metrics):
  measured = model_perplexity(converted, windows)
  assert measured.tokens == metrics["slice"]["predicted_tokens"]
  recorded = metrics["slice_perplexity"]
  assert measured.perplexity == pytest.approx(recorded, rel=1e-4), (
      f"slice perplexity {measured.perplexity:.6f}, card says {recorded:.6f}")
  card = (MODEL_DIR / CARD_FILE).read_text()
  assert f"{recorded:.4f}" in card, "MODEL_CARD.md does not show the slice perplexity of eval_metrics.json"
  assert f"{metrics['eval_perplexity']:.3f}" in card


def test_unigram_far_above_model(converted, windows, metrics):
  unigram = unigram_perplexity(train_stream(converted.tokenizer), windows, converted.config.vocab_size)
  assert unigram.perplexity == pytest.approx(metrics["slice_unigram_perplexity"], rel=1e-6)
  assert unigram.perplexity > 3 * metrics["slice_perplexity"], (
      f"unigram {unigram.perplexity:.1f} vs model {metrics['slice_perplexity']:.1f}")


def test_routing_balanced_but_peaked(converted, windows):
  num_experts = converted.config.num_experts
  for layer, load in enumerate(expert_load(converted, windows)):
    share = np.asarray(load.expert_fraction_E)
    # No dead or dominant expert: every share within [0.1, 2] times the uniform 1/E. Layer 0 of the
    # shipped model gives two experts about 1% of the slots, so a tighter lower bound would fail.
    assert share.min() > 0.1 / num_experts, f"layer {layer}: expert shares {np.round(share, 3)}"
    assert share.max() < 2.0 / num_experts, f"layer {layer}: expert shares {np.round(share, 3)}"
    assert load.mean_max_prob > 2.0 / num_experts, f"layer {layer}: mean max router prob {load.mean_max_prob:.3f}"
    assert load.mean_entropy < math.log(num_experts) - 0.3, f"layer {layer}: router entropy {load.mean_entropy:.3f}"


def test_transformers_agrees_on_perplexity(converted, windows):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  reference = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
  batch = windows[:4]
  with torch.no_grad():
    logits = reference(torch.as_tensor(batch[:, :-1], dtype=torch.long)).logits
  log_probs = torch.log_softmax(logits.double(), dim=-1)
  nll = -log_probs.gather(-1, torch.as_tensor(batch[:, 1:], dtype=torch.long)[..., None]).mean().item()
  ours = model_perplexity(converted, batch).mean_nll
  assert abs(nll - ours) < 1e-4, f"mean NLL: transformers {nll:.6f}, prism {ours:.6f}"
