"""Sub-expert runtime: budgets, routers, backends, per-row budgets, padding, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prism_jax.config import SubExpertConfig
from prism_jax.model import PrismModel
from prism_jax.subexperts import LayerPartition, Partition
from prism_jax.testing import TINY, random_params
from tests.moe_reference import reference_moe

CONFIG = TINY.replace(norm_topk_prob=False)


def random_partition(config, n, seed=0, router="compound", cores=2, linear_router=False):
  rng = np.random.default_rng(seed)
  e, f, d = config.num_experts, config.moe_intermediate_size, config.hidden_size
  layers = {}
  for i in config.moe_layer_indices:
    perm = np.stack([rng.permutation(f) for _ in range(e)]).astype(np.int32)
    core = np.stack([[rng.choice(f // n, cores, replace=False) for _ in range(n)] for _ in range(e)]).astype(np.int32)
    lin = rng.normal(size=(d, e * n)).astype(np.float32) if linear_router else None
    layers[i] = LayerPartition(perm, core, lin)
  return Partition(n, router, layers, "test")


def jitted_layer(model, index):
  """The MoE layer `index` of `model` as a jitted function of (x_SD, valid_S, budget)."""
  graphdef, state = nnx.split(model.module().layers[index].mlp)

  @functools.partial(jax.jit, static_argnames="budget")
  def run(state, x_SD, valid_S, budget):
    return nnx.merge(graphdef, state)(x_SD, valid_S, budget)

  return lambda x_SD, valid_S, budget: run(state, x_SD, valid_S, budget)


def tokens(batch=2, length=12, seed=0):
  return np.random.default_rng(seed).integers(0, CONFIG.vocab_size, (batch, length)).astype(np.int32)


def moe_input(seed=0, num_tokens=24):
  return np.random.default_rng(seed).normal(size=(num_tokens, CONFIG.hidden_size)).astype(np.float32)


@pytest.fixture(scope="module")
def params():
  return random_params(CONFIG, seed=0, scale=8.0)


@pytest.fixture(scope="module")
def base_logits(params):
  return np.asarray(PrismModel(CONFIG, params)(tokens()))


@pytest.mark.parametrize("n", [2, 4, 8])
def test_full_budget_equals_unpartitioned(params, base_logits, n):
  model = PrismModel(CONFIG, params, partition=random_partition(CONFIG, n, seed=n))
  for budget in (None, model.full_budget):
    logits = np.asarray(model(tokens(), budget=budget))
    assert np.isfinite(logits).all()
    err = np.abs(logits - base_logits).max()
    assert err <= 1e-5, f"N={n} budget={budget}: max abs logit diff {err:.2e}"


@pytest.mark.parametrize("backend,tile_rows", [("native", None), ("tiled", None), ("tiled", 1), ("xla", None)])
@pytest.mark.parametrize("router", ["compound", "linear"])
def test_backend_matches_loop_reference(params, backend, tile_rows, router):
  n = 4
  partition = random_partition(CONFIG, n, seed=3, router=router, linear_router=router == "linear")
  model = PrismModel(CONFIG, params, partition=partition, backend=backend, tile_rows=tile_rows)
  layer = jitted_layer(model, 0)
  x = moe_input()
  valid = jnp.ones((len(x),), bool)
  # 1 and 3: inside the first expert; 4: exactly N; 6: one full expert plus a partial one; 8: full.
  for budget in (1, 3, 4, 6, 8):
    got, info = layer(jnp.asarray(x), valid, budget)
    want, want_active = reference_moe(x, params["layers"][0]["mlp"], partition.layers[0], n, CONFIG.num_experts_per_tok,
                                      budget, CONFIG.norm_topk_prob, router)
    err = np.abs(np.asarray(got) - want).max()
    rel = err / np.abs(want).max()
    assert err <= 1e-4, f"{backend}/{router} budget={budget}: max abs err {err:.2e} (relative {rel:.2e})"
    np.testing.assert_array_equal(np.asarray(info.active_S), want_active)


def test_normalized_router_matches_reference(params):
  config = CONFIG.replace(norm_topk_prob=True)
  partition = random_partition(config, 2, seed=5)
  model = PrismModel(config, params, partition=partition)
  layer = jitted_layer(model, 1)
  x = moe_input(seed=1)
  for budget in range(1, model.full_budget + 1):
    got, _ = layer(jnp.asarray(x), jnp.ones((len(x),), bool), budget)
    want, _ = reference_moe(x, params["layers"][1]["mlp"], partition.layers[1], 2, 2, budget, True)
    assert np.abs(np.asarray(got) - want).max() <= 1e-4, f"budget={budget}"


def test_linear_router_repeated_gate_is_exact_at_full_budget(params, base_logits):
  model = PrismModel(CONFIG, params, partition=random_partition(CONFIG, 4, router="linear"))
  err = np.abs(np.asarray(model(tokens())) - base_logits).max()
  assert err <= 1e-5, f"max abs logit diff {err:.2e}"


def test_executed_count_grows_with_budget(params):
  model = PrismModel(CONFIG, params, partition=random_partition(CONFIG, 4))
  full = model.full_budget
  # One program: row b runs budget b + 1 on the same tokens (per-row budgets equal static ones, tested below).
  toks = np.repeat(tokens(batch=1), full, axis=0)
  out = model.forward(toks, budget=full, budget_B=np.arange(1, full + 1))
  counts = [sum(int(info.active_S.reshape(full, -1)[row].sum()) for info in out.moe) for row in range(full)]
  assert counts == sorted(counts), counts
  assert len(set(counts)) == len(counts), counts
  assert counts[-1] == len(out.moe) * toks.shape[1] * full


@pytest.mark.parametrize("router", ["compound", "linear"])
def test_per_row_budgets_equal_rows_alone(params, router):
  model = PrismModel(CONFIG, params, partition=random_partition(CONFIG, 4, router=router, linear_router=True))
  toks = tokens(batch=4, seed=2)
  row_budgets = np.array([1, 3, 8, 5])
  mixed = np.asarray(model(toks, budget=8, budget_B=row_budgets))
  for row, budget in enumerate(row_budgets):
    alone = np.asarray(model(toks[row:row + 1], budget=int(budget)))[0]
    err = np.abs(mixed[row] - alone).max()
    assert err <= 1e-5, f"row {row} at budget {budget}: max abs diff {err:.2e}"


def test_padding_rows_change_nothing(params):
  model = PrismModel(CONFIG, params, partition=random_partition(CONFIG, 4))
  toks = tokens(batch=2, length=10, seed=4)
  clean = model.forward(toks, budget=5)
  padded_tokens = np.concatenate([toks, np.full((2, 6), 7, np.int32)], axis=1)
  valid = np.arange(16)[None, :] < 10
  padded = model.forward(padded_tokens, budget=5, valid_BT=np.broadcast_to(valid, (2, 16)))
  err = np.abs(np.asarray(padded.logits_BTV[:, :10]) - np.asarray(clean.logits_BTV)).max()
  assert err <= 1e-5, f"max abs diff on real tokens {err:.2e}"
  for info in padded.moe:
    active = np.asarray(info.active_S).reshape(2, 16)
    assert (active[:, 10:] == 0).all(), "padded tokens were routed"
    assert (active[:, :10] == 5).all()


def test_backends_have_equal_gradients():
  from prism_jax.grouped_matmul import grouped_matmul

  rng = np.random.default_rng(0)
  lhs = jnp.asarray(rng.normal(size=(40, 8)), jnp.float32)
  rhs = jnp.asarray(rng.normal(size=(6, 8, 5)), jnp.float32)
  sizes = jnp.array([3, 0, 10, 1, 0, 20])

  def loss(lhs, rhs, backend):
    return jnp.sum(grouped_matmul(lhs, rhs, sizes, backend=backend) ** 2)

  grads = {b: jax.grad(loss, argnums=(0, 1))(lhs, rhs, b) for b in ("xla", "native", "tiled")}
  for backend in ("native", "tiled"):
    for name, got, want in zip(("d lhs", "d rhs"), grads[backend], grads["xla"]):
      err = np.abs(np.asarray(got) - np.asarray(want)).max()
      assert err <= 1e-4, f"{backend} {name}: max abs err {err:.2e}"


@pytest.mark.parametrize("budget", [0, 17, 2.5, "4", True])
def test_invalid_budget_raises(params, budget):
  model = PrismModel(CONFIG, params, partition=random_partition(CONFIG, 8))
  with pytest.raises(ValueError, match="budget"):
    model(tokens(), budget=budget)


def test_per_row_budget_above_static_budget_raises(params):
  model = PrismModel(CONFIG, params, partition=random_partition(CONFIG, 4))
  with pytest.raises(ValueError, match="budget_B"):
    model(tokens(), budget=4, budget_B=np.array([2, 6]))


def test_num_sub_experts_must_divide_width():
  with pytest.raises(ValueError, match="does not divide"):
    SubExpertConfig(num_sub_experts=3).check_divides(32)


def test_invalid_permutation_raises(params):
  partition = random_partition(CONFIG, 4)
  bad = partition.layers[0].permutation_EF.copy()
  bad[0, 0] = bad[0, 1]
  layers = dict(partition.layers)
  layers[0] = LayerPartition(bad, partition.layers[0].core_ENC)
  with pytest.raises(ValueError, match="not a permutation"):
    PrismModel(CONFIG, params, partition=Partition(4, "compound", layers, "test"))
