"""Held-out perplexity, a unigram baseline and expert load statistics of a model on token windows."""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from prism_jax.model import PrismModel


@dataclasses.dataclass(frozen=True)
class Perplexity:
  """Summed negative log-likelihood (nats) over `tokens` predicted tokens, and exp of its mean."""

  nll_sum: float
  tokens: int

  @property
  def mean_nll(self) -> float:
    return self.nll_sum / self.tokens

  @property
  def perplexity(self) -> float:
    return math.exp(self.mean_nll)


@dataclasses.dataclass(frozen=True)
class LayerLoad:
  """Routing of one MoE layer over the evaluated tokens.

  expert_fraction_E: share of the token's top-k slots that went to each expert (sums to 1).
  mean_max_prob: mean over tokens of the largest router probability (uniform routing gives 1/E).
  mean_entropy: mean router entropy in nats (uniform routing gives ln E).
  mean_topk_mass: mean router probability mass on the chosen top-k experts (uniform gives K/E).
  """

  expert_fraction_E: tuple[float, ...]
  mean_max_prob: float
  mean_entropy: float
  mean_topk_mass: float


def _windows_in_batches(windows_WT: np.ndarray, batch_size: int):
  for first in range(0, len(windows_WT), batch_size):
    yield windows_WT[first:first + batch_size]


def model_perplexity(model: PrismModel, windows_WT: np.ndarray, *, budget: int | None = None,
                     batch_size: int = 16) -> Perplexity:
  """Measure the perplexity of `model` on windows [W, T + 1]; the last T tokens of each window are the targets."""
  nll_sum, count = 0.0, 0
  for batch in _windows_in_batches(windows_WT, batch_size):
    logits_BTV = model(batch[:, :-1], budget=budget)
    log_probs = jax.nn.log_softmax(logits_BTV, axis=-1)
    targets = np.asarray(batch[:, 1:])
    picked = np.take_along_axis(np.asarray(log_probs), targets[..., None], axis=-1)[..., 0]
    nll_sum -= float(np.sum(picked.astype(np.float64)))
    count += targets.size
  return Perplexity(nll_sum=nll_sum, tokens=count)


def unigram_perplexity(train_stream: np.ndarray, windows_WT: np.ndarray, vocab_size: int) -> Perplexity:
  """Measure add-one-smoothed training-token frequencies on the same targets as `model_perplexity`."""
  counts_V = np.bincount(train_stream, minlength=vocab_size).astype(np.float64) + 1.0
  log_probs_V = np.log(counts_V / counts_V.sum())
  targets = windows_WT[:, 1:]
  return Perplexity(nll_sum=float(-np.sum(log_probs_V[targets])), tokens=targets.size)


def expert_load(model: PrismModel, windows_WT: np.ndarray, *, batch_size: int = 16) -> list[LayerLoad]:
  """Measure per-MoE-layer routing statistics of the full-budget model on the inputs of `windows_WT`."""
  num_experts = model.config.num_experts
  counts, max_prob, entropy, topk_mass, tokens = None, None, None, None, 0
  for batch in _windows_in_batches(windows_WT, batch_size):
    infos = model.forward(batch[:, :-1]).moe
    if counts is None:
      layers = len(infos)
      counts, max_prob, entropy, topk_mass = (np.zeros((layers, num_experts)), np.zeros(layers), np.zeros(layers),
                                              np.zeros(layers))
    for layer, info in enumerate(infos):
      probs_SE = np.asarray(info.router_probs_SE, np.float64)
      experts_SK = np.asarray(info.top_experts_SK)
      counts[layer] += np.bincount(experts_SK.reshape(-1), minlength=num_experts)
      max_prob[layer] += probs_SE.max(axis=-1).sum()
      entropy[layer] += -np.sum(probs_SE * np.log(np.maximum(probs_SE, 1e-30)))
      topk_mass[layer] += np.take_along_axis(probs_SE, experts_SK, axis=-1).sum()
    tokens += batch.shape[0] * (batch.shape[1] - 1)
  return [
      LayerLoad(
          expert_fraction_E=tuple(float(c) for c in counts[layer] / counts[layer].sum()),
          mean_max_prob=float(max_prob[layer] / tokens),
          mean_entropy=float(entropy[layer] / tokens),
          mean_topk_mass=float(topk_mass[layer] / tokens),
      )
      for layer in range(len(counts))
  ]

