"""Router-only fine-tuning of the linear sub-expert router with optax (expert weights frozen).

Each MoE layer trains on a sample of its calibration inputs, where the frozen sub-experts'
outputs are computed once. The loss compares the layer output at budget b (top-b
sub-experts under the trainable router, weighted as `SubExpertMoE` weights them) with the
original layer output: squared error relative to the latter's mean square, averaged over
budgets K..b_i at step i. The highest budget b_i rises linearly from K to N*K. Gradients reach the router through the routing weights only; the
top-b choice itself is piecewise constant.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from partition.config import RouterTuningConfig
from prism_jax.moe import route_parent
from prism_jax.subexperts import LayerPartition, split_expert_params

logger = logging.getLogger(__name__)


def sub_expert_outputs(x_SD: jax.Array, gate_GDW: jax.Array, up_GDW: jax.Array, down_GWD: jax.Array) -> jax.Array:
  """Output of every sub-expert on every token, unweighted: [S, G, D]."""
  hp = jax.lax.Precision.HIGHEST
  gate = jnp.einsum("sd,gdw->sgw", x_SD, gate_GDW, precision=hp)
  up = jnp.einsum("sd,gdw->sgw", x_SD, up_GDW, precision=hp)
  return jnp.einsum("sgw,gwd->sgd", jax.nn.silu(gate) * up, down_GWD, precision=hp)


def dense_linear_moe(x_SD: jax.Array, outputs_SGD: jax.Array, router_DG: jax.Array, budget: jax.Array,
                     num_sub_experts: int, normalize: bool, temperature: float | None = None) -> jax.Array:
  """Layer output with the linear router at a (traced) budget, weighted as `SubExpertMoE` does.

  Sub-expert probabilities are softmax over the G logits times N. The top `budget` run, and
  ties go to the lower index, as with lax.top_k. With `normalize` the selected weights are
  rescaled to sum to N. With a `temperature`, the gradient (not the value) treats the
  choice as relaxed: a sub-expert counts sigmoid((logit - cut) / temperature) times, with
  the cut midway between the budget-th and the next logit, so training also moves the choice.
  """
  n = num_sub_experts
  logits_SG = jnp.dot(x_SD, router_DG, precision=jax.lax.Precision.HIGHEST)
  probs_SG = jax.nn.softmax(logits_SG, axis=-1) * n
  # Worked example, probs [0.2, 0.5, 0.5] and budget 2: ranks [2, 0, 1] select groups 1 and 2.
  ranks_SG = jnp.argsort(jnp.argsort(-logits_SG, axis=-1, stable=True), axis=-1)
  selected_SG = (ranks_SG < budget).astype(probs_SG.dtype)
  if temperature is not None:
    num_groups = logits_SG.shape[-1]
    descending_SG = jax.lax.stop_gradient(-jnp.sort(-logits_SG, axis=-1))
    last_in = jnp.take(descending_SG, budget - 1, axis=-1)
    first_out = jnp.take(descending_SG, jnp.minimum(budget, num_groups - 1), axis=-1)
    cut_S1 = jnp.where(budget >= num_groups, -jnp.inf, 0.5 * (last_in + first_out))[:, None]
    soft_SG = jax.nn.sigmoid((logits_SG - cut_S1) / temperature)
    # Straight-through: the value stays the hard choice, the gradient is the relaxed one's.
    selected_SG = selected_SG + soft_SG - jax.lax.stop_gradient(soft_SG)
  weights_SG = probs_SG * selected_SG
  if normalize:
    weights_SG = weights_SG * n / jnp.maximum(jnp.sum(weights_SG, axis=-1, keepdims=True), 1e-20)
  return jnp.einsum("sg,sgd->sd", weights_SG, outputs_SGD, precision=jax.lax.Precision.HIGHEST)


def _parent_output(x_SD, outputs_SGD, router_DE, top_k: int, num_sub_experts: int, normalize: bool) -> jax.Array:
  weights_SK, experts_SK, _ = route_parent(x_SD, router_DE, top_k, normalize)
  per_expert_SED = outputs_SGD.reshape(x_SD.shape[0], -1, num_sub_experts, x_SD.shape[1]).sum(axis=2)
  chosen_SKD = jnp.take_along_axis(per_expert_SED, experts_SK[:, :, None], axis=1)
  return jnp.einsum("sk,skd->sd", weights_SK, chosen_SKD)


def budget_schedule(steps: int, top_k: int, num_sub_experts: int) -> np.ndarray:
  """Highest budget trained at each step: linear from K up to N*K."""
  full = top_k * num_sub_experts
  return np.rint(np.linspace(top_k, full, max(steps, 1))).astype(np.int32)[:steps]


def tune_linear_router(mlp: nnx.Module, permutation_EF: np.ndarray, router_DG: np.ndarray, inputs_SD: np.ndarray,
                       num_sub_experts: int, config: RouterTuningConfig) -> tuple[np.ndarray, dict[str, Any]]:
  """Train the linear router [D, G] of one layer; returns it and a summary of the run.

  Step i minimizes the mean relative error over budgets K..b_i, where b_i rises linearly
  from K to N*K, so the lowest budgets stay in the loss while higher ones join.
  """
  if inputs_SD.shape[0] == 0:
    raise ValueError("router tuning needs calibration inputs of the layer; none were sampled")
  n, top_k = num_sub_experts, mlp.top_k
  num_experts = mlp.num_experts
  params = {k: np.asarray(getattr(mlp, k)[...]) for k in ("router", "gate", "up", "down")}
  layer = LayerPartition(np.asarray(permutation_EF), np.zeros((num_experts, n, 1), np.int32))
  split = split_expert_params(params, layer, n, "compound")
  x_SD = jnp.asarray(inputs_SD, jnp.float32)
  outputs_SGD = sub_expert_outputs(x_SD, *(jnp.asarray(split[k], jnp.float32) for k in ("gate", "up", "down")))
  target_SD = _parent_output(x_SD, outputs_SGD, jnp.asarray(params["router"], jnp.float32), top_k, n, mlp.normalize)
  scale = jnp.maximum(jnp.mean(jnp.square(target_SD)), 1e-20)
  budget_values = jnp.arange(top_k, n * top_k + 1)

  def budget_errors(router, temperature=None):
    """Relative squared error at every budget K..N*K."""
    def error(budget):
      y_SD = dense_linear_moe(x_SD, outputs_SGD, router, budget, n, mlp.normalize, temperature)
      return jnp.mean(jnp.square(y_SD - target_SD)) / scale
    return jax.vmap(error)(budget_values)

  def loss_fn(router, highest):
    in_range = (budget_values <= highest).astype(jnp.float32)
    return jnp.sum(budget_errors(router, config.temperature) * in_range) / jnp.sum(in_range)

  optimizer = optax.adam(config.learning_rate)

  @jax.jit
  def train_step(router, opt_state, highest):
    loss, grads = jax.value_and_grad(loss_fn)(router, highest)
    updates, opt_state = optimizer.update(grads, opt_state, router)
    return optax.apply_updates(router, updates), opt_state, loss

  router = jnp.asarray(router_DG, jnp.float32)
  opt_state = optimizer.init(router)
  evaluate = jax.jit(budget_errors)
  before = np.asarray(evaluate(router))
  # Keep the router with the lowest mean error over all budgets, checked every `eval_every`
  # steps: the straight-through gradient is biased, and a step can make the hard choice worse.
  best_router, best_errors, best_step = router, before, 0
  for step, highest in enumerate(budget_schedule(config.steps, top_k, n), start=1):
    router, opt_state, _ = train_step(router, opt_state, jnp.int32(highest))
    if step % config.eval_every == 0 or step == config.steps:
      errors = np.asarray(evaluate(router))
      if errors.mean() < best_errors.mean():
        best_router, best_errors, best_step = router, errors, step
  after = best_errors
  router = best_router
  summary = {
      "steps": config.steps,
      "best_step": best_step,
      "tokens": int(x_SD.shape[0]),
      "budgets": [int(top_k), int(n * top_k)],
      "relative_error_before": {"lowest_budget": float(before[0]), "mean": float(before.mean())},
      "relative_error_after": {"lowest_budget": float(after[0]), "mean": float(after.mean())},
  }
  logger.info("router tuning: mean relative error over budgets %d..%d %.4g -> %.4g", top_k, n * top_k,
              before.mean(), after.mean())
  return np.asarray(router), summary
