"""Offloading under faults and in the engine: a broken slow tier fails the step, then recovers."""

import os
import shutil

import numpy as np
import pytest

from serve.config import EngineConfig
from serve.engine import Engine
from serve.offload import OffloadRunner, SlowTierError
from serve.request import QoS, SamplingParams
from tests.test_offload_support import (BATCH, BUDGET, MAX_LEN, TOKENS, TOLERANCE, call_kwargs, max_abs, offloaded,
                                        tiny_partitioned_model, token_batches)

BROKEN = "layer_001_gate.npy"  # the second MoE layer: the first one has run when it fails


@pytest.fixture(scope="module")
def model():
  return tiny_partitioned_model()


@pytest.fixture(scope="module")
def batches():
  return token_batches(2)


@pytest.fixture()
def offload(model, tmp_path):
  offload = offloaded(model, tmp_path, expert_memory="50%")
  yield offload
  offload.close()


def check_matches(model, offload, tokens):
  kwargs = call_kwargs(model)
  valid = kwargs["valid_BT"]
  got = offload.forward(tokens, **kwargs).logits_BTV[valid]
  error = max_abs(got, model.forward(tokens, **kwargs).logits_BTV[valid])
  assert error <= TOLERANCE, f"max abs error {error:.2e}"


def test_removed_file_fails_the_step_then_recovers(model, batches, offload, tmp_path):
  check_matches(model, offload, batches[0])
  path = tmp_path / BROKEN
  hidden = path.rename(tmp_path / "elsewhere.npy")
  offload.clear_cache()
  with pytest.raises(SlowTierError, match=f"{BROKEN} is missing"):
    offload.forward(batches[1], **call_kwargs(model))
  assert offload.last_step.error is not None and "missing" in offload.last_step.error, offload.last_step
  assert offload.stats().failed_steps == 1, offload.stats()
  hidden.rename(path)
  check_matches(model, offload, batches[1])


def test_truncated_file_fails_the_step_then_recovers(model, batches, offload, tmp_path):
  path = tmp_path / BROKEN
  original = path.read_bytes()
  check_matches(model, offload, batches[0])
  os.truncate(path, len(original) // 2)
  offload.clear_cache()
  with pytest.raises(SlowTierError, match="truncated"):
    offload.forward(batches[1], **call_kwargs(model))
  path.write_bytes(original)  # same file, restored in place
  check_matches(model, offload, batches[1])


def test_dropped_page_cache_still_reads_correctly(model, batches, offload):
  residency = offload.tier.drop_page_cache()
  assert 0.0 <= residency <= 1.0, residency
  offload.clear_cache()
  check_matches(model, offload, batches[0])


def greedy_reference_ok(model, prompt, generated) -> bool:
  """Whether each generated token is the resident model's argmax after its prefix (teacher forcing)."""
  sequence = list(prompt) + list(generated)
  tokens = np.zeros((BATCH, TOKENS), np.int32)
  tokens[0, :len(sequence)] = sequence
  kwargs = call_kwargs(model, budget_B=(BUDGET, BUDGET), lengths=(len(sequence), 1))
  logits = np.asarray(model.forward(tokens, **kwargs).logits_BTV[0])
  expected = [int(np.argmax(logits[len(prompt) + j - 1])) for j in range(len(generated))]
  return expected == list(generated)


def test_engine_serves_and_survives_a_broken_tier(model, offload, tmp_path):
  config = EngineConfig(batch_buckets=(BATCH,), token_buckets=(TOKENS,), budgets=(BUDGET,), max_len=MAX_LEN,
                        profile_repeats=0, compilation_cache_dir=None)
  engine = Engine(OffloadRunner(offload, num_slots=BATCH, max_len=MAX_LEN), config, progress=False)
  prompts = [[5, 9, 2], [7, 1, 4, 4]]
  handles = [engine.submit(p, SamplingParams(max_tokens=2)) for p in prompts]
  engine.run_until_idle()
  results = [h.result(0) for h in handles]
  for prompt, result in zip(prompts, results):
    assert result.finish_reason == "length", result
    assert greedy_reference_ok(model, prompt, result.token_ids), (prompt, result.token_ids)

  path = tmp_path / BROKEN
  hidden = path.rename(tmp_path / "elsewhere.npy")
  offload.clear_cache()
  failed = engine.submit(prompts[0], SamplingParams(max_tokens=2))
  engine.run_until_idle()
  outcome = failed.result(0)
  assert outcome.finish_reason == "error", outcome
  assert BROKEN in outcome.error, outcome.error

  hidden.rename(path)
  again = engine.submit(prompts[0], SamplingParams(max_tokens=2))
  engine.run_until_idle()
  assert again.result(0).token_ids == results[0].token_ids
  assert offload.stats().failed_steps == 1, offload.stats()


def test_metrics_report_offload_totals(model, offload):
  from fastapi.testclient import TestClient

  from serve.app import ServerConfig, create_app

  config = EngineConfig(batch_buckets=(BATCH,), token_buckets=(TOKENS,), budgets=(BUDGET,), max_len=MAX_LEN,
                        profile_repeats=0, compilation_cache_dir=None)
  engine = Engine(OffloadRunner(offload, num_slots=BATCH, max_len=MAX_LEN), config, progress=False)
  handle = engine.submit([5, 9, 2], SamplingParams(max_tokens=3))
  engine.run_until_idle()
  assert handle.result(0).finish_reason == "length"

  stats = engine.offload_stats()
  assert stats.tokens > 0
  assert stats.bytes_fetched > 0
  text = TestClient(create_app(engine, ServerConfig(model_name="tiny"))).get("/metrics").text
  assert f"prism_offload_fetched_bytes_total {float(stats.bytes_fetched)}" in text
  assert f"prism_offload_tokens_total {float(stats.tokens)}" in text
  assert f"prism_offload_misses_total {float(stats.misses)}" in text
  assert f"prism_offload_hit_rate {stats.hit_rate}" in text
  assert "prism_offload_stall_seconds_total " in text


@pytest.mark.slow
def test_host_tier_on_cpu_matches_resident_model(model, batches, tmp_path):
  # The accelerator path (pinned host memory) exercised on CPU, where both tiers are RAM.
  offload = offloaded(model, tmp_path, expert_memory="50%", tier="host", allow_host_tier_on_cpu=True)
  try:
    for tokens in batches:
      check_matches(model, offload, tokens)
    assert offload.stats().misses > 0
  finally:
    offload.close()


def test_host_tier_rejected_on_cpu(model, tmp_path):
  with pytest.raises(ValueError, match="needs an accelerator"):
    offloaded(model, tmp_path, expert_memory="50%", tier="host")
  shutil.rmtree(tmp_path, ignore_errors=True)
