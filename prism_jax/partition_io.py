"""Partition artifact on disk: `partition.json` (readable summary) + `tensors.npz`.

`partition.json` contains at least: format_version, num_sub_experts, router,
num_core_neurons, fingerprint (of the checkpoint it was built for), moe_layers, and
whatever summary the builder adds (solver, objectives, calibration, wall seconds).
`tensors.npz` holds `layer_{i}.permutation` [E, F], `layer_{i}.core` [E, N, C] and, for
a linear router, `layer_{i}.linear_router` [D, G].
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from prism_jax.subexperts import LayerPartition, Partition

PARTITION_FORMAT_VERSION = 1


def write_partition(out_dir: str | os.PathLike, partition: Partition, summary: dict[str, Any] | None = None,
                    *, overwrite: bool = False) -> Path:
  """Write atomically: everything goes to `<out>.partial`, renamed into place when complete."""
  out_dir = Path(out_dir)
  if out_dir.exists() and not overwrite:
    raise FileExistsError(f"partition directory {out_dir} already exists; choose another --out or pass --overwrite")
  tmp = out_dir.with_name(out_dir.name + ".partial")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  try:
    arrays = {}
    for i, layer in sorted(partition.layers.items()):
      arrays[f"layer_{i}.permutation"] = layer.permutation_EF.astype(np.int32)
      arrays[f"layer_{i}.core"] = layer.core_ENC.astype(np.int32)
      if layer.linear_router_DG is not None:
        arrays[f"layer_{i}.linear_router"] = np.asarray(layer.linear_router_DG, np.float32)
    np.savez(tmp / "tensors.npz", **arrays)
    meta = {
        "format_version": PARTITION_FORMAT_VERSION,
        "num_sub_experts": partition.num_sub_experts,
        "router": partition.router,
        "num_core_neurons": partition.num_core_neurons,
        "fingerprint": partition.fingerprint,
        "moe_layers": sorted(partition.layers),
        **(summary or {}),
    }
    (tmp / "partition.json").write_text(json.dumps(meta, indent=2))
    if out_dir.exists():
      shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir


def read_partition(path: str | os.PathLike) -> Partition:
  path = Path(path)
  meta_file, tensor_file = path / "partition.json", path / "tensors.npz"
  if not meta_file.is_file() or not tensor_file.is_file():
    raise FileNotFoundError(f"{path} is not a partition directory (partition.json or tensors.npz missing); "
                            "create one with `prism partition`")
  meta = json.loads(meta_file.read_text())
  if meta.get("format_version") != PARTITION_FORMAT_VERSION:
    raise ValueError(f"{path}: partition format {meta.get('format_version')} is not the supported "
                     f"{PARTITION_FORMAT_VERSION}")
  layers = {}
  with np.load(tensor_file) as arrays:
    for i in meta["moe_layers"]:
      router_key = f"layer_{i}.linear_router"
      layers[int(i)] = LayerPartition(
          permutation_EF=arrays[f"layer_{i}.permutation"],
          core_ENC=arrays[f"layer_{i}.core"],
          linear_router_DG=arrays[router_key] if router_key in arrays else None,
      )
  return Partition(int(meta["num_sub_experts"]), meta["router"], layers, meta["fingerprint"])


def read_summary(path: str | os.PathLike) -> dict[str, Any]:
  return json.loads((Path(path) / "partition.json").read_text())
