"""`Engine`: the serve loop. Continuous batching of prefill and decode over a pool of cache slots.

Threads: `submit` and `cancel` may be called from any thread; they only touch an inbox under
a lock. Everything else (scheduling, steps, events) happens on the engine thread started by
`start()`, or on the caller's thread when a test drives `step()` by hand.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time
from typing import Callable, Sequence as Seq

import numpy as np

from serve.admission import Admission
from serve.config import EngineConfig
from serve.latency import LatencyTable, measure_latency
from serve.observer import EngineObserver, EngineStats
from serve.request import (Completion, EngineStopped, InvalidRequest, Listener, QoS, QueueFull, RequestHandle,
                           SamplingParams)
from serve.runner import ModelRunner, StepBatch, StepRunner, enable_compilation_cache
from serve.offload import OffloadConfig, OffloadedModel, OffloadRunner, OffloadStats, offload_model
from serve.scheduler import QueueView, StepPlan, make_scheduler
from serve.sequence import Phase, Sequence
from serve.step import StepRecord, build_step_batch, finish_completion, process_token
from serve.text import IncrementalDecoder, StopMatcher

logger = logging.getLogger(__name__)


def runner_for(model, *, num_slots: int, max_len: int) -> ModelRunner | OffloadRunner:
  """Build the step runner of a `PrismModel` (compiled programs) or an `OffloadedModel`."""
  if isinstance(model, OffloadedModel):
    return OffloadRunner(model, num_slots=num_slots, max_len=max_len)
  return ModelRunner(model, num_slots=num_slots, max_len=max_len)


class Engine:
  """Serve requests on a `StepRunner` (a compiled model, or a stub in tests).

  Typical use: `engine = Engine.from_model(model, EngineConfig(...)).start()`, then
  `handle = engine.submit(prompt_ids, SamplingParams(max_tokens=32), QoS(budget=6))` and
  `handle.result()` or `for event in handle: ...`; `engine.stop()` drains and joins.
  """

  def __init__(self, runner: StepRunner, config: EngineConfig = EngineConfig(), *, tokenizer=None,
               latency: LatencyTable | None = None, clock: Callable[[], float] = time.monotonic,
               observer: EngineObserver | None = None, progress: bool = True, bos_token_id: int | None = None):
    if runner.num_slots < config.max_batch:
      raise ValueError(f"the runner has {runner.num_slots} cache slots but the largest batch bucket is "
                       f"{config.max_batch}; build the runner with num_slots={config.max_batch}")
    self.runner, self.config, self.tokenizer = runner, config, tokenizer
    self.bos_token_id = bos_token_id  # prepended to text prompts by the HTTP server, as `generate` does
    self.clock, self.observer, self.progress = clock, observer, progress
    self.full_budget, self.num_sub_experts = runner.full_budget, runner.num_sub_experts
    self.max_len = runner.max_len
    self.tiers = config.resolve_tiers(self.full_budget)
    self.compiled_budgets = config.resolve_budgets(self.full_budget, self.num_sub_experts)
    self.programs = config.programs(self.full_budget, self.num_sub_experts)
    self.latency = latency
    self.scheduler = None
    admission = Admission(self.full_budget, self.num_sub_experts, self.tiers, self.max_len, runner.vocab_size,
                          tokenizer is not None, config.whole_experts, self.full_budget)
    try:
      default_budget = admission.check_budget(config.default_budget or self.full_budget, "default_budget")
    except InvalidRequest as error:
      raise ValueError(f"invalid EngineConfig: {error}") from None
    self.admission = dataclasses.replace(admission, default_budget=default_budget)

    self._lock = threading.Lock()
    self._wakeup = threading.Condition(self._lock)
    self._inbox: collections.deque[Sequence] = collections.deque()
    self._cancelled: set[str] = set()
    self._queued = 0  # requests submitted and not yet admitted to a slot (inbox + waiting)
    self._accepting = True
    self._stopping = False
    self._drain = True
    self._thread: threading.Thread | None = None
    self._ids = itertools.count()
    self._seeds = np.random.default_rng(config.seed)

    self._waiting: list[Sequence] = []
    self._slots: list[Sequence | None] = [None] * config.max_batch
    self._steps = 0

  @classmethod
  def from_model(cls, model, config: EngineConfig = EngineConfig(), *, expert_memory=None, **kwargs) -> Engine:
    """Build an engine over a `PrismModel` or an `OffloadedModel`; uses its tokenizer unless `tokenizer=` is given.

    `expert_memory` ('25%', 0.25, '512MB' or bytes) serves a `PrismModel` in offloading mode
    with that much fast memory for expert weights. The PrismModel keeps its own copy of the
    experts, so to save device memory load with `serve.offload.load_offloaded` instead.
    """
    max_len = config.max_len or model.config.max_position_embeddings
    if expert_memory is not None and not isinstance(model, OffloadedModel):
      model = offload_model(model, OffloadConfig(expert_memory=expert_memory, max_batch=config.max_batch))
    runner = runner_for(model, num_slots=config.max_batch, max_len=max_len)
    kwargs.setdefault("tokenizer", model.tokenizer)
    kwargs.setdefault("bos_token_id", model.config.bos_token_id)
    return cls(runner, config, **kwargs)

  # ---- start-up and shutdown -------------------------------------------------------------

  def compile(self) -> Engine:
    """Compile every (bucket, budget) program, then time them unless a latency table was given."""
    if self.scheduler is not None:
      return self
    cache_dir = self.config.cache_dir()
    if cache_dir is not None and isinstance(self.runner, (ModelRunner, OffloadRunner)):
      enable_compilation_cache(cache_dir)
    self.runner.compile(self.programs, workers=self.config.compile_workers, progress=self.progress)
    if self.latency is not None:
      missing = self.latency.missing(self.programs)
      if missing:
        logger.warning("latency table lacks %d of %d programs (e.g. %s); interpolating those", len(missing),
                       len(self.programs), missing[0])
      if isinstance(self.runner, ModelRunner):
        # Timing would have run each program once; without it, warm them here so that the first
        # requests do not pay the first-call cost.
        for program in self.programs:
          self.runner.run(StepBatch.filler(program))
    elif self.config.profile_repeats > 0:
      self.latency = measure_latency(self.runner, self.programs, repeats=self.config.profile_repeats,
                                     progress=self.progress)
    else:
      self.latency = LatencyTable({})
    if isinstance(self.runner, OffloadRunner):
      # The start-up runs served no request, so the offload totals start from zero here.
      self.runner.model.reset_stats()
    self.scheduler = make_scheduler(self.config, self.compiled_budgets, self.latency)
    return self

  def start(self) -> Engine:
    """Compile if needed and start the engine thread."""
    self.compile()
    if self._thread is None:
      self._thread = threading.Thread(target=self._loop, name="prism-engine", daemon=True)
      self._thread.start()
      logger.info("engine started: policy %s, %d slots, budgets %s, tiers %s", self.config.policy,
                  self.config.max_batch, list(self.compiled_budgets), self.tiers)
    return self

  def stop_accepting(self) -> None:
    """Reject new requests from now on (EngineStopped) while accepted ones keep running."""
    with self._lock:
      self._accepting = False

  def stop(self, *, drain: bool = True, timeout: float | None = None) -> None:
    """Stop accepting requests; with `drain`, finish every accepted one first.

    Requests still unfinished when the engine stops (drain=False, or `timeout` seconds
    passed) end with finish_reason 'cancelled'.
    """
    with self._lock:
      self._accepting = False
      self._stopping = True
      self._drain = drain
      self._wakeup.notify_all()
    if self._thread is not None:
      self._thread.join(timeout)
      if self._thread.is_alive():
        logger.warning("drain did not finish within %s s; cancelling the remaining requests", timeout)
        with self._lock:
          self._drain = False
          self._wakeup.notify_all()
        self._thread.join()
    elif drain and self._has_work():
      self.run_until_idle()
    self._abort_all("the engine stopped before the request finished")
    logger.info("engine stopped after %d steps", self._steps)

  @property
  def accepting(self) -> bool:
    return self._accepting

  def stats(self) -> EngineStats:
    return EngineStats(waiting=self._queued, running=sum(s is not None for s in self._slots), steps=self._steps,
                       programs=len(self.programs), accepting=self._accepting)

  def offload_stats(self) -> OffloadStats | None:
    """Return the expert cache totals since the engine compiled, or None outside offloading mode."""
    if isinstance(self.runner, OffloadRunner):
      return self.runner.model.stats()
    return None

  # ---- requests ------------------------------------------------------------------------------

  def resolve_budget(self, qos: QoS) -> int:
    """Resolve the budget a request runs (see `Admission.resolve_budget`)."""
    return self.admission.resolve_budget(qos)

  def check_request(self, prompt_ids: Seq[int], sampling: SamplingParams) -> None:
    """Raise InvalidRequest naming the field when the prompt or max_tokens cannot be served."""
    self.admission.check_request(prompt_ids, sampling)

  def submit(self, prompt_ids: Seq[int], sampling: SamplingParams = SamplingParams(), qos: QoS = QoS(), *,
             request_id: str | None = None, listener: Listener | None = None,
             arrival: float | None = None) -> RequestHandle:
    """Queue a request; raises InvalidRequest, QueueFull or EngineStopped instead of queueing it.

    `arrival` is the engine-clock time the request arrived (default: now); TTFT and the deadline
    count from it. Replays in virtual time pass the scheduled arrival.
    """
    prompt_ids = tuple(int(t) for t in prompt_ids)
    self.check_request(prompt_ids, sampling)
    budget = self.resolve_budget(qos)
    with self._lock:
      if not self._accepting:
        raise EngineStopped("the engine is shutting down and accepts no new requests")
      if self._queued >= self.config.max_queue:
        raise QueueFull(f"the queue is full with {self._queued} waiting requests (max_queue={self.config.max_queue}); "
                        "retry later")
      request_id = request_id or f"req-{next(self._ids)}"
      seed = sampling.seed if sampling.seed is not None else int(self._seeds.integers(0, 2**63))
      arrival = self.clock() if arrival is None else arrival
      deadline = None if qos.ttft_deadline_s is None else arrival + qos.ttft_deadline_s
      handle = RequestHandle(request_id, self.cancel, listener)
      sequence = Sequence(request_id, prompt_ids, sampling, budget, arrival, deadline, seed, handle)
      if self.tokenizer is not None:
        sequence.decoder = IncrementalDecoder(self.tokenizer)
        sequence.stop = StopMatcher(sampling.stop)
      self._inbox.append(sequence)
      self._queued += 1
      self._wakeup.notify_all()
    logger.info("request %s queued: %d prompt tokens, max_tokens %d, budget %d, deadline %s", request_id,
                len(prompt_ids), sampling.max_tokens, budget,
                "none" if qos.ttft_deadline_s is None else f"{qos.ttft_deadline_s * 1e3:.0f} ms")
    return handle

  def cancel(self, request_id: str) -> None:
    with self._lock:
      self._cancelled.add(request_id)
      self._wakeup.notify_all()

  # ---- the loop ------------------------------------------------------------------------------

  def _has_work(self) -> bool:
    return bool(self._inbox or self._waiting or self._cancelled or any(s is not None for s in self._slots))

  def _loop(self) -> None:
    while True:
      with self._lock:
        while not self._has_work() and not self._stopping:
          self._wakeup.wait()
        if self._stopping and not (self._drain and self._has_work()):
          return
      try:
        record = self.step()
      except Exception:  # pylint: disable=broad-except
        # A bug in the loop itself: fail what is in flight and keep serving new requests.
        logger.exception("engine step failed outside the model call; failing the in-flight requests")
        self._abort_all("internal error in the engine loop")
        continue
      if record is None:
        with self._lock:
          self._wakeup.wait(0.01)

  def run_until_idle(self, max_steps: int | None = None) -> int:
    """Run steps on this thread until no request is left; returns the number of steps (tests, benchmarks)."""
    if self.scheduler is None:
      self.compile()
    steps = 0
    while max_steps is None or steps < max_steps:
      with self._lock:
        if not self._has_work():
          break
      if self.step() is None:
        break
      steps += 1
    return steps

  def _take_inbox(self) -> set[str]:
    with self._lock:
      self._waiting.extend(self._inbox)
      self._inbox.clear()
      cancelled, self._cancelled = self._cancelled, set()
    return cancelled

  def step(self) -> StepRecord | None:
    """Run one scheduling decision and, if there is work, one model step."""
    if self.scheduler is None:
      self.compile()
    for request_id in self._take_inbox():
      self._cancel_now(request_id)
    running = [s for s in self._slots if s is not None]
    view = QueueView(now=self.clock(), waiting=tuple(self._waiting),
                     prefilling=tuple(s for s in running if s.phase is Phase.PREFILL),
                     decoding=tuple(s for s in running if s.phase is Phase.DECODE),
                     free_slots=self._slots.count(None))
    plan = self.scheduler.plan(view)
    if plan is None:
      return None
    self._admit(plan)
    return self._run(plan)

  def _admit(self, plan: StepPlan) -> None:
    for row in plan.rows:
      sequence = row.sequence
      if sequence.phase is Phase.WAITING:
        sequence.slot = self._slots.index(None)
        self._slots[sequence.slot] = sequence
        self._waiting.remove(sequence)
        with self._lock:
          self._queued -= 1
        logger.info("request %s started in slot %d after %.1f ms in the queue", sequence.request_id, sequence.slot,
                    (self.clock() - sequence.arrival) * 1e3)

  def _run(self, plan: StepPlan) -> StepRecord:
    batch = build_step_batch(plan, scratch_slot=self.runner.num_slots, max_len=self.max_len)
    started = self.clock()
    wall = time.perf_counter()
    error = None
    try:
      next_B = self.runner.run(batch)
    except Exception as exc:  # pylint: disable=broad-except
      error = f"{type(exc).__name__}: {exc}"
      logger.exception("step %s failed for requests %s", plan.program, [r.sequence.request_id for r in plan.rows])
    measured = time.perf_counter() - wall
    now = self.clock()
    self._steps += 1
    if error is not None:
      for row in plan.rows:
        self._finish(row.sequence, "error", f"model step failed: {error}")
      if not self.runner.cache_intact():
        logger.error("the failed step consumed the KV cache; failing every running request and rebuilding it")
        self._abort_all("the KV cache was lost after a failed step", reason="error")
        self.runner.reset()
    else:
      for i, row in enumerate(plan.rows):
        sequence = row.sequence
        sequence.cached += row.num_tokens
        sequence.last_run_at = now
        sequence.budgets_run.append(row.budget)
        if sequence.cached < len(sequence.tokens):
          continue  # a prefill chunk with prompt left: its sample is not a token of the answer
        try:
          finish = process_token(sequence, int(next_B[i]), row.budget, now, self.runner.eos_token_ids,
                                 self.runner.vocab_size)
        except Exception as exc:  # pylint: disable=broad-except
          logger.exception("request %s failed while handling its token", sequence.request_id)
          self._finish(sequence, "error", f"{type(exc).__name__}: {exc}")
          continue
        if finish is not None:
          self._finish(sequence, finish)
    record = StepRecord(plan.kind, plan.program, tuple(r.sequence.request_id for r in plan.rows),
                        tuple(r.budget for r in plan.rows), plan.predicted_s, measured, started, now - started,
                        error, self._queued, sum(s is not None for s in self._slots))
    if self.observer is not None:
      self.observer.on_step(record)
    return record

  # ---- endings ---------------------------------------------------------------------------------

  def _cancel_now(self, request_id: str) -> None:
    for sequence in [*self._waiting, *(s for s in self._slots if s is not None)]:
      if sequence.request_id == request_id:
        self._finish(sequence, "cancelled")
        return

  def _abort_all(self, message: str, reason: str = "cancelled") -> None:
    self._take_inbox()
    for sequence in [*self._waiting, *(s for s in self._slots if s is not None)]:
      self._finish(sequence, reason, message)

  def _finish(self, sequence: Sequence, reason: str, error: str | None = None) -> None:
    if sequence.handle.done:
      return
    if sequence.slot is not None and self._slots[sequence.slot] is sequence:
      self._slots[sequence.slot] = None
    elif sequence in self._waiting:
      self._waiting.remove(sequence)
      with self._lock:
        self._queued -= 1
    completion = finish_completion(sequence, reason, error, self.clock())
    log = logger.warning if reason == "error" else logger.info
    log("request %s finished: %s%s, %d tokens, ttft %s, budget %d (ran %d)", sequence.request_id, reason,
        f" ({error})" if error else "", completion.completion_tokens,
        "-" if completion.ttft_s is None else f"{completion.ttft_s * 1e3:.1f} ms", completion.budget_requested,
        completion.budget_run)
    try:
      sequence.handle._emit(completion)  # pylint: disable=protected-access
    except Exception:  # pylint: disable=broad-except
      logger.exception("listener of request %s failed on its completion", sequence.request_id)
    if self.observer is not None:
      self.observer.on_finish(completion)

