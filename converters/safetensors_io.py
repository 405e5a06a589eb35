"""Find, validate and stream the safetensors files of a Hugging Face checkpoint.

Validation reads only the headers (an 8-byte little-endian length, then a JSON table of
dtype, shape and byte range per tensor), so a truncated or inconsistent file is rejected
before any tensor data is read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
from safetensors import safe_open

from converters.errors import ConversionError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
               "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """Location of one tensor and the dtype and shape its header declares."""

  key: str
  file: Path
  dtype: str
  shape: tuple[int, ...]


def read_header(path: Path) -> dict[str, TensorInfo]:
  """Parse and check one file's header; raise ConversionError for a truncated or corrupt file."""
  size = path.stat().st_size
  with open(path, "rb") as f:
    prefix = f.read(8)
    if len(prefix) < 8:
      raise ConversionError(f"{path} is truncated ({size} bytes, shorter than the 8-byte header length); "
                            "download or copy the file again")
    header_len = int.from_bytes(prefix, "little")
    if 8 + header_len > size:
      raise ConversionError(f"{path} is truncated: its header needs {8 + header_len} bytes but the file has "
                            f"{size}; download or copy the file again")
    try:
      header = json.loads(f.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
      raise ConversionError(f"{path} is not a safetensors file (unreadable header: {error})") from error

  tensors, data_end = {}, 0
  for key, entry in header.items():
    if key == "__metadata__":
      continue
    dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
    if dtype not in DTYPE_BYTES:
      raise ConversionError(f"{path}: tensor {key} has dtype {dtype!r}, which safetensors does not define")
    if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
      raise ConversionError(f"{path}: tensor {key} spans {end - begin} bytes but {dtype} {list(shape)} needs "
                            f"{math.prod(shape) * DTYPE_BYTES[dtype]}; the file is corrupt")
    data_end = max(data_end, end)
    tensors[key] = TensorInfo(key, path, dtype, shape)
  if 8 + header_len + data_end > size:
    raise ConversionError(f"{path} is truncated: its header describes {8 + header_len + data_end} bytes but the "
                          f"file has {size}; download or copy the file again")
  return tensors


def find_tensors(hf_dir: Path) -> dict[str, TensorInfo]:
  """Index every tensor of a single-file or sharded (index.json) checkpoint, validating the headers."""
  index = hf_dir / INDEX_FILE
  if index.is_file():
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ConversionError(f"{index} has no weight_map; it is not a safetensors index")
    files = sorted(set(weight_map.values()))
    absent = [name for name in files if not (hf_dir / name).is_file()]
    if absent:
      raise ConversionError(f"{index} lists shards {absent} that are not in {hf_dir}; download them")
  elif (hf_dir / SINGLE_FILE).is_file():
    weight_map, files = None, [SINGLE_FILE]
  else:
    raise ConversionError(f"{hf_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}; only safetensors checkpoints are "
                          "supported (re-save a pytorch_model.bin checkpoint with save_pretrained)")

  tensors: dict[str, TensorInfo] = {}
  for name in files:
    for key, info in read_header(hf_dir / name).items():
      if key in tensors:
        raise ConversionError(f"tensor {key} appears in both {tensors[key].file.name} and {name}")
      tensors[key] = info
  if weight_map is not None:
    wrong = sorted(k for k, name in weight_map.items() if k not in tensors or tensors[k].file.name != name)
    if wrong:
      raise ConversionError(f"{index} maps tensors {wrong[:10]} to shards that do not contain them; "
                            "the index does not match the shards")
  return tensors


class TensorReader:
  """Reads tensors one at a time through `safe_open`; `release()` closes the files opened so far.

  `safe_open` memory-maps each file, and every page read stays in the process's resident set
  until the file is closed. The converter therefore calls `release()` after each table row.
  """

  def __init__(self, tensors: dict[str, TensorInfo]):
    self.tensors = tensors
    self.bytes_read = 0
    self._stack = contextlib.ExitStack()
    self._handles: dict[Path, object] = {}

  def __enter__(self) -> TensorReader:
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  def release(self) -> None:
    self._stack.close()
    self._stack = contextlib.ExitStack()
    self._handles.clear()

  def _handle(self, key: str):
    file = self.tensors[key].file
    if file not in self._handles:
      self._handles[file] = self._stack.enter_context(safe_open(str(file), framework="numpy"))
    return self._handles[file]

  def get(self, key: str) -> np.ndarray:
    array = self._handle(key).get_tensor(key)
    self.bytes_read += array.nbytes
    return array

  def get_row(self, key: str, index: int) -> np.ndarray:
    """Read `tensor[index]` without reading the rest of the tensor."""
    array = self._handle(key).get_slice(key)[index]
    self.bytes_read += array.nbytes
    return array
