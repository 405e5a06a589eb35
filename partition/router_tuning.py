"""Router-only fine-tuning of the linear sub-expert router with optax (expert weights frozen).

Per MoE layer, on a sample of its calibration inputs: the frozen sub-experts' outputs are
computed once; the loss is the squared error between the layer output at budget b (top-b
sub-experts under the trainable router, as `SubExpertMoE` weights them) and the original
layer output, relative to the latter's mean square. The budget rises linearly from K to
N*K over the steps. Gradients reach the router through the routing weights only; the
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
                     num_sub_experts: int, normalize: bool) -> jax.Array:
  """Layer output with the linear router at a (traced) budget, weighted as `SubExpertMoE` does.

  Sub-expert probabilities are softmax over the G logits times N; the top `budget` run
  (ties go to the lower index, as with lax.top_k); with `normalize` the selected weights
  are rescaled to sum to N x (their probability share).
  """
  n = num_sub_experts
  probs_SG = jax.nn.softmax(jnp.dot(x_SD, router_DG, precision=jax.lax.Precision.HIGHEST), axis=-1) * n
  # Worked example, probs [0.2, 0.5, 0.5] and budget 2: ranks [2, 0, 1] select groups 1 and 2.
  ranks_SG = jnp.argsort(jnp.argsort(-probs_SG, axis=-1, stable=True), axis=-1)
  selected_SG = ranks_SG < budget
  weights_SG = jnp.where(selected_SG, probs_SG, 0.0)
  if normalize:
    weights_SG = weights_SG * n / jnp.maximum(jnp.sum(weights_SG, axis=-1, keepdims=True), 1e-20)
  return jnp.einsum("sg,sgd->sd", weights_SG, outputs_SGD, precision=jax.lax.Precision.HIGHEST)


def _parent_output(x_SD, outputs_SGD, router_DE, top_k: int, num_sub_experts: int, normalize: bool) -> jax.Array:
  weights_SK, experts_SK, _ = route_parent(x_SD, router_DE, top_k, normalize)
  per_expert_SED = outputs_SGD.reshape(x_SD.shape[0], -1, num_sub_experts, x_SD.shape[1]).sum(axis=2)
  chosen_SKD = jnp.take_along_axis(per_expert_SED, experts_SK[:, :, None], axis=1)
  return jnp.einsum("sk,skd->sd", weights_SK, chosen_SKD)


def budget_schedule(steps: int, top_k: int, num_sub_experts: int) -> np.ndarray:
  """Budget of each step: linear from K up to N*K."""
  full = top_k * num_sub_experts
  return np.rint(np.linspace(top_k, full, max(steps, 1))).astype(np.int32)[:steps]


def tune_linear_router(mlp: nnx.Module, permutation_EF: np.ndarray, router_DG: np.ndarray, inputs_SD: np.ndarray,
                       num_sub_experts: int, config: RouterTuningConfig) -> tuple[np.ndarray, dict[str, Any]]:
  """Train the linear router [D, G] of one layer; returns it and a summary of the run."""
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

  def loss_fn(router, budget):
    y_SD = dense_linear_moe(x_SD, outputs_SGD, router, budget, n, mlp.normalize)
    return jnp.mean(jnp.square(y_SD - target_SD)) / scale

  optimizer = optax.adam(config.learning_rate)

  @jax.jit
  def train_step(router, opt_state, budget):
    loss, grads = jax.value_and_grad(loss_fn)(router, budget)
    updates, opt_state = optimizer.update(grads, opt_state, router)
    return optax.apply_updates(router, updates), opt_state, loss

  budgets = budget_schedule(config.steps, top_k, n)
  router = jnp.asarray(router_DG, jnp.float32)
  opt_state = optimizer.init(router)
  start_losses = [float(loss_fn(router, b)) for b in (budgets[0], budgets[-1])]
  for budget in budgets:
    router, opt_state, _ = train_step(router, opt_state, jnp.int32(budget))
  end_losses = [float(loss_fn(router, b)) for b in (budgets[0], budgets[-1])]
  summary = {
      "steps": config.steps,
      "tokens": int(x_SD.shape[0]),
      "budgets": [int(budgets[0]), int(budgets[-1])],
      "relative_error_before": dict(zip(("lowest_budget", "highest_budget"), start_losses)),
      "relative_error_after": dict(zip(("lowest_budget", "highest_budget"), end_losses)),
  }
  logger.info("router tuning: relative error at budget %d %.4g -> %.4g", budgets[0], start_losses[0], end_losses[0])
  return np.asarray(router), summary
