"""Operating points: quality and cost of every budget, against top-k of the original model.

For each budget 1..N*K of the partitioned model, and for each k = 1..K of the original
model with top-k lowered, on held-out text: perplexity, agreement of the greedy next
token with the full model, routed-expert FLOPs per token (shared experts, attention and
routing excluded) and the median time of a jitted forward pass over one batch.

The top-k baseline keeps the first k ranked experts with the weights of the full top-K
routing, normalized over K when the config sets norm_topk_prob. It does not renormalize
them over k, exactly as budgets of the compound router keep their parent's weights. Pass
`renormalize_top_k=True` for the other convention.

A point is *stable* when its perplexity is within `tolerance` x the full model's and no
other point of the same kind is at least as cheap and as good, and better in one of the two.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from partition.calibration import Sequences, make_sequences
from partition.layerwise import top_k_forward_fn
from prism_jax.model import PrismModel

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CurveConfig:
  """Evaluation text shape, timing repeats and the stability tolerance."""

  tolerance: float = 1.25
  sequence_length: int = 256
  batch_size: int = 8
  max_tokens: int | None = None
  min_tokens: int = 16
  timing_repeats: int = 5
  renormalize_top_k: bool = False

  def __post_init__(self):
    if not self.tolerance >= 1.0:
      raise ValueError(f"tolerance must be >= 1 (a factor on the full model's perplexity), got {self.tolerance}")
    for name in ("sequence_length", "batch_size", "min_tokens", "timing_repeats"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class OperatingPoint:
  """One budget (kind "budget") or one top-k setting of the original model (kind "top_k")."""

  kind: str
  k: int
  perplexity: float
  agreement: float
  flops_per_token: float
  seconds: float
  stable: bool = False


@dataclasses.dataclass(frozen=True)
class Curve:
  points: tuple[OperatingPoint, ...]
  full_perplexity: float
  tolerance: float
  eval_tokens: int

  @property
  def stable_counts(self) -> dict[str, int]:
    return {kind: sum(p.stable for p in self.points if p.kind == kind) for kind in ("budget", "top_k")}

  @property
  def stable_ratio(self) -> float | None:
    counts = self.stable_counts
    return counts["budget"] / counts["top_k"] if counts["top_k"] else None

  def to_dict(self) -> dict[str, Any]:
    return {
        "points": [dataclasses.asdict(p) for p in self.points],
        "stable_counts": self.stable_counts,
        "stable_ratio": self.stable_ratio,
        "tolerance": self.tolerance,
        "full_perplexity": self.full_perplexity,
        "eval_tokens": self.eval_tokens,
    }


def mark_stable(points: Sequence[OperatingPoint], full_perplexity: float, tolerance: float) -> list[OperatingPoint]:
  """Set `stable` on each point: within tolerance and not dominated by a point of its kind."""
  limit = tolerance * full_perplexity
  marked = []
  for p in points:
    dominated = any(
        q is not p and q.kind == p.kind and q.flops_per_token <= p.flops_per_token and q.perplexity <= p.perplexity
        and (q.flops_per_token < p.flops_per_token or q.perplexity < p.perplexity) for q in points)
    marked.append(dataclasses.replace(p, stable=bool(p.perplexity <= limit and not dominated)))
  return marked


@jax.jit
def _score(logits_BTV, tokens_BT, valid_BT, reference_BT):
  """NLL sum, predicted positions, agreeing positions and greedy tokens of one batch."""
  logprobs = jax.nn.log_softmax(logits_BTV[:, :-1], axis=-1)
  targets = tokens_BT[:, 1:]
  mask = valid_BT[:, :-1] & valid_BT[:, 1:]
  nll = -jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
  greedy_BT = jnp.argmax(logits_BTV, axis=-1).astype(jnp.int32)
  agree = (greedy_BT[:, :-1] == reference_BT[:, :-1]) & mask
  return jnp.sum(jnp.where(mask, nll, 0.0)), jnp.sum(mask), jnp.sum(agree), greedy_BT


def _batches(sequences: Sequences, batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """Rows in batches of one shape (the last padded with invalid rows), so each point compiles once."""
  tokens, valid = sequences.tokens_BT, sequences.valid_BT
  rows = -(-tokens.shape[0] // batch_size) * batch_size
  pad = rows - tokens.shape[0]
  tokens = np.concatenate([tokens, np.zeros((pad, tokens.shape[1]), np.int32)])
  valid = np.concatenate([valid, np.zeros((pad, tokens.shape[1]), bool)])
  return [(tokens[r:r + batch_size], valid[r:r + batch_size]) for r in range(0, rows, batch_size)]


def _median_seconds(run: Callable[[], jax.Array], repeats: int) -> float:
  jax.block_until_ready(run())  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(run())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _evaluate(forward: Callable, batches, references) -> tuple[float, float, list[float]]:
  """Perplexity, agreement and the per-batch extra values `forward` returns beside the logits."""
  nll, count, agree, extras = 0.0, 0, 0, []
  for (tokens, valid), reference in zip(batches, references):
    logits, extra = forward(tokens, valid)
    batch_nll, batch_count, batch_agree, _ = _score(logits, jnp.asarray(tokens), jnp.asarray(valid), reference)
    nll, count, agree = nll + float(batch_nll), count + int(batch_count), agree + int(batch_agree)
    extras.append(extra)
  return float(np.exp(nll / max(count, 1))), agree / max(count, 1), extras


def budget_quality(full_model: PrismModel, partitioned: PrismModel, eval_tokens: Sequence[int] | np.ndarray,
                   budgets: Sequence[int], config: CurveConfig = CurveConfig()) -> list[tuple[float, float]]:
  """(perplexity, agreement with the full model) of `partitioned` at each budget."""
  mc = full_model.config
  sequences = make_sequences(eval_tokens, config.sequence_length, bos_token_id=mc.bos_token_id,
                             min_tokens=config.min_tokens, max_tokens=config.max_tokens, vocab_size=mc.vocab_size,
                             label="evaluation")
  batches = _batches(sequences, config.batch_size)
  references = [jnp.argmax(full_model(t, valid_BT=v), axis=-1).astype(jnp.int32) for t, v in batches]
  results = []
  for budget in budgets:
    forward = lambda tokens, valid, budget=budget: (partitioned(tokens, budget=budget, valid_BT=valid), 0.0)
    perplexity, agreement, _ = _evaluate(forward, batches, references)
    results.append((perplexity, agreement))
  return results


def measure_curve(full_model: PrismModel, partitioned: PrismModel, eval_tokens: Sequence[int] | np.ndarray,
                  config: CurveConfig = CurveConfig()) -> Curve:
  """Measure every budget of `partitioned` and every top-k of `full_model` on `eval_tokens`."""
  if full_model.num_sub_experts != 1:
    raise ValueError("full_model must be the unpartitioned checkpoint; load it without a partition")
  mc = full_model.config
  sequences = make_sequences(eval_tokens, config.sequence_length, bos_token_id=mc.bos_token_id,
                             min_tokens=config.min_tokens, max_tokens=config.max_tokens, vocab_size=mc.vocab_size,
                             label="evaluation")
  batches = _batches(sequences, config.batch_size)
  timing_tokens, timing_valid = (jnp.asarray(a) for a in batches[0])
  num_moe = len(mc.moe_layer_indices)
  n, top_k = partitioned.num_sub_experts, mc.num_experts_per_tok
  sub_expert_flops = 6 * mc.hidden_size * (mc.moe_intermediate_size // n)

  references = []
  for tokens, valid in batches:
    logits = full_model(tokens, valid_BT=valid)
    references.append(jnp.argmax(logits, axis=-1).astype(jnp.int32))
  points = []

  for budget in tqdm(range(1, partitioned.full_budget + 1), desc="budgets", leave=False):
    def forward(tokens, valid, budget=budget):
      out = partitioned.forward(tokens, budget=budget, valid_BT=valid)
      active = sum(float(jnp.sum(info.active_S)) for info in out.moe)
      return out.logits_BTV, active
    perplexity, agreement, active = _evaluate(forward, batches, references)
    flops = sub_expert_flops * sum(active) / sequences.num_tokens
    seconds = _median_seconds(lambda: partitioned(timing_tokens, budget=budget, valid_BT=timing_valid),
                              config.timing_repeats)
    points.append(OperatingPoint("budget", budget, perplexity, agreement, flops, seconds))

  for k in tqdm(range(1, top_k + 1), desc="top-k", leave=False):
    run = top_k_forward_fn(full_model, k, config.renormalize_top_k)
    perplexity, agreement, _ = _evaluate(lambda tokens, valid: (run(tokens, valid), 0.0), batches, references)
    flops = float(num_moe * k * n * sub_expert_flops)
    seconds = _median_seconds(functools.partial(run, timing_tokens, timing_valid), config.timing_repeats)
    points.append(OperatingPoint("top_k", k, perplexity, agreement, flops, seconds))

  full_perplexity = next(p.perplexity for p in points if p.kind == "top_k" and p.k == top_k)
  points = mark_stable(points, full_perplexity, config.tolerance)
  return Curve(tuple(points), full_perplexity, config.tolerance, sequences.num_tokens)


def format_table(curve: Curve) -> str:
  """Format the points and the stable counts as a readable table."""
  lines = [f"{'kind':>6} {'k':>4} {'perplexity':>11} {'agreement':>9} {'MFLOP/token':>12} {'ms':>9} stable"]
  for p in curve.points:
    lines.append(f"{p.kind:>6} {p.k:>4} {p.perplexity:>11.4f} {p.agreement:>9.3f} {p.flops_per_token / 1e6:>12.3f} "
                 f"{p.seconds * 1e3:>9.2f} {'yes' if p.stable else ''}")
  counts = curve.stable_counts
  ratio = curve.stable_ratio
  lines.append(f"full-model perplexity {curve.full_perplexity:.4f}; tolerance {curve.tolerance} "
               f"(perplexity <= {curve.tolerance * curve.full_perplexity:.4f})")
  lines.append(f"stable operating points: {counts['budget']} budgets vs {counts['top_k']} top-k settings "
               f"(ratio {'n/a' if ratio is None else f'{ratio:.2f}'})")
  return "\n".join(lines)
