"""Calibration and evaluation text: read, tokenize, cut into padded sequences."""

from __future__ import annotations

import dataclasses
import gzip
import lzma
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Sequences:
  """Token ids [B, T] cut from one stream; valid_BT is False on the padding of the last row."""

  tokens_BT: np.ndarray
  valid_BT: np.ndarray

  @property
  def num_tokens(self) -> int:
    return int(self.valid_BT.sum())


def read_text(path: str | os.PathLike) -> str:
  """Read a UTF-8 text file; `.gz` and `.xz` files are decompressed."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"text file {path} not found; pass an existing plain, .gz or .xz text file")
  data = path.read_bytes()
  if path.suffix == ".gz":
    data = gzip.decompress(data)
  elif path.suffix == ".xz":
    data = lzma.decompress(data)
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as error:
    raise ValueError(f"text file {path} is not UTF-8 ({error}); convert it to UTF-8 or pass token ids as a "
                     ".npy file") from None


def encode_text(text: str, tokenizer: Any) -> np.ndarray:
  """Token ids of `text` with a `tokenizers.Tokenizer`, paragraph by paragraph (blank-line separated)."""
  if not text.strip():
    raise ValueError("the text is empty; pass a file with some hundreds of words or more")
  paragraphs = [p + "\n\n" for p in text.split("\n\n") if p.strip()]
  encodings = tokenizer.encode_batch(paragraphs, add_special_tokens=False)
  ids = [np.asarray(e.ids, np.int32) for e in encodings]
  return np.concatenate(ids) if ids else np.zeros((0,), np.int32)


def load_token_ids(path: str | os.PathLike, tokenizer: Any, *, label: str = "text") -> np.ndarray:
  """Token ids from a text file (tokenized with `tokenizer`) or from a `.npy` file of ids."""
  path = Path(path)
  if path.suffix == ".npy":
    if not path.is_file():
      raise FileNotFoundError(f"{label} file {path} not found")
    try:
      ids = np.load(path, allow_pickle=False)
    except ValueError as error:
      raise ValueError(f"{label} file {path} is not a NumPy array of token ids ({error}); save ids with np.save") \
          from error
    if not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"{label} file {path} contains {ids.dtype} values, not integer token ids; save the ids as an "
                       "integer array")
    if ids.size == 0:
      raise ValueError(f"{label} file {path} contains no token ids; save a non-empty integer array")
    return np.asarray(ids, np.int32).reshape(-1)
  if tokenizer is None:
    raise ValueError(f"the checkpoint has no tokenizer (tokenizer/tokenizer.json), so {label} file {path} cannot "
                     "be tokenized; convert the checkpoint with its tokenizer or pass token ids as a .npy file")
  text = read_text(path)
  if not text.strip():
    raise ValueError(f"{label} file {path} is empty; pass a file with some hundreds of words or more")
  return encode_text(text, tokenizer)


def make_sequences(ids: Sequence[int] | np.ndarray, sequence_length: int, *, bos_token_id: int | None = None,
                   min_tokens: int = 1, max_tokens: int | None = None, vocab_size: int | None = None,
                   label: str = "calibration") -> Sequences:
  """Cut a token stream into rows of `sequence_length`, each starting with BOS when the model has one.

  A 2-D array is taken as rows already cut (all valid). The last row is padded and its
  padding marked invalid.
  """
  if max_tokens is not None and max_tokens < 1:
    raise ValueError(f"max_tokens must be a positive number of tokens, got {max_tokens}")
  ids = np.asarray(ids)
  if ids.ndim == 2:
    tokens = ids.astype(np.int32)
    if max_tokens is not None:
      tokens = tokens[:max(1, max_tokens // tokens.shape[1])]
    sequences = Sequences(tokens, np.ones(tokens.shape, bool))
  elif ids.ndim == 1:
    stream = ids.astype(np.int32)
    if max_tokens is not None:
      stream = stream[:max_tokens]
    sequences = _cut(stream, sequence_length, bos_token_id)
  else:
    raise ValueError(f"{label} token ids must be 1-D (one stream) or 2-D [B, T], got shape {ids.shape}")

  if sequences.num_tokens < min_tokens:
    raise ValueError(f"{label} text has {sequences.num_tokens} tokens, fewer than the {min_tokens} needed; "
                     "pass a longer text (or lower min_tokens in the profile or curve config)")
  if vocab_size is not None and sequences.tokens_BT.size and (
      sequences.tokens_BT.min() < 0 or sequences.tokens_BT.max() >= vocab_size):
    raise ValueError(f"{label} token ids must lie in 0..{vocab_size - 1} (the model's vocabulary), got "
                     f"{sequences.tokens_BT.min()}..{sequences.tokens_BT.max()}; tokenize with the checkpoint's tokenizer")
  return sequences


def _cut(stream: np.ndarray, sequence_length: int, bos_token_id: int | None) -> Sequences:
  body = sequence_length - (bos_token_id is not None)
  if body < 1:
    raise ValueError(f"sequence_length {sequence_length} leaves no room for tokens after BOS; use 2 or more")
  rows = max(1, -(-len(stream) // body))
  tokens = np.zeros((rows, sequence_length), np.int32)
  valid = np.zeros((rows, sequence_length), bool)
  start = int(bos_token_id is not None)
  for row in range(rows):
    piece = stream[row * body:(row + 1) * body]
    tokens[row, start:start + len(piece)] = piece
    valid[row, start:start + len(piece)] = True
    if bos_token_id is not None and len(piece):
      tokens[row, 0] = bos_token_id
      valid[row, 0] = True
  return Sequences(tokens, valid)
