"""Scheduling alone, on a stub runner with fixed logits and a manual clock: order, deadlines, budgets, buckets."""

import json

import numpy as np
import pytest

from serve.config import EngineConfig, Program, bucket_sizes, round_to_whole_experts, smallest_fitting
from serve.engine import Engine
from serve.latency import LatencyTable
from serve.request import QoS, SamplingParams
from serve.testing import ManualClock, StubRunner, linear_latency

BASE = EngineConfig(batch_buckets=(1, 2, 4), token_buckets=(4, 16), budgets=(2, 4, 6, 8), max_queue=16,
                    compilation_cache_dir=None, profile_repeats=0)


def make_engine(policy="fcfs", config=BASE, **runner_kwargs):
  clock = ManualClock()
  config = config.replace(policy=policy)
  runner = StubRunner(clock=clock, num_slots=config.max_batch, **runner_kwargs)
  programs = config.programs(runner.full_budget, runner.num_sub_experts)
  latency = linear_latency(programs)
  runner.latency = latency
  engine = Engine(runner, config, clock=clock, latency=latency, progress=False)
  engine.compile()
  return engine, runner, clock


def submit(engine, prompt_len=3, max_tokens=2, budget=None, deadline=None, clock=None, at=None):
  if clock is not None and at is not None:
    clock.now = at
  qos = QoS(budget=budget, ttft_deadline_s=deadline)
  return engine.submit(list(range(2, 2 + prompt_len)), SamplingParams(max_tokens=max_tokens), qos)


def step_ids(record):
  return [int(r.split("-")[1]) for r in record.request_ids]


def test_bucket_sizes_powers_then_linear():
  assert bucket_sizes(64, 16) == (1, 2, 4, 8, 16, 32, 48, 64)
  assert bucket_sizes(4, 4) == (1, 2, 4)
  assert bucket_sizes(40, 16, minimum=8) == (8, 16, 32, 40)
  assert smallest_fitting((1, 4, 8), 3) == 4
  with pytest.raises(ValueError, match="does not fit"):
    smallest_fitting((1, 4), 5)


def test_config_rejects_bad_values():
  with pytest.raises(ValueError, match="strictly increasing"):
    EngineConfig(batch_buckets=(4, 2))
  with pytest.raises(ValueError, match="policy"):
    EngineConfig(policy="lifo")
  with pytest.raises(ValueError, match="fraction"):
    EngineConfig(tiers=(("gold", 1.5),))
  with pytest.raises(ValueError, match="exceed"):
    EngineConfig(budgets=(4, 16)).resolve_budgets(8, 4)


def test_default_budgets_cover_tiers_and_full():
  config = EngineConfig()
  assert config.resolve_budgets(32, 4) == (8, 16, 24, 32)
  assert config.replace(whole_experts=True).resolve_budgets(8, 4) == (4, 8)
  assert round_to_whole_experts(5, 4) == 8


def test_fcfs_runs_arrival_order_at_largest_budget():
  engine, runner, clock = make_engine("fcfs", BASE.replace(batch_buckets=(1, 2)))
  handles = [submit(engine, budget=budget, clock=clock, at=i * 1e-3) for i, budget in enumerate([3, 7, 2])]
  first = engine.step()
  assert first.kind == "prefill"
  assert step_ids(first) == [0, 1]
  assert first.budgets == (7, 7)
  assert first.program == Program(2, 4, 8)  # budget 7 is not compiled: the next compiled one is 8
  assert list(runner.calls[-1].budget_B) == [7, 7]
  engine.run_until_idle()
  # The third request waited for a free slot and then ran alone at its own budget.
  assert handles[0].result(0).budget_run == 7
  assert handles[2].result(0).budget_run == 2
  first_token_of_third = 2e-3 + handles[2].result(0).ttft_s
  end_of_second = 1e-3 + handles[1].result(0).latency_s
  assert first_token_of_third > end_of_second


def test_per_row_keeps_each_budget():
  engine, runner, clock = make_engine("per_row")
  for budget in (3, 7, 2):
    submit(engine, budget=budget, clock=clock)
  record = engine.step()
  assert record.budgets == (3, 7, 2)
  assert record.program.budget == 8
  assert list(runner.calls[-1].budget_B[:3]) == [3, 7, 2]
  assert runner.calls[-1].budget_B[3] == 1  # the padding row


def test_edf_orders_by_deadline_and_groups_by_budget():
  engine, _, clock = make_engine("edf")
  submit(engine, budget=4, deadline=5.0, clock=clock)   # 0
  submit(engine, budget=6, deadline=0.5, clock=clock)   # 1: most urgent
  submit(engine, budget=4, deadline=0.2, clock=clock)   # 2: most urgent overall
  submit(engine, budget=4, clock=clock)                 # 3: no deadline
  submit(engine, budget=6, deadline=0.1, clock=clock)   # 4: the most urgent of all
  first = engine.step()
  assert step_ids(first) == [4, 1]
  assert first.budgets == (6, 6)
  assert first.program.budget == 6
  second = engine.step()
  assert second.kind == "prefill"
  assert step_ids(second) == [2, 0]
  assert second.budgets == (4, 4)


def test_edf_groups_by_compiled_budget():
  engine, runner, clock = make_engine("edf")
  submit(engine, budget=3, deadline=0.1, clock=clock)
  submit(engine, budget=5, deadline=0.2, clock=clock)
  submit(engine, budget=4, deadline=0.3, clock=clock)
  first = engine.step()
  assert step_ids(first) == [0, 2]  # budgets 3 and 4 both run in the budget-4 program
  assert first.budgets == (3, 4)
  assert first.program.budget == 4
  assert list(runner.calls[-1].budget_B[:2]) == [3, 4]


def test_edf_decode_runs_all_rows_at_own_budget():
  engine, _, clock = make_engine("edf")
  submit(engine, budget=4, max_tokens=4, clock=clock)
  submit(engine, budget=6, max_tokens=4, clock=clock)
  first, second, third = engine.step(), engine.step(), engine.step()
  assert (first.kind, first.budgets) == ("prefill", (4,))  # no deadlines: arrival order, one budget per step
  assert (second.kind, second.budgets) == ("prefill", (6,))
  assert (third.kind, third.budgets) == ("decode", (4, 6))
  assert third.program.budget == 6


def test_edf_skips_rows_that_would_break_a_deadline():
  config = BASE.replace(token_buckets=(4, 16))
  engine, _, clock = make_engine("edf", config)
  table = engine.latency.seconds
  short = table[Program(1, 4, 4)]
  long = table[Program(2, 16, 4)]
  submit(engine, prompt_len=3, budget=4, deadline=(short + long) / 2, clock=clock)  # meets it only alone
  submit(engine, prompt_len=14, budget=4, deadline=10.0, clock=clock)
  first = engine.step()
  assert step_ids(first) == [0], f"predicted alone {short}, together {long}"
  assert first.program == Program(1, 4, 4)


def test_throughput_stops_higher_budgets_when_half_full():
  engine, _, clock = make_engine("throughput")
  submit(engine, budget=6, clock=clock)
  submit(engine, budget=2, clock=clock)
  submit(engine, budget=2, clock=clock)
  submit(engine, budget=4, clock=clock)
  first = engine.step()
  # Sorted by budget: 2, 2 fill half of 4 slots, so 4 and 6 wait.
  assert step_ids(first) == [1, 2]
  assert first.budgets == (2, 2)


def test_throughput_admits_higher_budget_when_below_half():
  engine, _, clock = make_engine("throughput")
  submit(engine, budget=6, clock=clock)
  submit(engine, budget=2, clock=clock)
  first = engine.step()
  assert step_ids(first) == [1, 0]
  assert first.budgets == (6, 6)


def test_bucket_choice_and_chunked_prefill():
  engine, runner, clock = make_engine("fcfs")
  submit(engine, prompt_len=20, max_tokens=1, clock=clock)
  first = engine.step()
  assert first.program.tokens == 16
  assert first.program.batch == 1
  assert list(runner.calls[-1].positions_BT[0]) == list(range(16))
  second = engine.step()
  assert second.program.tokens == 4
  assert list(runner.calls[-1].positions_BT[0]) == [16, 17, 18, 19]
  assert engine.step() is None


def test_padding_rows_and_tokens_are_masked():
  engine, runner, clock = make_engine("fcfs")
  for length in (3, 2, 1):
    submit(engine, prompt_len=length, clock=clock)
  engine.step()
  batch = runner.calls[-1]
  assert batch.tokens_BT.shape == (4, 4)
  assert list(batch.valid_BT.sum(axis=1)) == [3, 2, 1, 0]
  assert batch.slots_B[3] == runner.num_slots  # the scratch slot
  max_len = runner.max_len
  assert (batch.positions_BT[~batch.valid_BT] == max_len).all()
  assert list(batch.last_index_B[:3]) == [2, 1, 0]


def test_whole_experts_rounds_budgets_up():
  engine, _, clock = make_engine("per_row", BASE.replace(whole_experts=True, budgets=None))
  assert engine.compiled_budgets == (4, 8)
  handle = submit(engine, budget=5, clock=clock)
  engine.run_until_idle()
  assert handle.result().budget_requested == 8
  assert handle.result().budget_run == 8


def test_tier_resolves_to_budget():
  engine, _, clock = make_engine("per_row")
  handle = engine.submit([5, 6], SamplingParams(max_tokens=1), QoS(quality_tier="balanced"))
  engine.run_until_idle()
  assert handle.result().budget_requested == 4


def test_deadline_attainment_uses_clock():
  engine, _, clock = make_engine("fcfs")
  meets = submit(engine, budget=8, deadline=1.0, clock=clock)
  misses = submit(engine, budget=8, deadline=1e-6, clock=clock)
  engine.run_until_idle()
  assert meets.result().deadline_met is True
  assert misses.result().deadline_met is False
  assert meets.result().ttft_s == pytest.approx(engine.latency.predict(2, 4, 8))


def test_latency_table_predicts_between_entries(tmp_path):
  table = LatencyTable({Program(1, 1, 4): 1.0, Program(4, 1, 4): 4.0, Program(1, 1, 8): 2.0, Program(4, 1, 8): 8.0})
  assert table.predict(4, 1, 8) == 8.0
  assert table.predict(2, 1, 4) == pytest.approx(2.0)
  assert table.predict(4, 1, 6) == pytest.approx(6.0)
  assert table.predict(8, 1, 4) == pytest.approx(8.0)  # past the largest shape: scaled by work
  assert LatencyTable({}).predict(1, 1, 1) == 0.0
  path = table.save(tmp_path / "table.json")
  assert json.loads(path.read_text())["format_version"] == 1
  assert LatencyTable.load(path).seconds == table.seconds


def test_latency_table_rejects_bad_files(tmp_path):
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(ValueError, match="prism profile"):
    LatencyTable.load(bad)
  with pytest.raises(ValueError, match="finite"):
    LatencyTable({Program(1, 1, 1): float("nan")})


def test_simulated_time_policies_finish_every_request():
  rng = np.random.default_rng(0)
  for policy in ("fcfs", "edf", "throughput", "per_row"):
    engine, _, clock = make_engine(policy)
    handles = [submit(engine, prompt_len=int(rng.integers(1, 30)), max_tokens=int(rng.integers(1, 6)),
                      budget=int(rng.integers(1, 9)), deadline=0.05, clock=clock) for _ in range(12)]
    engine.run_until_idle()
    reasons = [h.result(0).finish_reason for h in handles]
    assert reasons.count("length") == 12, f"{policy}: {reasons}"
