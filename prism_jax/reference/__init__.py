"""The reference model: a small MoE trained from scratch on the King James Bible, shipped in the package.

Text:      default_text, default_text_file, SPLITS (data.py)
Tokenizer: train_tokenizer, encode_documents (tokenizer.py)
Training:  reference_model_config, TrainConfig (recipe.py), train (train.py)
Measuring: model_perplexity, unigram_perplexity, expert_load (evaluate.py), model card (card.py)
Shipped:   default_model_dir
"""

from pathlib import Path

from prism_jax.reference.data import DATA_DIR, SPLITS, default_text, default_text_file
from prism_jax.reference.recipe import TrainConfig, reference_model_config

DEFAULT_MODEL_DIR = DATA_DIR / "default_model"


def default_model_dir() -> Path:
  """Hugging Face-format directory of the shipped reference model (convert it with `prism convert`)."""
  if not (DEFAULT_MODEL_DIR / "config.json").is_file():
    raise FileNotFoundError(f"the shipped reference model is missing from {DEFAULT_MODEL_DIR}; reinstall prism-jax "
                            "or rebuild it with `prism train-reference --out` that directory")
  return DEFAULT_MODEL_DIR
