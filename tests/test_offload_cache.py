"""Offload building blocks without a model: budgets, eviction policies, the slot cache, selection."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from serve.offload.cache import SlotCache
from serve.offload.memory import parse_expert_memory, plan_memory
from serve.offload.policy import LFUPolicy, LRUPolicy
from serve.offload.selection import Selection, choose
from serve.offload.tier import UnitData, unit_groups_index

D, W = 4, 2


# ---- budgets --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [
    ("25%", 250), (0.25, 250), ("0.5", 500), (1.0, 1000), ("100%", 1000), (300, 300), ("300", 300),
    ("0.2kb", 200), ("1KiB", 1000), ("5000", 1000),
])
def test_parse_expert_memory_forms(value, expected):
  assert parse_expert_memory(value, 1000) == expected


@pytest.mark.parametrize("value", ["abc", "25 %%", "-5%", "0%", "150%", 1.5, 0.0, 0, -3, True, "12 parsecs", None])
def test_parse_expert_memory_rejects(value):
  with pytest.raises(ValueError, match="expert_memory"):
    parse_expert_memory(value, 1000)


def plan(expert_memory, granularity="sub_expert", max_batch=1):
  # 2 MoE layers, E=4, N=2, K=2: a sub-expert is 3 * D * W * 4 = 96 bytes, 8 per layer.
  return plan_memory(expert_memory, granularity=granularity, num_moe_layers=2, num_experts=4, num_sub_experts=2,
                     top_k=2, hidden_size=D, width=W, itemsize=4, max_batch=max_batch)


def test_plan_memory_sizes_slots():
  sub = plan("50%")
  assert (sub.unit_bytes, sub.capacity, sub.total_bytes, sub.working_set) == (96, 8, 1536, 4)
  whole = plan("50%", "expert")
  assert (whole.unit_bytes, whole.capacity, whole.unit_groups, whole.working_set) == (192, 4, 2, 2)
  assert sub.held_bytes <= sub.budget_bytes


def test_plan_memory_rejects_below_working_set():
  # Batch 2 at full budget may need 2 * N * K = 8 sub-experts of a layer: 768 bytes, 50%.
  with pytest.raises(ValueError) as error:
    plan(700, max_batch=2)
  message = str(error.value)
  assert "at least 768 bytes" in message, message
  assert "'50%'" in message, message
  assert plan("50%", max_batch=2).capacity == 8


# ---- eviction policies ---------------------------------------------------------------------------


class FakeTier:
  """Unit u of layer l has every weight equal to 100 * l + u; records what it read."""

  def __init__(self, unit_groups=1):
    self.unit_groups = unit_groups
    self.reads = []

  def read(self, layer, units):
    self.reads.append((layer, [int(u) for u in units]))
    groups = unit_groups_index(units, self.unit_groups)
    value = (100 * layer + groups // self.unit_groups).astype(np.float32)
    make = lambda shape: np.broadcast_to(value[:, None, None], (len(groups), *shape)).copy()
    return UnitData(np.asarray(units), make((D, W)), make((D, W)), make((W, D)))


def run_trace(policy, trace, capacity=3):
  memory = dataclasses.replace(plan("50%"), capacity=capacity)
  cache = SlotCache(memory, (0, 1), hidden_size=D, width=W, dtype=jnp.float32, policy=policy)
  tier = FakeTier()
  outcomes = []
  for layer, units in trace:
    hits, misses = cache.ensure(layer, np.asarray(units), tier.read)
    outcomes.append((sorted(hits.tolist()), sorted(misses.tolist())))
  return cache, outcomes


TRACE = [(0, [0, 1]), (0, [2]), (0, [0]), (0, [0]), (0, [1]), (0, [3]), (0, [2]), (0, [3])]


def test_lru_trace():
  _, outcomes = run_trace("lru", TRACE)
  # Recency after step 5: 2 (oldest), 0, 1. [3] evicts 2, [2] evicts 0, [3] hits.
  assert outcomes == [([], [0, 1]), ([], [2]), ([0], []), ([0], []), ([1], []), ([], [3]), ([], [2]), ([3], [])]


def test_lfu_trace():
  _, outcomes = run_trace("lfu", TRACE)
  # Counts before [3] are 0:3, 1:2, 2:1, so 2 goes. Unit 2 returns with count 2 (kept across
  # eviction) and evicts 3 (count 1). The last [3] misses and evicts 1: both 1 and 2 have
  # count 2, and 1 was used less recently.
  assert outcomes == [([], [0, 1]), ([], [2]), ([0], []), ([0], []), ([1], []), ([], [3]), ([], [2]), ([], [3])]


def test_lfu_evicts_older_on_tie():
  policy = LFUPolicy()
  for key in ("a", "b", "c"):
    policy.admit(key)
  policy.touch("a")
  policy.touch("b")
  assert policy.evict(1, ()) == ["c"]
  assert policy.evict(1, ()) == ["a"]


@pytest.mark.parametrize("policy_type", [LRUPolicy, LFUPolicy])
def test_policy_never_evicts_protected(policy_type):
  policy = policy_type()
  for key in range(4):
    policy.admit(key)
  assert sorted(policy.evict(2, {0, 1})) == [2, 3]
  with pytest.raises(RuntimeError):
    policy.evict(2, {0, 1})
  assert sorted(policy.evict(2, ())) == [0, 1], "a failed eviction must leave the policy unchanged"


def test_slot_cache_rows_hold_the_right_weights():
  cache, _ = run_trace("lru", [(0, [0, 1]), (1, [5]), (0, [2])], capacity=4)
  for layer, group in [(0, 0), (0, 1), (0, 2), (1, 5)]:
    row = int(cache.group_rows(layer, np.asarray([group]))[0])
    expected = 100 * layer + group
    assert float(cache.gate_RDW[row].min()) == expected == float(cache.down_RWD[row].max()), (layer, group, row)
  assert cache.bytes_held() == 4 * 96


def test_slot_cache_whole_experts_take_n_rows():
  memory = plan("50%", "expert")
  cache = SlotCache(memory, (0, 1), hidden_size=D, width=W, dtype=jnp.float32)
  hits, misses = cache.ensure(0, np.asarray([3, 1]), FakeTier(unit_groups=2).read)
  assert (hits.tolist(), misses.tolist()) == ([], [1, 3])
  rows = cache.group_rows(0, np.asarray([2, 3, 6, 7]))
  assert [float(cache.up_RDW[r][0, 0]) for r in rows] == [1, 1, 3, 3]
  with pytest.raises(RuntimeError, match="not resident"):
    cache.group_rows(0, np.asarray([0]))


def test_slot_cache_rejects_more_units_than_capacity():
  cache, _ = run_trace("lru", [], capacity=2)
  with pytest.raises(ValueError, match="waves"):
    cache.ensure(0, np.asarray([0, 1, 2]), FakeTier().read)


def test_slot_cache_failed_read_changes_nothing():
  cache, _ = run_trace("lru", [(0, [0, 1, 2])])

  def failing(layer, units):
    raise OSError("disk gone")

  with pytest.raises(OSError):
    cache.ensure(0, np.asarray([3]), failing)
  assert cache.resident_mask(0, np.arange(4)).tolist() == [True, True, True, False]


# ---- selection --------------------------------------------------------------------------------------


def test_selection_exact_runs_every_valid_candidate():
  valid = np.asarray([[True, True, False]])
  run = choose(Selection(), np.asarray([[0, 1, 2]]), np.ones((1, 3)), valid, np.zeros((1, 3), bool))
  assert run.tolist() == valid.tolist()


def test_selection_min_sub_experts_fetches_in_rank_order():
  unit = np.asarray([[5, 6, 7, 8], [1, 2, 3, 4]])
  resident = np.asarray([[False, True, False, False], [True, True, True, False]])
  valid = np.ones((2, 4), bool)
  run = choose(Selection("resident_first", min_sub_experts=3), unit, np.ones((2, 4)), valid, resident)
  # Row 0 has 1 resident, so it fetches the first two missing in rank order: 5 and 7.
  assert run.tolist() == [[True, True, True, False], [True, True, True, False]]


def test_selection_min_mass_fetches_heaviest_first():
  unit = np.asarray([[0, 1, 2, 3]])
  mass = np.asarray([[0.1, 0.4, 0.3, 0.2]])
  resident = np.asarray([[True, False, False, False]])
  run = choose(Selection("resident_first", min_mass=0.75), unit, mass, np.ones((1, 4), bool), resident)
  # 0.1 resident; + 0.4 = 0.5 < 0.75; + 0.3 = 0.8 >= 0.75, so unit 3 stays out.
  assert run.tolist() == [[True, True, True, False]]
  covered = float(mass[run].sum() / mass.sum())
  assert covered >= 0.75, covered


def test_selection_shares_fetched_units_across_tokens():
  unit = np.asarray([[0, 1], [1, 2]])
  mass = np.asarray([[0.9, 0.1], [0.2, 0.8]])
  run = choose(Selection("resident_first", min_sub_experts=1), unit, mass, np.ones((2, 2), bool),
               np.zeros((2, 2), bool))
  # Row 0 fetches unit 0, row 1 fetches unit 1 (its rank-first); row 0 then runs unit 1 for free.
  assert run.tolist() == [[True, True], [True, False]]


@pytest.mark.parametrize("text, expected", [
    ("exact", Selection()), ("mass:0.9", Selection("resident_first", min_mass=0.9)),
    ("min:4,mass:0.5", Selection("resident_first", min_sub_experts=4, min_mass=0.5)),
])
def test_selection_parse(text, expected):
  assert Selection.parse(text) == expected


@pytest.mark.parametrize("kwargs", [dict(mode="resident_first"), dict(min_mass=0.5), dict(mode="resident_first",
                                    min_mass=1.5), dict(mode="resident_first", min_sub_experts=0), dict(mode="x")])
def test_selection_rejects(kwargs):
  with pytest.raises(ValueError):
    Selection(**kwargs)
