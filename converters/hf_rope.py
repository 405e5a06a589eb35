"""Rope settings of a Hugging Face config.json, in both of the forms transformers reads.

The old form is a top-level `rope_theta` plus an optional `rope_scaling` dict; transformers 5
writes one `rope_parameters` dict instead. Both translate to one `RopeConfig`.
"""

from __future__ import annotations

import math
from typing import Any

from prism_jax.config import RopeConfig

from converters.hf_config import ConfigFields

_ROPE_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "yarn": {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
             "mscale", "mscale_all_dim", "truncate"},
    "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"},
}


def read_rope(fields: ConfigFields, *, default_theta: float, max_position_embeddings: int) -> RopeConfig:
  """Translate `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (older files).

  Follows transformers 5.25: a non-empty `rope_scaling` takes precedence over `rope_parameters`,
  and a theta inside the dict over the top-level `rope_theta`.
  """
  parameters = fields.get("rope_parameters", default=None)
  scaling = fields.get("rope_scaling", default=None)
  top_theta = fields.get("rope_theta", default=None)
  top_original = fields.get("original_max_position_embeddings", default=None)
  partial = fields.get("partial_rotary_factor", default=None)
  source_name = "rope_scaling" if scaling else "rope_parameters"
  rope = dict(scaling or parameters or {})
  if "full_attention" in rope or "sliding_attention" in rope:
    raise fields.fail(source_name, "sets rope per layer type, which these families do not use")

  theta = float(rope.pop("rope_theta", top_theta if top_theta is not None else default_theta))
  kind = rope.pop("rope_type", rope.pop("type", "default"))
  partial = rope.pop("partial_rotary_factor", partial)
  if partial is not None and float(partial) != 1.0:
    raise fields.fail(source_name, f"has partial_rotary_factor={partial}; only full rotary embeddings are supported")
  if kind not in _ROPE_KEYS:
    raise fields.fail(source_name, f"has rope type {kind!r}; supported types are {sorted(_ROPE_KEYS)}")
  unknown = sorted(set(rope) - _ROPE_KEYS[kind])
  if unknown:
    raise fields.fail(source_name, f"has keys {unknown} that rope type {kind!r} does not use")

  if kind == "default":
    return RopeConfig(theta=theta)
  if kind == "linear":
    return RopeConfig(theta=theta, kind="linear", factor=float(rope["factor"]))
  # transformers moves a top-level original_max_position_embeddings into the rope dict.
  original = top_original if top_original is not None else rope.get("original_max_position_embeddings",
                                                                      max_position_embeddings)
  if kind == "llama3":
    return RopeConfig(theta=theta, kind="llama3", factor=float(rope["factor"]), original_max_position_embeddings=original,
                      low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                      high_freq_factor=float(rope.get("high_freq_factor", 4.0)))
  factor = rope.get("factor")
  factor = max_position_embeddings / original if factor is None else float(factor)
  attention_factor = rope.get("attention_factor")
  mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
  if attention_factor is None and mscale and mscale_all_dim:
    attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
  return RopeConfig(theta=theta, kind="yarn", factor=factor, original_max_position_embeddings=original,
                    # transformers reads `beta_fast or 32`, so 0 and None both mean the default.
                    beta_fast=float(rope.get("beta_fast") or 32.0), beta_slow=float(rope.get("beta_slow") or 1.0),
                    attention_factor=None if attention_factor is None else float(attention_factor),
                    truncate=bool(rope.get("truncate", True)))


def _yarn_mscale(factor: float, mscale: float) -> float:
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def write_rope(rope: RopeConfig) -> dict[str, Any]:
  """Write rope settings in the old form (`rope_theta`, `rope_scaling`), which transformers 4 and 5 both read."""
  if rope.kind == "default":
    return {"rope_theta": rope.theta, "rope_scaling": None}
  scaling: dict[str, Any] = {"rope_type": rope.kind, "factor": rope.factor}
  if rope.kind == "llama3":
    scaling.update(original_max_position_embeddings=rope.original_max_position_embeddings,
                   low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor)
  elif rope.kind == "yarn":
    scaling.update(original_max_position_embeddings=rope.original_max_position_embeddings,
                   beta_fast=rope.beta_fast, beta_slow=rope.beta_slow, truncate=rope.truncate)
    if rope.attention_factor is not None:
      scaling["attention_factor"] = rope.attention_factor
  return {"rope_theta": rope.theta, "rope_scaling": scaling}
