"""Prometheus metrics of the engine and the HTTP server (an `EngineObserver`)."""

from __future__ import annotations

import threading
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from serve.offload.stats import OffloadStats
from serve.request import Completion
from serve.step import StepRecord

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BUDGET_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)


class _OffloadCollector:
  """Expert-cache totals of an offloaded model, read when Prometheus scrapes (offloading mode only)."""

  def __init__(self, read_stats: Callable[[], OffloadStats | None]):
    self._read_stats = read_stats

  def collect(self):
    stats = self._read_stats()
    if stats is None:
      return
    counters = (
        ("prism_offload_tokens", "Tokens run in offloading mode", stats.tokens),
        ("prism_offload_hits", "Expert-cache hits (units a MoE layer needed that were resident)", stats.hits),
        ("prism_offload_misses", "Expert-cache misses (units read from the slow tier)", stats.misses),
        ("prism_offload_fetched_bytes", "Bytes read from the slow tier", stats.bytes_fetched),
        ("prism_offload_stall_seconds", "Time steps waited for expert weights", stats.stall_s),
    )
    for name, documentation, value in counters:
      yield CounterMetricFamily(name, documentation, value=value)
    gauges = (
        ("prism_offload_hit_rate", "Expert-cache hits over accesses since start", stats.hit_rate),
        ("prism_offload_sub_experts_per_token", "Sub-experts run per token per MoE layer", stats.sub_experts_per_token),
        ("prism_offload_mass_coverage", "Fraction of the budget's routing mass that ran", stats.mass_coverage),
    )
    for name, documentation, value in gauges:
      yield GaugeMetricFamily(name, documentation, value=value)


class ServeMetrics:
  """Queue length, step budgets and times, TTFT and per-token latency, SLO attainment, outcomes.

  Each instance has its own registry, so several servers in one process (tests) do not clash.
  """

  def __init__(self, registry: CollectorRegistry | None = None):
    self.registry = registry or CollectorRegistry()
    r = self.registry
    self.queue_length = Gauge("prism_queue_length", "Requests waiting for a KV-cache slot", registry=r)
    self.running = Gauge("prism_running_requests", "Requests holding a KV-cache slot", registry=r)

    self.batch_budget = Gauge("prism_batch_budget", "Compiled budget of the last step", registry=r)
    self.step_budget = Histogram("prism_step_budget", "Compiled (static) budget of each step", registry=r,
                                 buckets=_BUDGET_BUCKETS)
    self.row_budget = Histogram("prism_row_budget", "Budget each row ran in each step", registry=r,
                                buckets=_BUDGET_BUCKETS)
    self.step_rows = Histogram("prism_step_rows", "Rows (requests) in each step", registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
    self.step_seconds = Histogram("prism_step_seconds", "Wall time of each model step", ["kind"], registry=r,
                                  buckets=_LATENCY_BUCKETS)
    self.predicted_seconds = Counter("prism_step_predicted_seconds", "Sum of step times the latency table predicted",
                                     ["kind"], registry=r)
    self.step_errors = Counter("prism_step_errors", "Model steps that raised", registry=r)

    self.ttft = Histogram("prism_time_to_first_token_seconds", "Time from arrival to the first token", registry=r,
                          buckets=_LATENCY_BUCKETS)
    self.tpot = Histogram("prism_time_per_output_token_seconds",
                          "Mean time between output tokens after the first, per request", registry=r,
                          buckets=_LATENCY_BUCKETS)

    self.requests = Counter("prism_requests", "Finished requests by finish reason", ["finish_reason"], registry=r)
    self.rejected = Counter("prism_rejected_requests", "Requests rejected before queueing", ["reason"], registry=r)
    self.request_budget = Histogram("prism_request_budget", "Budget requested (after tier resolution)", registry=r,
                                    buckets=_BUDGET_BUCKETS)
    self.prompt_tokens = Counter("prism_prompt_tokens", "Prompt tokens of finished requests", registry=r)
    self.generated_tokens = Counter("prism_generated_tokens", "Tokens generated", registry=r)

    self.slo_requests = Counter("prism_slo_requests", "Finished requests that carried a TTFT deadline", registry=r)
    self.slo_met = Counter("prism_slo_met", "Finished requests whose first token met its TTFT deadline", registry=r)
    self.slo_attainment = Gauge("prism_slo_attainment", "Fraction of requests with a TTFT deadline that met it "
                                "(1 until one finishes)", registry=r)
    self.slo_attainment.set(1.0)

    self._offload: _OffloadCollector | None = None
    self._lock = threading.Lock()
    self._slo_counts = [0, 0]  # met, total

  def on_step(self, record: StepRecord) -> None:
    self.queue_length.set(record.waiting)
    self.running.set(record.running)
    self.batch_budget.set(record.program.budget)
    self.step_budget.observe(record.program.budget)
    self.step_rows.observe(len(record.request_ids))
    for budget in record.budgets:
      self.row_budget.observe(budget)
    self.step_seconds.labels(record.kind).observe(record.measured_s)
    self.predicted_seconds.labels(record.kind).inc(record.predicted_s)
    if record.error is not None:
      self.step_errors.inc()

  def on_finish(self, completion: Completion) -> None:
    self.requests.labels(completion.finish_reason).inc()
    self.request_budget.observe(completion.budget_requested)
    self.prompt_tokens.inc(completion.prompt_tokens)
    self.generated_tokens.inc(completion.completion_tokens)
    if completion.ttft_s is not None:
      self.ttft.observe(completion.ttft_s)
      if completion.completion_tokens > 1:
        self.tpot.observe((completion.latency_s - completion.ttft_s) / (completion.completion_tokens - 1))
    if completion.deadline_met is not None:
      self.slo_requests.inc()
      self.slo_met.inc(int(completion.deadline_met))
      with self._lock:
        self._slo_counts[0] += int(completion.deadline_met)
        self._slo_counts[1] += 1
        self.slo_attainment.set(self._slo_counts[0] / self._slo_counts[1])

  def on_rejected(self, reason: str) -> None:
    self.rejected.labels(reason).inc()

  def set_queue(self, waiting: int, running: int) -> None:
    self.queue_length.set(waiting)
    self.running.set(running)

  def track_offload(self, read_stats: Callable[[], OffloadStats | None]) -> None:
    """Export the expert-cache totals that `read_stats` returns, read again at each scrape."""
    if self._offload is None:
      self._offload = _OffloadCollector(read_stats)
      self.registry.register(self._offload)

  def render(self) -> tuple[bytes, str]:
    """Render the exposition text; returns (body, content type)."""
    return generate_latest(self.registry), CONTENT_TYPE_LATEST
