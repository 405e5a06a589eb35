"""Router tensors that follow from a partition: core neurons and the repeated linear gate."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=("num_groups", "num_core_neurons"))
def _core_positions(acts_ETF: jax.Array, permutation_EF: jax.Array, num_groups: int,
                    num_core_neurons: int) -> jax.Array:
  e, t, f = acts_ETF.shape
  permuted_ETF = jnp.take_along_axis(acts_ETF, permutation_EF[:, None, :], axis=2)
  acts_ETNW = permuted_ETF.reshape(e, t, num_groups, f // num_groups)
  masses_ETN1 = jnp.sum(acts_ETNW, axis=-1, keepdims=True)
  # Co-activation of neuron j with the rest of its group: sum_t |a_j| * (group mass - |a_j|).
  score_ENW = jnp.einsum("etnw,etnw->enw", acts_ETNW, masses_ETN1 - acts_ETNW,
                         precision=jax.lax.Precision.HIGHEST)
  # lax.top_k keeps the lower index first among ties, so an expert without tokens gets 0..C-1.
  return jax.lax.top_k(score_ENW, num_core_neurons)[1].astype(jnp.int32)


def core_neurons(acts_ETF, permutation_EF: np.ndarray, num_groups: int, num_core_neurons: int) -> np.ndarray:
  """Core neurons [E, N, C] of every sub-expert, as positions inside the sub-expert.

  The cores of a sub-expert are its C neurons with the largest co-activation with the rest
  of the group on the calibration tokens, so their mean |a| tracks the group's mass. The
  compound router ranks a token's sub-experts by that mean.
  """
  width = np.shape(permutation_EF)[1]
  if num_core_neurons > width // num_groups:
    raise ValueError(f"num_core_neurons={num_core_neurons} exceeds the sub-expert width {width // num_groups}")
  cores = _core_positions(jnp.asarray(acts_ETF, jnp.float32), jnp.asarray(permutation_EF, jnp.int32), num_groups,
                          num_core_neurons)
  return np.asarray(cores)


def repeated_linear_router(router_DE: np.ndarray, num_groups: int) -> np.ndarray:
  """Repeat the parent router's columns N times: [D, E*N], column e*N + s for sub-expert (e, s).

  Softmax over the E*N logits gives each sub-expert 1/N of its parent's probability, which
  the linear router multiplies back by N.
  """
  return np.repeat(np.asarray(router_DE, np.float32), num_groups, axis=1)
