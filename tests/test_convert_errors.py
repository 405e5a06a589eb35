"""Bad converter input: each case fails before writing anything, with a message naming the problem."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from converters import ConversionError, convert_checkpoint
from converters.safetensors_io import INDEX_FILE


@pytest.fixture
def hf_dir(tiny_hf_dir, tmp_path):
  """A private copy of the tiny Qwen3-MoE checkpoint that a test may damage."""
  return shutil.copytree(tiny_hf_dir, tmp_path / "hf")


def edit_config(hf_dir, **changes):
  path = hf_dir / "config.json"
  data = json.loads(path.read_text())
  data.update(changes)
  path.write_text(json.dumps(data))


def edit_tensors(hf_dir, edit):
  """Rewrite model.safetensors after `edit(tensors)` changes the {key: array} dict in place."""
  path = hf_dir / "model.safetensors"
  with safe_open(str(path), framework="numpy") as f:
    tensors = {key: f.get_tensor(key) for key in f.keys()}
  edit(tensors)
  save_file(tensors, path, metadata={"format": "pt"})


def convert_fails(hf_dir, tmp_path, *fragments, error=ConversionError):
  """Convert, expect `error` whose message contains every fragment, and check nothing was written."""
  out = tmp_path / "prism"
  with pytest.raises(error) as caught:
    convert_checkpoint(hf_dir, out)
  message = str(caught.value)
  for fragment in fragments:
    assert fragment in message, f"{fragment!r} not in error message: {message}"
  assert not out.exists(), "output directory was created"
  assert not (tmp_path / "prism.partial").exists(), "partial output left behind"
  return message


def test_leftover_tensor_is_listed(hf_dir, tmp_path):
  edit_tensors(hf_dir, lambda t: t.update({"model.layers.0.mlp.bonus.weight": np.zeros((2, 2), np.float32)}))
  convert_fails(hf_dir, tmp_path, "model.layers.0.mlp.bonus.weight", "not consumed")


def test_missing_tensor_is_named(hf_dir, tmp_path):
  edit_tensors(hf_dir, lambda t: t.pop("model.layers.1.mlp.experts.5.down_proj.weight"))
  convert_fails(hf_dir, tmp_path, "model.layers.1.mlp.experts.5.down_proj.weight", "missing")


def test_wrong_shape_is_named(hf_dir, tmp_path):
  key = "model.layers.1.self_attn.k_proj.weight"
  edit_tensors(hf_dir, lambda t: t.update({key: t[key][:-1]}))
  convert_fails(hf_dir, tmp_path, key, "[23, 48]", "[24, 48]")


def test_config_that_disagrees_with_weights(hf_dir, tmp_path):
  edit_config(hf_dir, moe_intermediate_size=16)
  convert_fails(hf_dir, tmp_path, "model.layers.0.mlp.experts.0.gate_proj.weight", "[32, 48]", "[16, 48]")


def test_unhandled_config_field_is_named(hf_dir, tmp_path):
  edit_config(hf_dir, attention_sink_size=4)
  convert_fails(hf_dir, tmp_path, "attention_sink_size", "not handled")


@pytest.mark.parametrize("changes, fragments", [
    (dict(hidden_act="gelu"), ("hidden_act", "silu")),
    (dict(attention_bias=True), ("attention_bias", "o_proj")),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0}), ("dynamic", "supported types")),
    (dict(rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.5}), ("partial_rotary_factor",)),
    (dict(use_sliding_window=True, sliding_window=None), ("sliding_window", "positive")),
    (dict(use_sliding_window=True, sliding_window=0), ("sliding_window", "positive")),
    (dict(num_experts_per_tok=9), ("num_experts_per_tok", "exceeds")),
    (dict(num_experts=8, num_local_experts=4), ("num_experts=8", "num_local_experts=4")),
])
def test_unsupported_config_value_is_named(hf_dir, tmp_path, changes, fragments):
  edit_config(hf_dir, **changes)
  convert_fails(hf_dir, tmp_path, *fragments)


def test_unsupported_family_lists_supported(hf_dir, tmp_path):
  edit_config(hf_dir, model_type="llama")
  convert_fails(hf_dir, tmp_path, "'llama'", "mixtral", "olmoe", "qwen2_moe", "qwen3_moe")


def test_truncated_file_is_rejected(hf_dir, tmp_path):
  path = hf_dir / "model.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[:-100])
  convert_fails(hf_dir, tmp_path, "model.safetensors", "truncated")


def test_truncated_header_is_rejected(hf_dir, tmp_path):
  path = hf_dir / "model.safetensors"
  path.write_bytes(path.read_bytes()[:40])
  convert_fails(hf_dir, tmp_path, "truncated", "header")


def test_missing_shard_is_named(hf_checkpoints, tmp_path):
  from tests import hf_tiny  # pylint: disable=import-outside-toplevel

  reference, _ = hf_checkpoints("qwen2_moe_shared_expert")
  sharded = hf_tiny.save(reference, tmp_path / "sharded", max_shard_size="100KB")
  shards = sorted(set(json.loads((sharded / INDEX_FILE).read_text())["weight_map"].values()))
  (sharded / shards[-1]).unlink()
  convert_fails(sharded, tmp_path, shards[-1], "download")


def test_missing_weights_and_config(hf_dir, tmp_path):
  (hf_dir / "model.safetensors").unlink()
  convert_fails(hf_dir, tmp_path, "model.safetensors", "only safetensors")
  (hf_dir / "config.json").unlink()
  convert_fails(hf_dir, tmp_path, "config.json")


def test_existing_output_needs_overwrite(hf_dir, tmp_path):
  out = tmp_path / "prism"
  out.mkdir()
  (out / "keep.txt").write_text("old")
  with pytest.raises(FileExistsError, match="--overwrite"):
    convert_checkpoint(hf_dir, out)
  assert (out / "keep.txt").read_text() == "old"
  convert_checkpoint(hf_dir, out, overwrite=True)
  assert not (out / "keep.txt").exists()
  assert (out / "prism.json").is_file()


def test_failure_while_writing_leaves_nothing(hf_dir, tmp_path, monkeypatch):
  from prism_jax.checkpoint import CheckpointWriter  # pylint: disable=import-outside-toplevel

  original = CheckpointWriter.write_item

  def fail_on_last_layer(self, name, tree):
    if name == "layer_001":
      raise OSError("disk full")
    original(self, name, tree)

  monkeypatch.setattr(CheckpointWriter, "write_item", fail_on_last_layer)
  convert_fails(hf_dir, tmp_path, "disk full", error=OSError)
