"""Byte-level BPE tokenizer of the reference model, trained with the `tokenizers` library."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

logger = logging.getLogger(__name__)

END_OF_TEXT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def train_tokenizer(documents: list[str], vocab_size: int) -> Tokenizer:
  """Train a byte-level BPE on `documents`; the end-of-text token gets id 0."""
  if vocab_size < 512:
    raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level BPE (256 bytes + merges); use >= 512")
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=[END_OF_TEXT],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  tokenizer.train_from_iterator(documents, trainer=trainer)
  logger.info("trained a byte-level BPE with %d tokens", tokenizer.get_vocab_size())
  return tokenizer


def end_of_text_id(tokenizer: Tokenizer) -> int:
  token_id = tokenizer.token_to_id(END_OF_TEXT)
  if token_id is None:
    raise ValueError(f"tokenizer has no {END_OF_TEXT!r} token; train it with `train_tokenizer`")
  return token_id


def save_tokenizer(tokenizer: Tokenizer, out_dir: Path, max_length: int) -> list[Path]:
  """Write tokenizer.json and a Hugging Face tokenizer_config.json; returns both paths."""
  out_dir.mkdir(parents=True, exist_ok=True)
  tokenizer_path = out_dir / TOKENIZER_FILE
  tokenizer.save(str(tokenizer_path))
  config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": None,
      "eos_token": END_OF_TEXT,
      "pad_token": END_OF_TEXT,
      "unk_token": None,
      "add_prefix_space": False,
      "model_max_length": max_length,
      "clean_up_tokenization_spaces": False,
  }
  config_path = out_dir / TOKENIZER_CONFIG_FILE
  config_path.write_text(json.dumps(config, indent=2) + "\n")
  return [tokenizer_path, config_path]


def encode_documents(tokenizer: Tokenizer, documents: list[str]) -> np.ndarray:
  """Encode all documents into one int32 token stream, each document followed by end-of-text."""
  eot = end_of_text_id(tokenizer)
  pieces = []
  for encoding in tokenizer.encode_batch(documents):
    pieces.append(np.asarray(encoding.ids, np.int32))
    pieces.append(np.asarray([eot], np.int32))
  if not pieces:
    return np.zeros((0,), np.int32)
  return np.concatenate(pieces)
