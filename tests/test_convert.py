"""Converter: config translation against transformers, expert layouts, shards, dtypes, tokenizer, CLI."""

from __future__ import annotations

import dataclasses
import json

import jax
import ml_dtypes
import numpy as np
import pytest
import torch

from converters import FAMILIES, convert_checkpoint, get_family, read_config
from converters.safetensors_io import INDEX_FILE
from prism_jax.checkpoint import TOKENIZER_DIR, load_params
from prism_jax.cli import main as prism_main
from tests import hf_tiny


def translate(family: str, **fields):
  return get_family(family).config_from_hf({"model_type": family, **fields}, source="test config")


def assert_same_params(actual: dict, expected: dict) -> None:
  flat_actual = dict(jax.tree_util.tree_flatten_with_path(actual)[0])
  flat_expected = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
  assert flat_actual.keys() == flat_expected.keys()
  for path, value in flat_expected.items():
    np.testing.assert_array_equal(flat_actual[path], value, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_defaults_match_transformers(family):
  config_class, _ = hf_tiny.CLASSES[family]
  declared = {field.name: field.default for field in dataclasses.fields(config_class)}
  for name, value in get_family(family).defaults.items():
    assert name in declared, f"{family}: {name} is not a field of {config_class.__name__}"
    assert declared[name] == value, f"{family} default {name}: ours {value!r}, transformers {declared[name]!r}"


def test_rope_forms_translate_alike():
  sizes = dict(hidden_size=64, num_attention_heads=4, max_position_embeddings=4096)
  yarn = dict(factor=4.0, original_max_position_embeddings=1024, beta_fast=16)
  old = translate("qwen3_moe", rope_theta=5e5, rope_scaling={"type": "yarn", **yarn}, **sizes)
  new = translate("qwen3_moe", rope_parameters={"rope_type": "yarn", "rope_theta": 5e5, **yarn}, **sizes)
  assert old.rope == new.rope
  assert new.rope.kind == "yarn"
  assert new.rope.theta == 5e5
  assert new.rope.beta_fast == 16.0
  assert new.rope.original_max_position_embeddings == 1024


def test_rope_theta_defaults_per_family():
  assert translate("mixtral").rope.theta == 1e6
  assert translate("olmoe").rope.theta == 1e4
  assert translate("mixtral", rope_theta=123.0).rope.theta == 123.0


@pytest.mark.parametrize("fields", [
    dict(use_sliding_window=True, max_window_layers=3),
    dict(use_sliding_window=True, max_window_layers=8),
    dict(use_sliding_window=False, max_window_layers=8),
    dict(use_sliding_window=True, layer_types=["full_attention", "sliding_attention"] * 3),
])
def test_qwen2_moe_sliding_layers_follow_transformers(fields):
  data = dict(num_hidden_layers=6, sliding_window=128, **fields)
  reference = hf_tiny.CLASSES["qwen2_moe"][0](**data)
  ours = translate("qwen2_moe", **data)
  assert ours.sliding_window_layers == tuple(t == "sliding_attention" for t in reference.layer_types)
  assert ours.sliding_window == (128 if any(ours.sliding_window_layers) else None)


def test_qwen3_moe_window_covers_all_layers():
  config = translate("qwen3_moe", num_hidden_layers=4, use_sliding_window=True, sliding_window=64,
                     max_window_layers=1)
  assert config.sliding_window_layers == (True,) * 4
  assert translate("qwen3_moe", num_hidden_layers=4, sliding_window=64).sliding_window is None


@pytest.mark.parametrize("family, fields", [
    ("qwen2_moe", dict(decoder_sparse_step=2)),
    ("qwen2_moe", dict(mlp_only_layers=[0, 3])),
    ("qwen3_moe", dict(decoder_sparse_step=3, mlp_only_layers=[1])),
])
def test_dense_layers_follow_transformers(family, fields):
  case = hf_tiny.Case(family, dict(num_hidden_layers=4, **fields))
  reference = hf_tiny.build_model(case)
  expected = tuple(type(layer.mlp).__name__.endswith("SparseMoeBlock") for layer in reference.model.layers)
  ours = get_family(family).config_from_hf(reference.config.to_dict(), source="test config")
  assert ours.moe_layers == expected


@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe_dense_layers_sliding", "olmoe_clip_qkv"])
def test_fused_layout_converts_like_per_expert(hf_checkpoints, tmp_path, case):
  reference, hf_dir = hf_checkpoints(case)
  fused_dir = hf_tiny.save(reference, tmp_path / "fused", fused=True)
  _, per_expert, _ = load_params(convert_checkpoint(hf_dir, tmp_path / "a"))
  config, fused, meta = load_params(convert_checkpoint(fused_dir, tmp_path / "b"))
  assert "fused experts" in meta["source"]
  assert_same_params(fused, per_expert)


def test_sharded_checkpoint_converts_like_single_file(hf_checkpoints, tmp_path):
  reference, hf_dir = hf_checkpoints("qwen2_moe_shared_expert")
  sharded_dir = hf_tiny.save(reference, tmp_path / "sharded", max_shard_size="100KB")
  shards = set(json.loads((sharded_dir / INDEX_FILE).read_text())["weight_map"].values())
  assert len(shards) > 1
  _, single, _ = load_params(convert_checkpoint(hf_dir, tmp_path / "a"))
  _, sharded, _ = load_params(convert_checkpoint(sharded_dir, tmp_path / "b"))
  assert_same_params(sharded, single)


def test_tokenizer_and_generation_config_copied(tiny_hf_dir, tmp_path):
  out = convert_checkpoint(tiny_hf_dir, tmp_path / "prism")
  names = sorted(p.name for p in (out / TOKENIZER_DIR).iterdir())
  assert names == ["generation_config.json", "tokenizer.json", "tokenizer_config.json"]


def test_bfloat16_output(tiny_hf_dir, tmp_path):
  _, full, _ = load_params(convert_checkpoint(tiny_hf_dir, tmp_path / "f32"))
  config, half, _ = load_params(convert_checkpoint(tiny_hf_dir, tmp_path / "bf16", dtype="bfloat16"))
  assert config.dtype == "bfloat16"
  for (path, value), expected in zip(jax.tree_util.tree_flatten_with_path(half)[0], jax.tree_util.tree_leaves(full)):
    assert value.dtype == ml_dtypes.bfloat16, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(value, expected.astype(ml_dtypes.bfloat16), err_msg=jax.tree_util.keystr(path))


def test_bfloat16_source_converts_to_float32(hf_checkpoints, tmp_path):
  reference, _ = hf_checkpoints("olmoe_clip_qkv")
  half_dir = hf_tiny.save(hf_tiny.build_model("olmoe_clip_qkv").to(torch.bfloat16), tmp_path / "hf16")
  _, params, _ = load_params(convert_checkpoint(half_dir, tmp_path / "prism"))
  expected = reference.model.embed_tokens.weight.detach().to(torch.bfloat16).float().numpy()
  np.testing.assert_array_equal(params["embed"]["embedding"], expected)
  assert params["layers"][0]["mlp"]["gate"].dtype == np.float32


def test_read_config_without_weights(tiny_hf_dir):
  family, config = read_config(tiny_hf_dir)
  assert family.model_type == "qwen3_moe"
  assert config.qk_norm == "head"
  assert config.head_dim == 12
  assert config.eos_token_ids == (2,)


def test_cli_convert(tiny_hf_dir, tmp_path, capsys):
  out = tmp_path / "prism"
  assert prism_main(["convert", str(tiny_hf_dir), str(out), "--dtype", "float32"]) == 0
  assert (out / "prism.json").is_file()
  assert prism_main(["convert", str(tiny_hf_dir), str(out)]) == 1  # exists, no --overwrite
  assert prism_main(["convert", str(tiny_hf_dir), str(out), "--overwrite"]) == 0


def test_cli_names_unknown_option_before_command(capsys):
  with pytest.raises(SystemExit) as exit_info:
    prism_main(["--bogus", "convert"])
  assert exit_info.value.code == 2
  assert "unrecognized option '--bogus' before the command" in capsys.readouterr().err


def test_cli_accepts_verbose_after_command(capsys):
  with pytest.raises(SystemExit) as exit_info:
    prism_main(["convert", "-v", "--help"])
  assert exit_info.value.code == 0
  assert "-v, --verbose" in capsys.readouterr().out
