"""build_partition: exactness at full budget, artifact round trip, fallbacks and input errors."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import prism_jax
from partition import (AnnealConfig, PartitionConfig, ProfileConfig, RouterTuningConfig, SolverConfig,
                       build_partition, partitioned_model)
from partition.calibration import encode_text, load_token_ids
from partition.router_tuning import dense_linear_moe, sub_expert_outputs
from prism_jax.checkpoint import save_params
from prism_jax.model import PrismModel
from prism_jax.partition_io import read_partition, read_summary, write_partition
from prism_jax.subexperts import LayerPartition, Partition, split_expert_params
from prism_jax.testing import TINY, random_params

CONFIG = TINY
# One N, solver and activation shape ([E, 64, F], the per-expert cap) for every build, so they share compiled code.
FAST = PartitionConfig(num_sub_experts=2, solver="sa",
                       profile=ProfileConfig(sequence_length=64, batch_size=8, max_tokens_per_expert=64),
                       solvers=SolverConfig(sa=AnnealConfig(steps=2000)))


def calibration_ids(n=400, seed=0):
  return np.random.default_rng(seed).integers(1, CONFIG.vocab_size, n)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp("ckpt")
  paths = []
  for seed in (0, 1):
    paths.append(save_params(root / f"seed{seed}", CONFIG, random_params(CONFIG, seed=seed, scale=6.0),
                             source=f"random seed {seed}"))
  return paths


@pytest.fixture(scope="module")
def model(checkpoints):
  return prism_jax.load(checkpoints[0])


@pytest.fixture(scope="module")
def built(model):
  return build_partition(model, calibration_ids(), FAST, calibration_source="random ids")


def perplexity(logits, tokens):
  logp = np.asarray(log_softmax(logits))[:, :-1]
  nll = -np.take_along_axis(logp, tokens[:, 1:, None], axis=-1)
  return float(np.exp(nll.mean()))


def log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_full_budget_equals_original(model, built):
  partition, _ = built
  sub = partitioned_model(model, partition)
  tokens = calibration_ids(96, seed=7).reshape(2, 48).astype(np.int32)
  want = np.asarray(model(tokens))
  got = np.asarray(sub(tokens, budget=sub.full_budget))
  assert np.isfinite(got).all()
  err = np.abs(got - want).max()
  assert err <= 1e-4, f"max abs logit error {err:.2e}"
  assert perplexity(got, tokens) == pytest.approx(perplexity(want, tokens), rel=1e-5)


def test_summary_records_objectives(built):
  partition, summary = built
  assert set(summary["layers"]) == {str(i) for i in CONFIG.moe_layer_indices}
  for layer, s in summary["layers"].items():
    assert s["objective"] <= s["references"]["random"], f"layer {layer}: {s['objective']} > random"
    assert s["objective"] <= s["stages"]["greedy"] + 1e-3
    assert s["seconds"] > 0
    assert s["fallback_experts"] == []
  assert summary["calibration"] == {"source": "random ids", "tokens": 400, "sequences": 7, "sequence_length": 64,
                                    "max_tokens_per_expert": 64}
  assert partition.layers[0].core_ENC.shape == (CONFIG.num_experts, 2, 4)
  json.dumps(summary)  # JSON-ready


def test_artifact_round_trip(tmp_path, model, built, checkpoints):
  partition, summary = built
  out = write_partition(tmp_path / "part", partition, summary)
  loaded = read_partition(out)
  assert loaded.fingerprint == model.fingerprint
  for i, layer in partition.layers.items():
    assert np.array_equal(loaded.layers[i].permutation_EF, layer.permutation_EF)
    assert np.array_equal(loaded.layers[i].core_ENC, layer.core_ENC)
  assert read_summary(out)["solver"] == "sa"
  sub = prism_jax.load(checkpoints[0], partition=out)
  assert sub.full_budget == 2 * CONFIG.num_experts_per_tok
  with pytest.raises(ValueError, match="fingerprint"):
    prism_jax.load(checkpoints[1], partition=out)
  with pytest.raises(FileExistsError, match="already exists"):
    write_partition(out, partition, summary)


def test_experts_without_tokens_fall_back(model):
  # One repeated token gives every position the same hidden state, so each layer routes to K experts only.
  partition, summary = build_partition(model, np.full(64, 5), FAST)
  for i, s in summary["layers"].items():
    silent = [e for e, n in enumerate(s["tokens_routed"]) if n == 0]
    assert len(silent) == CONFIG.num_experts - CONFIG.num_experts_per_tok
    assert s["fallback_experts"] == silent
    perm = partition.layers[int(i)].permutation_EF
    for e in silent:
      assert perm[e].tolist() == list(range(CONFIG.moe_intermediate_size))


def test_linear_router_repeats_parent(model):
  partition, _ = build_partition(model, calibration_ids(), dataclasses.replace(FAST, router="linear"))
  router = np.asarray(model.module().layers[0].mlp.router[...])
  assert np.array_equal(partition.layers[0].linear_router_DG, np.repeat(router, 2, axis=1))
  sub = partitioned_model(model, partition)
  tokens = calibration_ids(48, seed=3).reshape(1, 48).astype(np.int32)
  err = np.abs(np.asarray(sub(tokens, budget=sub.full_budget)) - np.asarray(model(tokens))).max()
  assert err <= 1e-4, f"max abs logit error {err:.2e}"


@pytest.mark.slow
def test_dense_linear_moe_matches_layer():
  n = 2
  mlp_params = {k: np.asarray(v) for k, v in random_params(CONFIG, seed=0, scale=6.0)["layers"][0]["mlp"].items()}
  perm = np.stack([np.random.default_rng(e).permutation(32) for e in range(CONFIG.num_experts)]).astype(np.int32)
  rng = np.random.default_rng(1)
  router_DG = rng.normal(size=(CONFIG.hidden_size, CONFIG.num_experts * n)).astype(np.float32)
  layer = LayerPartition(perm, np.zeros((CONFIG.num_experts, n, 1), np.int32), router_DG)
  partition = Partition(n, "linear", {i: layer for i in CONFIG.moe_layer_indices}, "x")
  sub = PrismModel(CONFIG, random_params(CONFIG, seed=0, scale=6.0), partition=partition)
  graphdef, state = nnx.split(sub.module().layers[0].mlp)
  layer_call = jax.jit(lambda state, x, budget: nnx.merge(graphdef, state)(x, jnp.ones(10, bool), budget)[0],
                       static_argnums=2)
  dense_call = jax.jit(dense_linear_moe, static_argnums=(4, 5))
  split = split_expert_params(mlp_params, layer, n, "linear")
  x = jnp.asarray(rng.normal(size=(10, CONFIG.hidden_size)).astype(np.float32))
  outputs = sub_expert_outputs(x, *(jnp.asarray(split[k]) for k in ("gate", "up", "down")))
  for budget in (1, 3, 4):
    want = np.asarray(layer_call(state, x, budget))
    got = np.asarray(dense_call(x, outputs, jnp.asarray(router_DG), budget, n, CONFIG.norm_topk_prob))
    err = np.abs(got - want).max()
    assert err <= 1e-4 * np.abs(want).max(), f"budget {budget}: max abs error {err:.2e}"


@pytest.mark.slow
def test_router_tuning_lowers_error(model):
  config = dataclasses.replace(FAST, router="linear",
                               router_tuning=RouterTuningConfig(steps=60, eval_every=5, max_tokens=256))
  partition, summary = build_partition(model, calibration_ids(), config)
  before_total, after_total = 0.0, 0.0
  for i, s in summary["layers"].items():
    before = s["router_tuning"]["relative_error_before"]["mean"]
    after = s["router_tuning"]["relative_error_after"]["mean"]
    assert after <= before, f"layer {i}: tuning raised the mean relative error {before:.4f} -> {after:.4f}"
    before_total, after_total = before_total + before, after_total + after
    assert partition.layers[int(i)].linear_router_DG.shape == (CONFIG.hidden_size, CONFIG.num_experts * 2)
  assert after_total < before_total, f"tuning changed nothing: mean errors {before_total:.4f} -> {after_total:.4f}"


def test_bad_inputs_name_value_and_fix(model):
  with pytest.raises(ValueError, match=r"num_sub_experts=3 does not divide the expert width F=32.*divisors"):
    build_partition(model, calibration_ids(), PartitionConfig(num_sub_experts=3, profile=FAST.profile))
  with pytest.raises(ValueError, match=r"10 tokens, fewer than the 64 needed"):
    build_partition(model, calibration_ids(10), FAST)
  with pytest.raises(ValueError, match="empty"):
    encode_text("  \n\n ", tokenizer=None)
  with pytest.raises(ValueError, match=r"token ids must lie in 0\.\.127"):
    build_partition(model, np.full(100, 500), FAST)
  dense = CONFIG.replace(moe_layers=(False, False), intermediate_size=64)
  with pytest.raises(ValueError, match="no MoE layers"):
    build_partition(PrismModel(dense, random_params(dense)), calibration_ids(), FAST)
  with pytest.raises(ValueError, match="keep must be"):
    PartitionConfig(num_sub_experts=2, keep=3)
  with pytest.raises(ValueError, match="router tuning"):
    PartitionConfig(router="compound", router_tuning=RouterTuningConfig(steps=5))


def test_empty_calibration_file_named(tmp_path):
  path = tmp_path / "calib.txt"
  path.write_text("  \n\n ")
  with pytest.raises(ValueError, match=r"calibration file .*calib\.txt is empty"):
    load_token_ids(path, tokenizer=object(), label="calibration")


def test_empty_npy_and_non_utf8_files_named(tmp_path):
  ids = tmp_path / "ids.npy"
  np.save(ids, np.zeros((0,), np.int32))
  with pytest.raises(ValueError, match=r"calibration file .*ids\.npy contains no token ids"):
    load_token_ids(ids, tokenizer=None, label="calibration")
  latin = tmp_path / "latin.txt"
  latin.write_bytes(b"caf\xe9 au lait")
  with pytest.raises(ValueError, match=r"text file .*latin\.txt is not UTF-8"):
    load_token_ids(latin, tokenizer=object(), label="calibration")
