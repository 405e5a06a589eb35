"""The registry of supported families, keyed by Hugging Face model_type."""

from __future__ import annotations

from converters.errors import ConversionError
from converters.family import Family
from converters.families import mixtral, olmoe, qwen2_moe, qwen3_moe

FAMILIES: dict[str, Family] = {f.model_type: f for f in (mixtral.FAMILY, qwen2_moe.FAMILY, qwen3_moe.FAMILY,
                                                          olmoe.FAMILY)}


def get_family(model_type: str | None) -> Family:
  """Look up the family of `model_type`; raise ConversionError listing the supported ones if absent."""
  if model_type not in FAMILIES:
    raise ConversionError(f"model_type {model_type!r} is not supported; supported model types are "
                          f"{sorted(FAMILIES)}")
  return FAMILIES[model_type]
