"""`OffloadRunner`: the engine's `StepRunner` over an `OffloadedModel`.

It keeps the KV-cache pool layout of `serve.runner.ModelRunner` (num_slots + 1 scratch slot)
and its sampling. The model runs through the offload forward loop instead of one compiled
program, so "compiling" a program means running it once to compile its per-layer pieces.
The pool is written only after a step succeeds, so a step that fails (for example on a
slow-tier read) leaves every slot's cache as it was.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from serve.config import Program
from serve.offload.model import OffloadedModel
from serve.runner import SlotPool, StepBatch
from serve.sampling import sample_rows

logger = logging.getLogger(__name__)


@jax.jit
def _gather_slots(pool, slots_B):
  return tuple((keys[slots_B], values[slots_B]) for keys, values in pool)


@functools.partial(jax.jit, static_argnames=("max_len",), donate_argnums=(0,))
def _write_back(pool, rows, slots_B, positions_BT, *, max_len: int):
  # Only positions this step filled; positions >= max_len (padding) are dropped.
  rows_B = jnp.arange(slots_B.shape[0])
  read_BT = jnp.minimum(positions_BT, max_len - 1)
  new_pool = []
  for (pool_k, pool_v), (rows_k, rows_v) in zip(pool, rows):
    pool_k = pool_k.at[slots_B[:, None], positions_BT].set(rows_k[rows_B[:, None], read_BT], mode="drop")
    pool_v = pool_v.at[slots_B[:, None], positions_BT].set(rows_v[rows_B[:, None], read_BT], mode="drop")
    new_pool.append((pool_k, pool_v))
  return tuple(new_pool)


@jax.jit
def _last_hidden(hidden_BTD, last_index_B):
  return hidden_BTD[jnp.arange(hidden_BTD.shape[0]), last_index_B]


_sample = jax.jit(sample_rows)


class OffloadRunner(SlotPool):
  """Steps of an `OffloadedModel` over `num_slots` KV-cache slots of `max_len` positions each."""

  def __init__(self, model: OffloadedModel, *, num_slots: int, max_len: int):
    if max_len > model.config.max_position_embeddings:
      raise ValueError(f"max_len {max_len} exceeds the model's context of {model.config.max_position_embeddings} "
                       "positions; lower max_len")
    if num_slots > model.offload.max_batch:
      logger.warning("the engine runs up to %d rows per step but the expert memory was sized for max_batch=%d; "
                     "large decode steps may run in several passes", num_slots, model.offload.max_batch)
    self.model = model
    self.num_slots, self.max_len = num_slots, max_len
    self.full_budget, self.num_sub_experts = model.full_budget, model.num_sub_experts
    self.vocab_size = model.config.vocab_size
    self.eos_token_ids = tuple(model.config.eos_token_ids)
    self.compiled: set[Program] = set()
    self.pool = self._new_pool()

  def compile(self, programs: Sequence[Program], *, workers: int = 1, progress: bool = True) -> None:
    """Run each program once on a filler batch (compiling its per-layer steps), then reset the stats.

    `workers` is accepted for the StepRunner interface; the runs are sequential.
    """
    del workers
    todo = [p for p in dict.fromkeys(programs) if p not in self.compiled]
    start = time.perf_counter()
    for program in tqdm(todo, desc="compiling offload steps", unit="program", disable=not progress):
      if program.batch > self.num_slots:
        raise ValueError(f"batch bucket {program.batch} exceeds the {self.num_slots} cache slots")
      self.model.check_budget(program.budget)
      self._step(StepBatch.filler(program))
      self.compiled.add(program)
    self.model.reset_stats()
    logger.info("compiled %d offload programs in %.1f s", len(todo), time.perf_counter() - start)

  def run(self, batch: StepBatch) -> np.ndarray:
    if batch.program not in self.compiled:
      raise KeyError(f"no compiled program for {batch.program}; compiled: {sorted(self.compiled)}")
    return self._step(batch)

  def _step(self, batch: StepBatch) -> np.ndarray:
    slots_B = jnp.asarray(batch.slots_B)
    positions_BT = jnp.asarray(batch.positions_BT)
    out = self.model.forward(batch.tokens_BT, budget=batch.budget, budget_B=batch.budget_B,
                             positions_BT=positions_BT, valid_BT=batch.valid_BT,
                             cache=_gather_slots(self.pool, slots_B), hidden_only=True)
    logits_BV = self.model.logits(_last_hidden(out.logits_BTV, jnp.asarray(batch.last_index_B)))
    next_B = _sample(logits_BV, batch.temperature_B, batch.top_p_B, batch.seed_lo_B, batch.seed_hi_B,
                     batch.counter_B)
    self.pool = _write_back(self.pool, out.cache, slots_B, positions_BT, max_len=self.max_len)
    return np.asarray(next_B)
