"""Export back to Hugging Face format: transformers reloads it with identical tensors and behaviour."""

from __future__ import annotations

import json

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from converters import ConversionError, convert_checkpoint, export_checkpoint, export_params
from prism_jax.checkpoint import load_params
from prism_jax.cli import main as prism_main
from prism_jax.testing import TINY, random_params
from tests import hf_tiny

EXPORT_CASES = ("mixtral_sliding_window", "qwen2_moe_shared_expert", "qwen2_moe_dense_layers_sliding",
                "qwen3_moe_dense_tied", "qwen3_moe_yarn_sliding", "olmoe_clip_qkv")


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_export_reloads_with_identical_tensors(hf_checkpoints, tmp_path, case):
  reference, hf_dir = hf_checkpoints(case)
  exported = export_checkpoint(convert_checkpoint(hf_dir, tmp_path / "prism"), tmp_path / "hf_out")
  reloaded = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
  assert type(reloaded) is type(reference)

  expected, actual = reference.state_dict(), reloaded.state_dict()
  assert actual.keys() == expected.keys()
  for key, tensor in expected.items():
    assert torch.equal(actual[key], tensor), f"{case}: tensor {key} changed in the round trip"

  # Same tensors and a config with the same meaning give bit-identical logits.
  tokens = torch.from_numpy(np.random.default_rng(0).integers(3, hf_tiny.VOCAB, (1, 96)))
  with torch.no_grad():
    assert torch.equal(reloaded(tokens).logits, reference(tokens).logits), f"{case}: logits differ after export"
  names = sorted(p.name for p in exported.iterdir())
  assert names == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                   "tokenizer_config.json"]


@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe_dense_layers_sliding"])
def test_convert_export_convert_round_trip(hf_checkpoints, tmp_path, case):
  _, hf_dir = hf_checkpoints(case)
  config, params, _ = load_params(convert_checkpoint(hf_dir, tmp_path / "first"))
  exported = export_checkpoint(tmp_path / "first", tmp_path / "hf_out")
  config_again, params_again, _ = load_params(convert_checkpoint(exported, tmp_path / "second"))
  assert config_again == config
  for (path, value), again in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_leaves(params_again)):
    np.testing.assert_array_equal(again, value, err_msg=jax.tree_util.keystr(path))


def test_export_params_of_random_model(tmp_path):
  params = random_params(TINY, seed=3)
  out = export_params(TINY, params, tmp_path / "hf")
  reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  assert reloaded.config.model_type == "qwen3_moe"
  gate_up = reloaded.state_dict()["model.layers.1.mlp.experts.gate_up_proj"].numpy()
  width = TINY.moe_intermediate_size
  np.testing.assert_array_equal(gate_up[:, :width], params["layers"][1]["mlp"]["gate"].transpose(0, 2, 1))
  np.testing.assert_array_equal(gate_up[:, width:], params["layers"][1]["mlp"]["up"].transpose(0, 2, 1))
  generation = json.loads((out / "generation_config.json").read_text())
  assert generation["eos_token_id"] == 0


def test_export_bfloat16_params(tmp_path):
  config = TINY.replace(dtype="bfloat16")
  params = jax.tree_util.tree_map(lambda x: x.astype(ml_dtypes.bfloat16), random_params(TINY, seed=4))
  out = export_params(config, params, tmp_path / "hf")
  reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
  embedding = reloaded.state_dict()["model.embed_tokens.weight"]
  assert embedding.dtype == torch.bfloat16
  np.testing.assert_array_equal(embedding.float().numpy(), params["embed"]["embedding"].astype(np.float32))
  assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_export_rejects_config_family_cannot_express(tmp_path):
  config = TINY.replace(family="mixtral", qk_norm="none", norm_topk_prob=False)
  params = random_params(config)
  with pytest.raises(ConversionError, match="norm_topk_prob=False"):
    export_params(config, params, tmp_path / "hf")
  assert not (tmp_path / "hf").exists()
  assert not (tmp_path / "hf.partial").exists()


def test_export_rejects_wrong_params(tmp_path):
  params = random_params(TINY)
  del params["layers"][1]["mlp"]["up"]
  with pytest.raises(ConversionError, match="layer_001"):
    export_params(TINY, params, tmp_path / "hf")
  params = random_params(TINY)
  params["layers"][0]["mlp"]["gate"] = params["layers"][0]["mlp"]["gate"][:, :, :16]
  with pytest.raises(ConversionError, match="layer_000.mlp.gate has shape"):
    export_params(TINY, params, tmp_path / "hf")
  assert not (tmp_path / "hf").exists()


def test_export_existing_output_needs_overwrite(tmp_path):
  out = tmp_path / "hf"
  out.mkdir()
  (out / "keep.txt").write_text("old")
  with pytest.raises(FileExistsError, match="overwrite"):
    export_params(TINY, random_params(TINY), out)
  assert (out / "keep.txt").read_text() == "old"
  export_params(TINY, random_params(TINY), out, overwrite=True)
  assert not (out / "keep.txt").exists()


def test_cli_export(tiny_hf_dir, tmp_path):
  ckpt = convert_checkpoint(tiny_hf_dir, tmp_path / "prism")
  assert prism_main(["export", str(ckpt), str(tmp_path / "hf")]) == 0
  assert (tmp_path / "hf" / "model.safetensors").is_file()
  assert prism_main(["export", str(ckpt), str(tmp_path / "hf")]) == 1
