"""One declarative module per Hugging Face model family, collected by `converters.registry`."""
