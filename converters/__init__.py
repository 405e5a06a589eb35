"""Hugging Face checkpoints <-> prism checkpoints.

Convert:   convert_checkpoint, plan_conversion (validation only), read_config
Export:    export_params, export_checkpoint
Families:  FAMILIES, get_family, Family (one declarative module per model_type in families/)
Configs:   hf_config (field-by-field reading of config.json), hf_rope (both rope forms)
Tables:    key_table (our paths <-> Hugging Face keys), transforms (named layout changes)
Errors:    ConversionError
"""

from converters.convert import convert_checkpoint, plan_conversion, read_config
from converters.errors import ConversionError
from converters.export import export_checkpoint, export_params
from converters.family import Family
from converters.registry import FAMILIES, get_family
