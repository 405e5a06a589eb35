"""Profiler: recorded activations, routing and padding against a direct computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from partition.calibration import Sequences, make_sequences
from partition.config import ProfileConfig
from partition.profiler import profile_layers, sample_tokens
from prism_jax.model import PrismModel
from prism_jax.rope import rotary_tables
from prism_jax.testing import TINY, random_params

CONFIG = TINY


@pytest.fixture(scope="module")
def model():
  return PrismModel(CONFIG, random_params(CONFIG, seed=0, scale=4.0))


@pytest.fixture(scope="module")
def sequences():
  ids = np.random.default_rng(0).integers(1, CONFIG.vocab_size, 300)
  return make_sequences(ids, 64)  # 5 rows, the last one padded


@pytest.fixture(scope="module")
def ffn_inputs(model, sequences):
  """Normed FFN input of every layer [B*T, D], from one jitted pass of the original model."""

  @jax.jit
  def run(state, tokens, valid):
    decoder = nnx.merge(model.graphdef, state)
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    cos, sin = rotary_tables(CONFIG.rope, CONFIG.head_dim, positions)
    x, inputs = decoder.embed(tokens), []
    for block in decoder.layers:
      x = x + block.attn(block.attn_norm(x), positions, cos, sin, None)[0]
      h = block.mlp_norm(x).reshape(b * t, -1)
      inputs.append(h)
      x = x + block.mlp(h, valid.reshape(-1))[0].reshape(x.shape)
    return inputs

  return [np.asarray(h) for h in run(model.state, jnp.asarray(sequences.tokens_BT), jnp.asarray(sequences.valid_BT))]


def direct_acts(model, sequences, ffn_inputs, layer, expert):
  """|a| of every valid token the parent router sends to `expert`, in NumPy."""
  mlp = model.module().layers[layer].mlp
  h = ffn_inputs[layer][sequences.valid_BT.reshape(-1)].astype(np.float64)
  logits = h @ np.asarray(mlp.router[...])
  top = np.argsort(-logits, axis=1, kind="stable")[:, :CONFIG.num_experts_per_tok]
  rows = np.nonzero((top == expert).any(axis=1))[0]
  g = h[rows] @ np.asarray(mlp.gate[...][expert])
  u = h[rows] @ np.asarray(mlp.up[...][expert])
  return np.abs(g / (1.0 + np.exp(-g)) * u)


def test_profile_matches_direct_computation(model, sequences, ffn_inputs):
  profiles = list(profile_layers(model, sequences, ProfileConfig(batch_size=8)))
  assert [p.layer for p in profiles] == list(CONFIG.moe_layer_indices)
  for profile in profiles:
    for expert in (0, 5):
      want = direct_acts(model, sequences, ffn_inputs, profile.layer, expert)
      count = int(profile.count_E[expert])
      assert count == want.shape[0], f"layer {profile.layer} expert {expert}: {count} tokens, expected {want.shape[0]}"
      got = np.asarray(profile.acts_ETF[expert, :count])
      err = np.abs(got - want).max()
      assert err <= 1e-4 * np.abs(want).max(), f"layer {profile.layer} expert {expert}: max abs error {err:.3g}"
      padding = np.abs(np.asarray(profile.acts_ETF[expert, count:])).max(initial=0.0)
      assert padding == 0.0, f"padding rows hold {padding}"


def test_routing_matches_model_forward(model, sequences):
  """Token counts per expert equal those of the model's own routing over valid tokens."""
  out = model.forward(sequences.tokens_BT, valid_BT=sequences.valid_BT)
  valid = sequences.valid_BT.reshape(-1)
  profiles = list(profile_layers(model, sequences, ProfileConfig(batch_size=8)))
  for info, profile in zip(out.moe, profiles):
    experts = np.asarray(info.top_experts_SK)[valid]
    want = np.bincount(experts.reshape(-1), minlength=CONFIG.num_experts)
    assert profile.routed_E.tolist() == want.tolist()
    assert int(profile.routed_E.sum()) == sequences.num_tokens * CONFIG.num_experts_per_tok


def test_padding_never_counted(model, sequences):
  assert sequences.tokens_BT.shape == (5, 64) and sequences.num_tokens == 300
  total = sum(int(p.routed_E.sum()) for p in profile_layers(model, sequences, ProfileConfig(batch_size=8)))
  assert total == 300 * CONFIG.num_experts_per_tok * len(CONFIG.moe_layer_indices)


def test_cap_limits_tokens_per_expert(model, sequences):
  for profile in profile_layers(model, sequences, ProfileConfig(batch_size=8, max_tokens_per_expert=16)):
    assert profile.acts_ETF.shape[1] == 16
    assert profile.count_E.max() == 16
    assert np.all(profile.count_E == np.minimum(profile.routed_E, 16))


def test_sample_tokens_rows():
  experts = np.array([[0, 1], [1, 2], [0, 2], [1, 0]])
  table, count, routed = sample_tokens(experts, 4, cap=8, rng=np.random.default_rng(0))
  assert routed.tolist() == [3, 3, 2, 0]
  assert count.tolist() == [3, 3, 2, 0]
  assert table[0, :3].tolist() == [0, 2, 3]
  assert table[1, :3].tolist() == [0, 1, 3]


def test_partitioned_model_rejected(sequences):
  from prism_jax.subexperts import identity_partition  # pylint: disable=import-outside-toplevel

  params = random_params(CONFIG, seed=0)
  partitioned = PrismModel(CONFIG, params, partition=identity_partition(
      CONFIG.num_experts, CONFIG.moe_intermediate_size, 2, CONFIG.moe_layer_indices, "x"))
  with pytest.raises(ValueError, match="without a partition"):
    next(profile_layers(partitioned, sequences))


def test_sequences_from_rows():
  rows = np.arange(12).reshape(3, 4)
  seq = make_sequences(rows, 64)
  assert isinstance(seq, Sequences)
  assert seq.tokens_BT.shape == (3, 4) and seq.valid_BT.all()
