"""Sub-expert MoE layer: route, pick sub-experts for the budget, dispatch, combine.

Experts are stored as G = E*N groups of F/N neurons: `gate` and `up` are [G, D, F/N],
`down` is [G, F/N, D]. An unpartitioned model is the case N = 1. Sub-expert (e, s) is
group e*N + s, a contiguous slice of expert e after its neuron permutation.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from flax import struct

from prism_jax.budget import budget_pattern, row_patterns
from prism_jax.config import Backend, ModelConfig, SubExpertConfig
from prism_jax.grouped_matmul import grouped_matmul, resolve_backend
from prism_jax.layers import SwiGLU


@struct.dataclass
class Assignments:
  """Flat (token, group) pairs of one MoE layer; A = tokens x slots per token."""

  token_A: jax.Array
  group_A: jax.Array
  weight_A: jax.Array
  valid_A: jax.Array


@struct.dataclass
class MoEInfo:
  """Record of one MoE layer call: parent router probabilities, top-k experts, sub-experts run per token."""

  router_probs_SE: jax.Array
  top_experts_SK: jax.Array
  active_S: jax.Array


@dataclasses.dataclass(frozen=True)
class Dispatch:
  """Static settings of the grouped-matmul dispatch."""

  backend: Backend = "auto"
  tile_rows: int | None = None

  def __post_init__(self):
    # An explicit backend that cannot run here fails at load time, not at the first compile.
    if self.backend != "auto":
      resolve_backend(self.backend)


def route_parent(x_SD: jax.Array, router_DE: jax.Array, top_k: int,
                 normalize: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Softmax router in float32, then top-k; returns (weights [S, K], experts [S, K], probs [S, E])."""
  logits_SE = jnp.dot(x_SD.astype(jnp.float32), router_DE.astype(jnp.float32))
  probs_SE = jax.nn.softmax(logits_SE, axis=-1)
  weights_SK, experts_SK = jax.lax.top_k(probs_SE, top_k)
  if normalize:
    weights_SK = weights_SK / jnp.sum(weights_SK, axis=-1, keepdims=True)
  return weights_SK, experts_SK, probs_SE


def core_scores(x_SD: jax.Array, core_gate_DC: jax.Array, core_up_DC: jax.Array, experts_SK: jax.Array,
                num_experts: int, num_sub_experts: int, *, backend: Backend = "auto") -> jax.Array:
  """Score the sub-experts of each chosen expert by mean |silu(g) * u| over their core neurons: [S, K, N].

  Only the chosen experts' core neurons are computed, as a grouped matmul over (token, expert)
  pairs, so the cost follows the K columns of `experts_SK` rather than all E experts.
  """
  num_tokens, k = experts_SK.shape
  d, width = x_SD.shape[1], core_gate_DC.shape[1] // num_experts  # width = N * core neurons
  # [D, E * width] twice -> [E, D, 2 * width]: each expert's gate cores, then its up cores.
  cores_EDW = jnp.concatenate(
      [core_gate_DC.reshape(d, num_experts, width), core_up_DC.reshape(d, num_experts, width)], axis=-1
  ).transpose(1, 0, 2)
  # Worked example, K=2, experts [[3, 0], [0, 1]]: pairs [3, 0, 0, 1] sort to order [1, 2, 3, 0],
  # rows from tokens [0, 1, 1, 0], group sizes [2, 1, 0, 1]; the product then goes back to pair order.
  experts_R = experts_SK.reshape(-1)
  order_R = jnp.argsort(experts_R, stable=True)
  sizes_E = jnp.zeros((num_experts,), jnp.int32).at[experts_R].add(1)
  rows_RD = x_SD[order_R // k].astype(cores_EDW.dtype)
  sorted_RW = grouped_matmul(rows_RD, cores_EDW, sizes_E, backend=backend)
  act_RW = jnp.zeros_like(sorted_RW).at[order_R].set(sorted_RW)
  act = jnp.abs(jax.nn.silu(act_RW[:, :width]) * act_RW[:, width:]).astype(jnp.float32)
  return act.reshape(num_tokens, k, num_sub_experts, -1).mean(axis=-1)


def rank_sub_experts(score_SKN: jax.Array) -> jax.Array:
  """Order sub-experts by descending score; ties keep the lower sub-expert index first (stable sort)."""
  return jnp.argsort(-score_SKN, axis=-1, stable=True)


def linear_route(x_SD: jax.Array, linear_router_DG: jax.Array, num_sub_experts: int, budget: int,
                 valid_Sk: jax.Array, normalize: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Pick the top `budget` of all G sub-experts by softmax(x W_lin) * N.

  Returns (weights [S, k], groups [S, k], probabilities [S, k]): the weights are the scaled
  probabilities, renormalized over the valid slots to sum to N when `normalize`, so the full
  budget matches the parent router.
  """
  n = num_sub_experts
  logits_SG = jnp.dot(x_SD.astype(jnp.float32), linear_router_DG.astype(jnp.float32))
  probs_SG = jax.nn.softmax(logits_SG, axis=-1)
  probs_Sk, groups_Sk = jax.lax.top_k(probs_SG, budget)
  weights_Sk = probs_Sk * n
  if normalize:
    selected = jnp.sum(jnp.where(valid_Sk, weights_Sk, 0.0), axis=-1, keepdims=True)
    weights_Sk = weights_Sk * n / jnp.maximum(selected, 1e-20)
  return weights_Sk, groups_Sk.astype(jnp.int32), probs_Sk


class SubExpertMoE(nnx.Module):
  """One MoE feed-forward layer whose experts run as sub-experts under a budget."""

  def __init__(self, config: ModelConfig, sub: SubExpertConfig, dispatch: Dispatch, *, rngs: nnx.Rngs):
    sub.check_divides(config.moe_intermediate_size)
    dtype = jnp.dtype(config.dtype)
    d, e, n = config.hidden_size, config.num_experts, sub.num_sub_experts
    g, width = e * n, config.moe_intermediate_size // n
    init = nnx.initializers.normal(0.02)
    self.router = nnx.Param(init(rngs.params(), (d, e), dtype))
    self.gate = nnx.Param(init(rngs.params(), (g, d, width), dtype))
    self.up = nnx.Param(init(rngs.params(), (g, d, width), dtype))
    self.down = nnx.Param(init(rngs.params(), (g, width, d), dtype))
    if n > 1 and sub.router == "compound":
      cores = e * n * sub.num_core_neurons
      self.core_gate = nnx.Param(jnp.zeros((d, cores), dtype))
      self.core_up = nnx.Param(jnp.zeros((d, cores), dtype))
    if sub.router == "linear" and n > 1:
      self.linear_router = nnx.Param(jnp.zeros((d, g), dtype))
    if config.shared_expert_intermediate_size:
      self.shared_expert = SwiGLU(d, config.shared_expert_intermediate_size, dtype=dtype, rngs=rngs)
      self.shared_expert_gate = nnx.Param(init(rngs.params(), (d, 1), dtype))
    self.num_experts, self.num_sub_experts, self.top_k = e, n, config.num_experts_per_tok
    self.router_kind = sub.router if n > 1 else "compound"
    self.normalize = config.norm_topk_prob
    self.dispatch = dispatch

  @property
  def full_budget(self) -> int:
    return self.num_sub_experts * self.top_k

  def _sub_expert_order(self, x_SD: jax.Array, experts_SR: jax.Array) -> jax.Array:
    """Rank the sub-experts of each given expert by mean |silu(g) * u| over their core neurons: [S, R, N]."""
    score_SRN = core_scores(x_SD, self.core_gate[...], self.core_up[...], experts_SR, self.num_experts,
                            self.num_sub_experts, backend=self.dispatch.backend)
    return rank_sub_experts(score_SRN)

  def _compound_assignments(
      self, x_SD: jax.Array, valid_S: jax.Array, budget: int, budget_S: jax.Array | None
  ) -> tuple[Assignments, jax.Array, jax.Array]:
    n = self.num_sub_experts
    weights_SK, experts_SK, probs_SE = route_parent(x_SD, self.router[...], self.top_k, self.normalize)
    pattern = budget_pattern(budget, n, self.top_k)
    counts_SK = None if budget_S is None else row_patterns(budget_S, n, self.top_k)
    # Only ranks that run part of their expert need an order; per-row budgets may cut any rank.
    if n == 1:
      ranked = ()
    elif budget_S is not None:
      ranked = tuple(range(self.top_k))
    else:
      ranked = tuple(rank for rank, count in enumerate(pattern) if 0 < count < n)
    order_SRN = self._sub_expert_order(x_SD, experts_SK[:, list(ranked)]) if ranked else None

    num_tokens = x_SD.shape[0]
    groups, weights, valids = [], [], []
    for rank, count in enumerate(pattern):
      for j in range(count):
        if rank in ranked:
          sub_expert = order_SRN[:, ranked.index(rank), j]
        else:
          sub_expert = jnp.full((num_tokens,), j)
        groups.append(experts_SK[:, rank] * n + sub_expert)
        weights.append(weights_SK[:, rank])
        valid = valid_S if counts_SK is None else valid_S & (j < counts_SK[:, rank])
        valids.append(valid)
    slots = len(groups)
    assignments = Assignments(
        token_A=jnp.repeat(jnp.arange(num_tokens), slots),
        group_A=jnp.stack(groups, axis=1).reshape(-1).astype(jnp.int32),
        weight_A=jnp.stack(weights, axis=1).reshape(-1),
        valid_A=jnp.stack(valids, axis=1).reshape(-1),
    )
    return assignments, experts_SK, probs_SE

  def _linear_assignments(
      self, x_SD: jax.Array, valid_S: jax.Array, budget: int, budget_S: jax.Array | None
  ) -> tuple[Assignments, jax.Array, jax.Array]:
    """Top-k' over all G sub-experts; softmax over G times N so the full budget matches the parent."""
    _, experts_SK, probs_SE = route_parent(x_SD, self.router[...], self.top_k, self.normalize)
    slot = jnp.arange(budget)[None, :]
    valid_Sk = valid_S[:, None] & (slot < (budget if budget_S is None else budget_S[:, None]))
    weights_Sk, groups_Sk, _ = linear_route(x_SD, self.linear_router[...], self.num_sub_experts, budget, valid_Sk,
                                            self.normalize)
    assignments = Assignments(
        token_A=jnp.repeat(jnp.arange(x_SD.shape[0]), budget),
        group_A=groups_Sk.reshape(-1),
        weight_A=weights_Sk.reshape(-1),
        valid_A=valid_Sk.reshape(-1),
    )
    return assignments, experts_SK, probs_SE

  def _run_groups(self, x_SD: jax.Array, assign: Assignments) -> jax.Array:
    """Sort assignments by group, run the grouped SwiGLU, scatter-add weighted rows back."""
    num_groups = self.num_experts * self.num_sub_experts
    # Worked example, groups [2, 0, 2] with the middle one invalid: keys [2, G, 2] sort to
    # order [0, 2, 1], group sizes [0, 0, 2, ...]; the invalid row lands past the groups.
    key_A = jnp.where(assign.valid_A, assign.group_A, num_groups)
    order_A = jnp.argsort(key_A, stable=True)
    sizes_G = jnp.zeros((num_groups,), jnp.int32).at[assign.group_A].add(assign.valid_A.astype(jnp.int32))
    token_sorted = assign.token_A[order_A]
    rows_AD = x_SD[token_sorted].astype(self.gate.dtype)
    kwargs = dict(backend=self.dispatch.backend, tile_rows=self.dispatch.tile_rows)
    with jax.named_scope("experts"):
      gate = grouped_matmul(rows_AD, self.gate[...], sizes_G, **kwargs)
      up = grouped_matmul(rows_AD, self.up[...], sizes_G, **kwargs)
      out_AD = grouped_matmul(jax.nn.silu(gate) * up, self.down[...], sizes_G, **kwargs)
    with jax.named_scope("combine"):
      scale_A = jnp.where(assign.valid_A, assign.weight_A, 0.0)[order_A]
      out_AD = out_AD.astype(jnp.float32) * scale_A[:, None]
      y_SD = jnp.zeros(x_SD.shape, jnp.float32).at[token_sorted].add(out_AD)
    return y_SD

  def __call__(
      self, x_SD: jax.Array, valid_S: jax.Array, budget: int | None = None, budget_S: jax.Array | None = None
  ) -> tuple[jax.Array, MoEInfo]:
    """Apply the layer to flattened tokens; `budget` is static, `budget_S` optional per-token budgets."""
    budget = self.full_budget if budget is None else budget
    with jax.named_scope("route"):
      if self.router_kind == "linear":
        assign, experts_SK, probs_SE = self._linear_assignments(x_SD, valid_S, budget, budget_S)
      else:
        assign, experts_SK, probs_SE = self._compound_assignments(x_SD, valid_S, budget, budget_S)
    with jax.named_scope("dispatch"):
      y_SD = self._run_groups(x_SD, assign)
    if hasattr(self, "shared_expert"):
      gate_S1 = jax.nn.sigmoid(jnp.dot(x_SD, self.shared_expert_gate[...]).astype(jnp.float32))
      y_SD = y_SD + gate_S1 * self.shared_expert(x_SD).astype(jnp.float32)
    active_S = jnp.zeros((x_SD.shape[0],), jnp.int32).at[assign.token_A].add(assign.valid_A.astype(jnp.int32))
    return y_SD.astype(x_SD.dtype), MoEInfo(router_probs_SE=probs_SE, top_experts_SK=experts_SK, active_S=active_S)
