"""Offloading mode on a tiny model: same outputs as the resident model, accounting, memory held."""

import gc

import jax
import numpy as np
import pytest

from prism_jax.model import PrismModel
from prism_jax.testing import TINY, random_params
from serve.offload import Selection
from tests.test_offload_support import (N, TOLERANCE, call_kwargs, max_abs, offloaded, random_partition,
                                        tiny_partitioned_model, token_batches)


@pytest.fixture(scope="module")
def model():
  return tiny_partitioned_model()


@pytest.fixture(scope="module")
def batches():
  return token_batches(3)


@pytest.fixture(scope="module")
def references(model, batches):
  kwargs = call_kwargs(model)
  return [model.forward(tokens, **kwargs) for tokens in batches]


def run(offload, model, batches):
  kwargs = call_kwargs(model)
  return [offload.forward(tokens, **kwargs) for tokens in batches]


@pytest.mark.parametrize("granularity, policy", [("sub_expert", "lru"), ("expert", "lfu")])
def test_offload_matches_resident_model(model, batches, references, tmp_path, granularity, policy):
  valid = call_kwargs(model)["valid_BT"]
  offload = offloaded(model, tmp_path, expert_memory="50%", granularity=granularity, policy=policy)
  try:
    outs = run(offload, model, batches) + run(offload, model, batches[:1])  # the last one runs from the cache
    for step, (out, reference) in enumerate(zip(outs, references + references[:1])):
      error = max_abs(out.logits_BTV[valid], reference.logits_BTV[valid])
      assert error <= TOLERANCE, f"step {step}: logits max abs error {error:.2e}"
      cache_error = max(max_abs(a, b) for a, b in zip(jax.tree.leaves(out.cache), jax.tree.leaves(reference.cache)))
      assert cache_error <= TOLERANCE, f"step {step}: KV cache max abs error {cache_error:.2e}"
      for got, want in zip(out.moe, reference.moe):
        assert np.array_equal(got.top_experts_SK, want.top_experts_SK), f"step {step}"
        assert np.array_equal(got.active_S, want.active_S), f"step {step}: {got.active_S} != {want.active_S}"
    stats = offload.stats()
    assert stats.hits > 0, stats
    assert stats.misses > 0, stats
    assert stats.bytes_fetched == stats.misses * offload.plan.unit_bytes, stats
    # Row 0 runs 8 sub-experts on its 6 tokens, row 1 runs 3 on its 4 valid tokens.
    assert stats.sub_experts_per_token == pytest.approx((6 * 8 + 4 * 3) / 10), stats
    assert stats.tokens == 4 * 10, stats
  finally:
    offload.close()


def test_offload_waves_when_prefill_exceeds_cache(model, batches, references, tmp_path):
  # One decode row needs N*K = 8 sub-experts of a layer; 10 tokens need more than that.
  sub_expert_bytes = 3 * TINY.hidden_size * TINY.moe_intermediate_size // N * 4
  offload = offloaded(model, tmp_path, expert_memory=8 * sub_expert_bytes, max_batch=1)
  valid = call_kwargs(model)["valid_BT"]
  try:
    out = run(offload, model, batches[:1])[0]
    error = max_abs(out.logits_BTV[valid], references[0].logits_BTV[valid])
    assert offload.last_step.waves > 0, offload.last_step
    assert error <= TOLERANCE, f"max abs error {error:.2e} with {offload.last_step.waves} extra waves"
  finally:
    offload.close()


def expert_arrays_alive() -> dict[int, int]:
  """Id -> bytes of every live device array shaped like sub-expert weights."""
  gc.collect()
  d, width = TINY.hidden_size, TINY.moe_intermediate_size // N
  return {id(a): a.nbytes for a in jax.live_arrays()
          if a.ndim == 3 and a.shape[1:] in ((d, width), (width, d)) and not a.is_deleted()}


@pytest.mark.parametrize("granularity", ["sub_expert", "expert"])
def test_offload_memory_stays_within_budget(model, batches, tmp_path, granularity):
  before = expert_arrays_alive()  # the resident model's weights, and whatever other tests left alive
  offload = offloaded(model, tmp_path, expert_memory="50%", granularity=granularity)
  budget_bytes = offload.plan.budget_bytes
  try:
    for tokens in batches:
      offload.forward(tokens, **call_kwargs(model))
      alive = sum(size for key, size in expert_arrays_alive().items() if key not in before)
      assert alive <= budget_bytes, f"{alive} bytes of expert weights alive, budget {budget_bytes}"
      assert offload.cache.bytes_held() <= budget_bytes
      assert offload.cache.num_resident() <= offload.plan.capacity
  finally:
    offload.close()


def test_prefetch_never_changes_results(model, batches, tmp_path):
  settings = dict(expert_memory="50%", selection=Selection("resident_first", min_mass=0.7), policy="lru")
  runs = {}
  for prefetch in (True, False):
    offload = offloaded(model, tmp_path / str(prefetch), prefetch=prefetch, **settings)
    try:
      outs = run(offload, model, batches + batches[::-1])
      runs[prefetch] = [np.asarray(out.logits_BTV) for out in outs], offload.stats()
    finally:
      offload.close()
  (with_prefetch, stats_on), (without, stats_off) = runs[True], runs[False]
  for step, (a, b) in enumerate(zip(with_prefetch, without)):
    assert np.array_equal(a, b), f"step {step}: prefetch changed logits by {max_abs(a, b):.2e}"
  assert (stats_on.hits, stats_on.misses, stats_on.run) == (stats_off.hits, stats_off.misses, stats_off.run)
  assert stats_on.prefetched > 0, stats_on
  assert stats_off.prefetched == 0, stats_off


def test_prefetch_predicts_an_unchanged_stream(batches, tmp_path):
  # With attention and expert outputs scaled to ~0, the next layer's input equals this one's,
  # so the next layer's router on the current stream predicts its units exactly.
  params = random_params(TINY, seed=0, scale=2.0)
  for block in params["layers"].values():
    block["attn"]["o_proj"]["kernel"] *= 1e-6
    block["mlp"]["down"] *= 1e-6
  still = PrismModel(TINY, params, partition=random_partition(TINY, N))
  offload = offloaded(still, tmp_path, expert_memory="50%")
  try:
    run(offload, still, batches)
    stats = offload.stats()
    assert stats.prefetched > 0, stats
    assert stats.prefetch_wasted_bytes == 0, stats
  finally:
    offload.close()


def test_resident_first_meets_its_floor(model, batches, tmp_path):
  exact = offloaded(model, tmp_path / "exact", expert_memory="50%")
  floor = offloaded(model, tmp_path / "floor", expert_memory="50%",
                    selection=Selection("resident_first", min_sub_experts=3))
  try:
    run(exact, model, batches + batches)
    for out in run(floor, model, batches + batches):
      for info in out.moe:
        counts = np.asarray(info.active_S)[call_kwargs(model)["valid_BT"].reshape(-1)]
        assert counts.min() >= 3, counts
    assert floor.stats().bytes_fetched < exact.stats().bytes_fetched, (floor.stats(), exact.stats())
    assert floor.stats().sub_experts_per_token < exact.stats().sub_experts_per_token, floor.stats()
    assert floor.stats().mass_coverage < 1.0, floor.stats()
  finally:
    exact.close()
    floor.close()


def test_resident_first_with_full_floor_equals_exact(model, batches, references, tmp_path):
  # A floor of N*K sub-experts per token leaves nothing to skip, so every candidate runs.
  valid = call_kwargs(model)["valid_BT"]
  offload = offloaded(model, tmp_path, expert_memory="50%", selection=Selection("resident_first", min_sub_experts=8))
  try:
    for step, (out, reference) in enumerate(zip(run(offload, model, batches), references)):
      error = max_abs(out.logits_BTV[valid], reference.logits_BTV[valid])
      assert error <= TOLERANCE, f"step {step}: max abs error {error:.2e}"
      assert offload.last_step.run == offload.last_step.requested, offload.last_step
  finally:
    offload.close()


def test_offload_rejects_budget_below_working_set(model, tmp_path):
  # Two rows at the full budget may need 2 * N * K = 16 of a layer's 32 sub-experts: a quarter.
  with pytest.raises(ValueError, match=r"at least 49152 bytes .*'25%'"):
    offloaded(model, tmp_path, expert_memory="5%", max_batch=2)
  offloaded(model, tmp_path, expert_memory="25%", max_batch=2).close()
