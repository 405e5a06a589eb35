"""Rotary position embeddings with the scaling kinds used by released MoE configs.

The rotation uses the half-split layout of the Hugging Face Llama family: the first half of
each head's channels pairs with the second half.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from prism_jax.config import RopeConfig


def _yarn_inv_freq(rope: RopeConfig, dim: int) -> tuple[np.ndarray, float]:
  """YaRN (arXiv 2309.00071): interpolate low frequencies, keep high ones, scale cos/sin."""
  base = rope.theta
  pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  extrapolation = 1.0 / pos_freqs
  interpolation = 1.0 / (rope.factor * pos_freqs)

  def correction_dim(num_rotations: float) -> float:
    return dim * math.log(rope.original_max_position_embeddings / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

  low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
  if rope.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
  keep_extrapolated = 1.0 - ramp
  inv_freq = interpolation * (1.0 - keep_extrapolated) + extrapolation * keep_extrapolated
  attention_factor = rope.attention_factor
  if attention_factor is None:
    attention_factor = 1.0 if rope.factor <= 1 else 0.1 * math.log(rope.factor) + 1.0
  return inv_freq, attention_factor


def _llama3_inv_freq(rope: RopeConfig, inv_freq: np.ndarray) -> np.ndarray:
  """Llama 3.1 scaling: divide long wavelengths by `factor`, blend the middle band."""
  old_context = rope.original_max_position_embeddings
  low_wavelen = old_context / rope.low_freq_factor
  high_wavelen = old_context / rope.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
  smooth = (old_context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
  smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled)


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> tuple[np.ndarray, float]:
  """Return (inverse frequencies [head_dim // 2], cos/sin scale) for a rope config."""
  # Computed in float32 like the reference so that positions rotate identically.
  inv_freq = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
  scale = 1.0
  if rope.kind == "linear":
    inv_freq = inv_freq / rope.factor
  elif rope.kind == "yarn":
    inv_freq, scale = _yarn_inv_freq(rope, head_dim)
  elif rope.kind == "llama3":
    inv_freq = _llama3_inv_freq(rope, inv_freq.astype(np.float64))
  return np.asarray(inv_freq, np.float32), float(scale)


def rotary_tables(rope: RopeConfig, head_dim: int, positions_BT: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Return cos and sin tables [B, T, head_dim] for integer positions."""
  inv_freq, scale = inverse_frequencies(rope, head_dim)
  angles_BTd = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  angles_BTD = jnp.concatenate([angles_BTd, angles_BTd], axis=-1)
  return jnp.cos(angles_BTD) * scale, jnp.sin(angles_BTD) * scale


def apply_rotary(x_BTHD: jnp.ndarray, cos_BTD: jnp.ndarray, sin_BTD: jnp.ndarray) -> jnp.ndarray:
  """Rotate query or key heads; computed in float32 and cast back."""
  dtype = x_BTHD.dtype
  x = x_BTHD.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  out = x * cos_BTD[:, :, None, :] + rotated * sin_BTD[:, :, None, :]
  return out.astype(dtype)
