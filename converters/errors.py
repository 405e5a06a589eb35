"""The one exception type of the converters: bad input, named with what to do about it."""

from __future__ import annotations


class ConversionError(ValueError):
  """A checkpoint or config that cannot be converted; the message names the key, field or file."""
