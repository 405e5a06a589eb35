"""`Family`: everything the converters know about one Hugging Face model_type, declared in one place."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from prism_jax.config import ModelConfig, WeightDtype

from converters.errors import ConversionError
from converters.hf_config import COMMON_IGNORED, ConfigFields
from converters.key_table import ExpertLayout


@dataclasses.dataclass(frozen=True)
class Family:
  """One model family: config translation both ways and how its MoE layers are stored.

  `defaults` are the values transformers 5.25 uses for fields a config.json leaves out.
  `ignored` maps each field that does not change the model to the reason. `expert_layouts[0]`
  is the layout of the released checkpoints, which export writes.
  """

  model_type: str
  architecture: str
  defaults: Mapping[str, Any]
  ignored: Mapping[str, str]
  read_config: Callable[[ConfigFields], dict[str, Any]]
  write_config: Callable[[ModelConfig], dict[str, Any]]
  expert_layouts: tuple[ExpertLayout, ...]

  def config_from_hf(self, data: Mapping[str, Any], *, source: str, dtype: WeightDtype = "float32") -> ModelConfig:
    """Translate a config.json dict; raise ConversionError naming any field not handled."""
    fields = ConfigFields(data, defaults=self.defaults, source=source)
    fields.ignore(COMMON_IGNORED)
    fields.ignore(self.ignored)
    model_type = fields.get("model_type")
    if model_type != self.model_type:
      raise fields.fail("model_type", f"does not match the {self.model_type} converter")
    values = self.read_config(fields)
    fields.finish(self.model_type)
    try:
      return ModelConfig(family=self.model_type, dtype=dtype, **values)
    except ValueError as error:
      raise ConversionError(f"{source}: the config translates to an invalid ModelConfig: {error}") from error

  def config_to_hf(self, config: ModelConfig) -> dict[str, Any]:
    """config.json dict for `config`; raise ConversionError if this family cannot express it."""
    data = {"architectures": [self.architecture], "model_type": self.model_type, **self.write_config(config),
            "dtype": config.dtype}
    round_trip = self.config_from_hf(data, source=f"exported {self.model_type} config", dtype=config.dtype)
    lost = {name: (value, getattr(round_trip, name)) for name, value in canonical(config).items()
            if canonical(round_trip)[name] != value}
    if lost:
      details = ", ".join(f"{name}={ours!r} (would read back as {back!r})" for name, (ours, back) in lost.items())
      raise ConversionError(f"a {self.model_type} config.json cannot express ModelConfig {details}; "
                            "choose a family whose architecture has these settings")
    return data


def canonical(config: ModelConfig) -> dict[str, Any]:
  """Config fields with settings that have no effect cleared, for comparing two configs."""
  values = config.to_dict()
  if all(config.moe_layers):
    values["intermediate_size"] = 0  # only dense layers use it
  if not any(config.sliding_window_layers):
    values["sliding_window"] = None
  return values
