"""Streaming text: incremental detokenization and stop strings."""

from __future__ import annotations

from typing import Protocol, Sequence


class Tokenizer(Protocol):
  """Tokenizer interface of the engine (a `tokenizers.Tokenizer` fits)."""

  def decode(self, ids: Sequence[int]) -> str:
    ...


class IncrementalDecoder:
  """Turn a growing list of token ids into text deltas.

  Decoding each token alone breaks multi-byte characters and the leading-space rules of
  many decoders, and decoding everything each step costs O(n^2). This keeps a short window
  of ids: `prefix` ids already emitted, decoded again only as context. Worked example with a
  byte-level BPE where "é" is two tokens a, b. push(a) decodes to "\\ufffd" (incomplete), so it
  emits nothing. push(b) decodes [a, b] to "é" and emits it.
  """

  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer = tokenizer
    self.ids: list[int] = []
    self.prefix_offset = 0
    self.read_offset = 0

  def push(self, token_id: int) -> str:
    """Add one token and return the text it completed ('' while a character is incomplete)."""
    self.ids.append(token_id)
    prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
    new_text = self.tokenizer.decode(self.ids[self.prefix_offset:])
    if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
      delta = new_text[len(prefix_text):]
      self.prefix_offset = self.read_offset
      self.read_offset = len(self.ids)
      return delta
    return ""

  def flush(self) -> str:
    """Text of the trailing ids that never formed a complete character (replacement characters)."""
    prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
    new_text = self.tokenizer.decode(self.ids[self.prefix_offset:])
    self.prefix_offset = self.read_offset = len(self.ids)
    return new_text[len(prefix_text):]


class StopMatcher:
  """Accumulate text, cut it at the first stop string, and hold back a possible stop prefix.

  `append` returns the text that is safe to stream: text that cannot be the start of a stop
  string. With stop "END" and text "abcEN", "abc" is safe and "EN" is held back.
  """

  def __init__(self, stop: Sequence[str]):
    self.stop = tuple(stop)
    self.text = ""
    self.streamed = 0
    self.stopped = False

  def append(self, delta: str) -> str:
    if self.stopped:
      return ""
    search_from = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
    self.text += delta
    hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
    if hits:
      self.text = self.text[:min(hits)]
      self.stopped = True
      return ""
    safe_end = len(self.text) - self._held_back()
    out = self.text[self.streamed:safe_end]
    self.streamed = max(self.streamed, safe_end)
    return out

  def _held_back(self) -> int:
    """Length of the longest text suffix that is a proper prefix of some stop string."""
    longest = 0
    for s in self.stop:
      for size in range(min(len(s) - 1, len(self.text)), longest, -1):
        if self.text.endswith(s[:size]):
          longest = size
          break
    return longest

  def unstreamed(self) -> str:
    """Text kept back so far; the engine sends it with the completion."""
    out = self.text[self.streamed:]
    self.streamed = len(self.text)
    return out
