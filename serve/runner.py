"""Compiled steps over a pool of KV-cache slots: one program per (batch, tokens, budget).

A step takes B rows of T tokens. Each row belongs to a cache slot; its tokens are written at
their positions and attend over the slot. Padding rows use the scratch slot (index
`num_slots`) and padding tokens use position `max_len`, which the cache drops, and
`valid_BT=False` keeps both out of routing. The step samples the next token of every row
from the logits at `last_index_B`, so only [B, V] logits are ever computed.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import time
from pathlib import Path
from typing import Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from prism_jax.model import PrismModel
from serve.config import Program
from serve.sampling import sample_rows

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StepBatch:
  """Host-side inputs of one step; every array has the bucket's shape [B] or [B, T]."""

  budget: int
  slots_B: np.ndarray
  tokens_BT: np.ndarray
  positions_BT: np.ndarray
  valid_BT: np.ndarray
  budget_B: np.ndarray
  last_index_B: np.ndarray
  temperature_B: np.ndarray
  top_p_B: np.ndarray
  seed_lo_B: np.ndarray
  seed_hi_B: np.ndarray
  counter_B: np.ndarray

  @property
  def program(self) -> Program:
    batch, tokens = self.tokens_BT.shape
    return Program(batch, tokens, self.budget)

  @classmethod
  def filler(cls, program: Program, *, vocab_size: int | None = None, seed: int = 0) -> StepBatch:
    """Build a full, greedy batch in slots 0..B-1 at positions 0..T-1 (for warm-up and timing).

    Tokens are 0, or with `vocab_size` drawn from the vocabulary (seeded), so that they route to
    varied experts as real text does. An offloaded model then has cache misses when timed.
    """
    b, t = program.batch, program.tokens
    if vocab_size is None:
      tokens_BT = np.zeros((b, t), np.int32)
    else:
      tokens_BT = np.random.default_rng(seed).integers(0, vocab_size, (b, t)).astype(np.int32)
    return cls(
        budget=program.budget,
        slots_B=np.arange(b, dtype=np.int32),
        tokens_BT=tokens_BT,
        positions_BT=np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
        valid_BT=np.ones((b, t), bool),
        budget_B=np.full(b, program.budget, np.int32),
        last_index_B=np.full(b, t - 1, np.int32),
        temperature_B=np.zeros(b, np.float32),
        top_p_B=np.ones(b, np.float32),
        seed_lo_B=np.zeros(b, np.uint32),
        seed_hi_B=np.zeros(b, np.uint32),
        counter_B=np.zeros(b, np.int32),
    )


class StepRunner(Protocol):
  """Interface the engine drives: compile programs and run one step (see ModelRunner)."""

  full_budget: int
  num_sub_experts: int
  num_slots: int
  max_len: int
  vocab_size: int
  eos_token_ids: tuple[int, ...]

  def compile(self, programs: Sequence[Program], *, workers: int = 1, progress: bool = True) -> None:
    ...

  def run(self, batch: StepBatch) -> np.ndarray:
    """Run one step and return the sampled next token of every row, int [B]."""
    ...

  def cache_intact(self) -> bool:
    """False when a failed step consumed the KV-cache pool (its buffers were donated)."""
    ...

  def reset(self) -> None:
    """Rebuild an empty KV-cache pool; every slot's contents are lost."""
    ...


def enable_compilation_cache(cache_dir: Path) -> None:
  """Turn on JAX's persistent compilation cache in `cache_dir` for every program, however quick.

  The setting is process-wide; the last call wins.
  """
  cache_dir.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(cache_dir))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  logger.info("JAX persistent compilation cache: %s", cache_dir)


class SlotPool:
  """KV-cache pool of a runner: `num_slots` request slots plus one scratch slot.

  Padding rows read and write the scratch slot. Subclasses set `model`, `num_slots`, `max_len`
  and `pool`.
  """

  def _new_pool(self):
    return self.model.init_cache(self.num_slots + 1, self.max_len)

  def cache_intact(self) -> bool:
    return not any(keys.is_deleted() or values.is_deleted() for keys, values in self.pool)

  def reset(self) -> None:
    self.pool = self._new_pool()


class ModelRunner(SlotPool):
  """Steps of a `PrismModel` over `num_slots` cache slots of `max_len` positions each."""

  def __init__(self, model: PrismModel, *, num_slots: int, max_len: int):
    if max_len > model.config.max_position_embeddings:
      raise ValueError(f"max_len {max_len} exceeds the model's context of {model.config.max_position_embeddings} "
                       "positions; lower max_len")
    self.model = model
    self.num_slots = num_slots
    self.max_len = max_len
    self.full_budget = model.full_budget
    self.num_sub_experts = model.num_sub_experts
    self.vocab_size = model.config.vocab_size
    self.eos_token_ids = tuple(model.config.eos_token_ids)
    self.programs: dict[Program, jax.stages.Compiled] = {}
    self._jitted = jax.jit(self._step, static_argnames=("budget",), donate_argnums=(1,))
    self.pool = self._new_pool()
    size = sum(k.nbytes + v.nbytes for k, v in self.pool)
    logger.info("KV-cache pool: %d slots (+1 scratch) x %d positions, %.1f MiB", num_slots, max_len, size / 2**20)

  def _step(self, state, pool, slots_B, tokens_BT, positions_BT, valid_BT, budget_B, last_index_B,
            temperature_B, top_p_B, seed_lo_B, seed_hi_B, counter_B, *, budget):
    decoder = nnx.merge(self.model.graphdef, state)
    cache = tuple((keys[slots_B], values[slots_B]) for keys, values in pool)
    out = decoder(tokens_BT, positions_BT=positions_BT, valid_BT=valid_BT, cache=cache, budget=budget,
                  budget_B=budget_B, hidden_only=True)
    rows_B = jnp.arange(tokens_BT.shape[0])
    hidden_BD = out.logits_BTV[rows_B, last_index_B].astype(jnp.dtype(self.model.config.dtype))
    if self.model.config.tie_word_embeddings:
      logits_BV = decoder.embed.attend(hidden_BD)
    else:
      logits_BV = decoder.lm_head(hidden_BD)
    next_B = sample_rows(logits_BV.astype(jnp.float32), temperature_B, top_p_B, seed_lo_B, seed_hi_B, counter_B)

    # Write back only the positions this step filled; positions >= max_len (padding) are dropped.
    read_BT = jnp.minimum(positions_BT, self.max_len - 1)
    new_pool = []
    for (pool_k, pool_v), (rows_k, rows_v) in zip(pool, out.cache):
      pool_k = pool_k.at[slots_B[:, None], positions_BT].set(rows_k[rows_B[:, None], read_BT], mode="drop")
      pool_v = pool_v.at[slots_B[:, None], positions_BT].set(rows_v[rows_B[:, None], read_BT], mode="drop")
      new_pool.append((pool_k, pool_v))
    return tuple(new_pool), next_B

  def _abstract_args(self, program: Program):
    b, t = program.batch, program.tokens
    shape = lambda dims, dtype: jax.ShapeDtypeStruct(dims, dtype)
    abstract = lambda tree: jax.tree_util.tree_map(lambda x: shape(x.shape, x.dtype), tree)
    return (abstract(self.model.state), abstract(self.pool), shape((b,), jnp.int32), shape((b, t), jnp.int32),
            shape((b, t), jnp.int32), shape((b, t), jnp.bool_), shape((b,), jnp.int32), shape((b,), jnp.int32),
            shape((b,), jnp.float32), shape((b,), jnp.float32), shape((b,), jnp.uint32), shape((b,), jnp.uint32),
            shape((b,), jnp.int32))

  def _compile_one(self, program: Program) -> jax.stages.Compiled:
    if program.batch > self.num_slots:
      raise ValueError(f"batch bucket {program.batch} exceeds the {self.num_slots} cache slots")
    self.model.check_budget(program.budget)
    return self._jitted.lower(*self._abstract_args(program), budget=program.budget).compile()

  def compile(self, programs: Sequence[Program], *, workers: int = 1, progress: bool = True) -> None:
    """Compile every program ahead of time (in `workers` threads), showing a progress bar."""
    todo = [p for p in dict.fromkeys(programs) if p not in self.programs]
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
      futures = {pool.submit(self._compile_one, p): p for p in todo}
      with tqdm(total=len(todo), desc="compiling steps", unit="program", disable=not progress) as bar:
        for future in concurrent.futures.as_completed(futures):
          self.programs[futures[future]] = future.result()
          bar.update(1)
    logger.info("compiled %d programs in %.1f s", len(todo), time.perf_counter() - start)

  def run(self, batch: StepBatch) -> np.ndarray:
    program = self.programs.get(batch.program)
    if program is None:
      raise KeyError(f"no compiled program for {batch.program}; compiled: {sorted(self.programs)}")
    self.pool, next_B = program(
        self.model.state, self.pool, batch.slots_B, batch.tokens_BT, batch.positions_BT, batch.valid_BT,
        batch.budget_B, batch.last_index_B, batch.temperature_B, batch.top_p_B, batch.seed_lo_B, batch.seed_hi_B,
        batch.counter_B)
    return np.asarray(next_B)
