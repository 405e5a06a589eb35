"""Hugging Face checkpoints <-> prism checkpoints.

Families:  FAMILIES, get_family, Family (one declarative module per model_type in families/)
Tables:    key_table (our paths <-> Hugging Face keys), transforms (named layout changes)
Export:    export_params, export_checkpoint
Errors:    ConversionError
"""

from converters.errors import ConversionError
from converters.export import export_checkpoint, export_params
from converters.family import Family
from converters.registry import FAMILIES, get_family
