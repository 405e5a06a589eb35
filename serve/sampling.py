"""Per-row token sampling inside the compiled step: greedy, temperature and top-p, seeded per request."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def row_keys(seed_lo_B: jax.Array, seed_hi_B: jax.Array, counter_B: jax.Array) -> jax.Array:
  """Derive one PRNG key per row from its request's 64-bit seed and the index of the token being drawn.

  A row's draw depends only on (seed, token index), so a seeded request samples the same
  tokens whatever else shares its batch.
  """
  def one(lo, hi, counter):
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(lo), hi), counter)
  return jax.vmap(one)(seed_lo_B, seed_hi_B, counter_B)


def _sample(logits_BV: jax.Array, temperature_B: jax.Array, top_p_B: jax.Array, keys_B: jax.Array) -> jax.Array:
  logits = logits_BV / jnp.maximum(temperature_B, 1e-6)[:, None]
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
  cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
  # Keep the smallest prefix whose mass reaches top_p; the most likely token always stays.
  # Example, probabilities [0.5, 0.3, 0.2] and top_p 0.7: cumulative [0.5, 0.8, 1.0] has one
  # entry below 0.7, so the cutoff is sorted index 1 and tokens with logits below it are dropped.
  cutoff_index = jnp.sum(cumulative < top_p_B[:, None], axis=-1, keepdims=True)
  cutoff_index = jnp.minimum(cutoff_index, logits.shape[-1] - 1)
  cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
  logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys_B, logits).astype(jnp.int32)


def sample_rows(logits_BV: jax.Array, temperature_B: jax.Array, top_p_B: jax.Array, seed_lo_B: jax.Array,
                seed_hi_B: jax.Array, counter_B: jax.Array) -> jax.Array:
  """Next token per row: argmax where temperature is 0, else a seeded temperature + top-p draw.

  The vocabulary sort of top-p runs only when some row samples (a `lax.cond`, so all-greedy
  steps skip it).
  """
  greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  sampling_B = temperature_B > 0

  def draw(_):
    keys_B = row_keys(seed_lo_B, seed_hi_B, counter_B)
    return jnp.where(sampling_B, _sample(logits_BV, temperature_B, top_p_B, keys_B), greedy_B)

  return jax.lax.cond(jnp.any(sampling_B), draw, lambda _: greedy_B, None)
