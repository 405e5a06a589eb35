"""Named tensor transforms between Hugging Face layouts and ours, each usable in both directions.

Hugging Face stores a Linear weight as [out, in] (y = x @ W.T); we store kernels as [in, out]
(y = x @ W). Experts come either one tensor per expert (the released checkpoints) or fused into
3-D tensors (what transformers 5 keeps in memory). Every transform defines:

  hf_shapes(ours)  the Hugging Face shapes it expects, from our shapes (for validation),
  load(...)        Hugging Face tensors -> ours, reading one expert at a time,
  save(...)        ours -> Hugging Face tensors (for export).
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

Shape = tuple[int, ...]


class TensorSource(Protocol):
  """Reads tensors by Hugging Face key; `get_row(key, i)` reads only `tensor[i]`."""

  def get(self, key: str) -> np.ndarray: ...

  def get_row(self, key: str, index: int) -> np.ndarray: ...


class Transform:
  """Base class; `per_expert` transforms take one Hugging Face key per expert."""

  name = "transform"
  per_expert = False

  def hf_shapes(self, ours: Sequence[Shape]) -> list[Shape]:
    raise NotImplementedError

  def load(self, reader: TensorSource, keys: Sequence[str], ours: Sequence[Shape], dtype) -> list[np.ndarray]:
    raise NotImplementedError

  def save(self, ours: Sequence[np.ndarray]) -> list[np.ndarray]:
    raise NotImplementedError

  def __repr__(self) -> str:
    return self.name


class Identity(Transform):
  """Same layout on both sides: norms, embeddings, biases. [X] <- [X]."""

  name = "identity"

  def hf_shapes(self, ours):
    return [tuple(ours[0])]

  def load(self, reader, keys, ours, dtype):
    return [np.asarray(reader.get(keys[0]), dtype)]

  def save(self, ours):
    return [np.ascontiguousarray(ours[0])]


class Transpose(Transform):
  """A Linear weight: ours [in, out] <- Hugging Face [out, in]."""

  name = "transpose"

  def hf_shapes(self, ours):
    rows, cols = ours[0]
    return [(cols, rows)]

  def load(self, reader, keys, ours, dtype):
    return [np.ascontiguousarray(reader.get(keys[0]).T, dtype)]

  def save(self, ours):
    return [np.ascontiguousarray(ours[0].T)]


class StackTranspose(Transform):
  """Per-expert Linear weights: ours [E, in, out] <- E Hugging Face tensors [out, in]."""

  name = "stack_transpose"
  per_expert = True

  def hf_shapes(self, ours):
    experts, rows, cols = ours[0]
    return [(cols, rows)] * experts

  def load(self, reader, keys, ours, dtype):
    # Fill a preallocated block expert by expert, so at most one source expert is in memory.
    out = np.empty(ours[0], dtype)
    for e, key in enumerate(keys):
      out[e] = reader.get(key).T
    return [out]

  def save(self, ours):
    return [np.ascontiguousarray(w.T) for w in ours[0]]


class FusedTranspose(Transform):
  """Fused expert weights: ours [E, in, out] <- Hugging Face [E, out, in], e.g. `experts.down_proj [E, H, I]`."""

  name = "fused_transpose"

  def hf_shapes(self, ours):
    experts, rows, cols = ours[0]
    return [(experts, cols, rows)]

  def load(self, reader, keys, ours, dtype):
    out = np.empty(ours[0], dtype)
    for e in range(ours[0][0]):
      out[e] = reader.get_row(keys[0], e).T
    return [out]

  def save(self, ours):
    return [np.ascontiguousarray(ours[0].transpose(0, 2, 1))]


class SplitGateUp(Transform):
  """Fused `experts.gate_up_proj [E, 2F, D]`, gate rows first -> ours gate [E, D, F] and up [E, D, F]."""

  name = "split_gate_up"

  def hf_shapes(self, ours):
    gate, up = ours
    if gate != up:
      raise ValueError(f"gate {gate} and up {up} must have the same shape to fuse")
    experts, hidden, width = gate
    return [(experts, 2 * width, hidden)]

  def load(self, reader, keys, ours, dtype):
    gate, up = np.empty(ours[0], dtype), np.empty(ours[1], dtype)
    width = ours[0][2]
    for e in range(ours[0][0]):
      rows_2FD = reader.get_row(keys[0], e)
      gate[e] = rows_2FD[:width].T
      up[e] = rows_2FD[width:].T
    return [gate, up]

  def save(self, ours):
    gate, up = ours
    return [np.ascontiguousarray(np.concatenate([gate.transpose(0, 2, 1), up.transpose(0, 2, 1)], axis=1))]


IDENTITY = Identity()
TRANSPOSE = Transpose()
STACK_TRANSPOSE = StackTranspose()
FUSED_TRANSPOSE = FusedTranspose()
SPLIT_GATE_UP = SplitGateUp()
