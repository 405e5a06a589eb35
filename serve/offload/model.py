"""`OffloadedModel`: a partitioned model whose expert weights sit in a slow tier behind a cache.

The forward pass is a per-layer Python loop, as in real offloading systems. Attention runs
jitted per layer, and the router's candidates come back to the host. The selection decides
what runs, and the cache makes those units resident: misses come from the slow tier, or from
what the prefetcher staged while the previous layer computed. Then the expert FFN runs from
the cache's pool rows. It offers `forward`, `init_cache`, `config`, `full_budget`,
`num_sub_experts`, `tokenizer` and `check_budget` like `PrismModel`, so `generate_tokens`
runs on it unchanged, and `serve.offload.OffloadRunner` serves it in the engine.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prism_jax.budget import check_budget
from prism_jax.config import ModelConfig, SubExpertConfig
from prism_jax.decoder import ForwardOutput, KVCache
from prism_jax.moe import Dispatch, MoEInfo
from serve.offload import layers as steps
from serve.offload.cache import SlotCache
from serve.offload.config import OffloadConfig
from serve.offload.memory import plan_memory
from serve.offload.prefetch import Prefetcher
from serve.offload.recorder import StepRecorder
from serve.offload.routing import route_layer
from serve.offload.selection import choose
from serve.offload.stats import OffloadStats, StepStats
from serve.offload.tier import UnitData
from serve.offload.store import build_tier

logger = logging.getLogger(__name__)


class OffloadedModel:
  """Run a sub-expert model with only `offload.expert_memory` of its expert weights resident.

  `params` is the sub-expert layout (after `apply_partition`); its expert arrays are written
  to the slow tier and not kept. Build it with `from_model` or `load_offloaded`. Calls are
  serialized by a lock; `stats()` and `last_step` report what offloading did.
  """

  def __init__(self, config: ModelConfig, params: dict, sub: SubExpertConfig, offload: OffloadConfig, *,
               digest: str, dispatch: Dispatch = Dispatch(), tokenizer: Any = None, fingerprint: str | None = None,
               path: Path | None = None, progress: bool = False):
    if not config.moe_layer_indices:
      raise ValueError(f"{config.family} model has no MoE layers, so there is nothing to offload")
    self.config, self.sub, self.offload, self.dispatch = config, sub, offload, dispatch
    self.tokenizer, self.fingerprint, self.path = tokenizer, fingerprint, path
    moe = config.moe_layer_indices
    width = config.moe_intermediate_size // sub.num_sub_experts
    self.plan = plan_memory(
        offload.expert_memory, granularity=offload.granularity, num_moe_layers=len(moe),
        num_experts=config.num_experts, num_sub_experts=sub.num_sub_experts, top_k=config.num_experts_per_tok,
        hidden_size=config.hidden_size, width=width, itemsize=jnp.dtype(config.dtype).itemsize,
        max_batch=offload.max_batch)
    source = lambda layer: tuple(np.asarray(params["layers"][layer]["mlp"][k]) for k in steps.EXPERT_KEYS)
    self.tier, temp_dir = build_tier(offload, config, sub, moe, source, self.plan.unit_groups, digest,
                                     progress=progress)
    # Deletes a temporary offload directory on close(), or when the model is garbage collected.
    self._cleanup = weakref.finalize(self, shutil.rmtree, temp_dir, True) if temp_dir is not None else None
    layers = {i: {**block, "mlp": {k: v for k, v in block["mlp"].items() if k not in steps.EXPERT_KEYS}}
              if i in moe else block for i, block in params["layers"].items()}
    self.parts = steps.resident_parts(config, sub, {**params, "layers": layers})
    self.cache = SlotCache(self.plan, moe, hidden_size=config.hidden_size, width=width, dtype=jnp.dtype(config.dtype),
                           policy=offload.policy)
    self.prefetcher = Prefetcher(self.tier, self.plan.unit_bytes) if offload.prefetch else None
    self._next_moe = dict(zip(moe, moe[1:]))
    self._lock = threading.Lock()
    self._stats = OffloadStats()
    self.last_step: StepStats | None = None

  # ---- the PrismModel surface ------------------------------------------------------------------

  @property
  def full_budget(self) -> int:
    return self.sub.num_sub_experts * self.config.num_experts_per_tok

  @property
  def num_sub_experts(self) -> int:
    return self.sub.num_sub_experts

  def check_budget(self, budget: int | None) -> int | None:
    if budget is None:
      return None
    return check_budget(budget, self.sub.num_sub_experts, self.config.num_experts_per_tok)

  def init_cache(self, batch: int, max_len: int) -> KVCache:
    c = self.config
    shape = (batch, max_len, c.num_kv_heads, c.head_dim)
    dtype = jnp.dtype(c.dtype)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(c.num_layers))

  def __call__(self, tokens_BT, budget: int | None = None, **kwargs) -> jax.Array:
    return self.forward(tokens_BT, budget=budget, **kwargs).logits_BTV

  def forward(self, tokens_BT, *, budget: int | None = None, budget_B=None, positions_BT=None, valid_BT=None,
              cache: KVCache | None = None, hidden_only: bool = False) -> ForwardOutput:
    """Run the model with the contract of `PrismModel.forward`.

    Raises SlowTierError when expert data cannot be read; the model stays usable.
    """
    budget = self.full_budget if budget is None else self.check_budget(budget)
    tokens_BT = np.asarray(tokens_BT, np.int32)
    if tokens_BT.ndim != 2:
      raise ValueError(f"tokens must be int32 [B, T], got shape {tokens_BT.shape}")
    b, t = tokens_BT.shape
    if budget_B is None:
      budget_B = np.full(b, budget, np.int32)
    budget_B = np.asarray(budget_B)
    if budget_B.shape != (b,) or budget_B.min() < 1 or budget_B.max() > budget:
      raise ValueError(f"budget_B must hold one budget in 1..{budget} per row ({b} rows), got {budget_B.tolist()}")
    if positions_BT is None:
      positions_BT = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    valid_BT = np.ones((b, t), bool) if valid_BT is None else np.asarray(valid_BT, bool)
    if cache is not None and len(cache) != self.config.num_layers:
      raise ValueError(f"cache has {len(cache)} layers, the model {self.config.num_layers}; use init_cache")
    with self._lock:
      recorder = StepRecorder(tokens=int(valid_BT.sum()))
      start = time.perf_counter()
      try:
        return self._run(tokens_BT, jnp.asarray(positions_BT, jnp.int32), valid_BT, budget_B.astype(np.int32),
                         budget, cache, hidden_only, recorder)
      except Exception as error:
        recorder.error = f"{type(error).__name__}: {error}"
        if self.prefetcher is not None:
          recorder.prefetch_wasted_bytes += self.prefetcher.discard()
        raise
      finally:
        self.last_step = recorder.finish(time.perf_counter() - start)
        self._stats = self._stats.add(self.last_step)

  def logits(self, hidden_BD: jax.Array) -> jax.Array:
    """Logits [B, V] of hidden states returned by `forward(..., hidden_only=True)`."""
    p = self.parts
    return steps.logits_step(p.final_norm, p.embed, p.lm_head, hidden_BD, tied=p.tied)

  # ---- reporting and control -------------------------------------------------------------------

  def stats(self) -> OffloadStats:
    return self._stats

  def reset_stats(self) -> None:
    self._stats = OffloadStats()
    self.last_step = None

  def clear_cache(self) -> None:
    """Empty the expert cache, so the next steps start cold."""
    with self._lock:
      self.cache.clear()

  def resident_bytes(self) -> int:
    """Bytes of the always-resident (non-expert) weights."""
    p = self.parts
    pieces = [p.embed, p.final_norm, p.lm_head]
    for layer in p.layers:
      pieces += [layer.attention, layer.router, layer.shared, layer.shared_gate, layer.dense]
    return int(sum(leaf.nbytes for leaf in jax.tree.leaves(pieces)))

  def close(self) -> None:
    """Stop the prefetcher, release the slow tier and delete a temporary offload directory."""
    if self.prefetcher is not None:
      self.prefetcher.close()
    self.tier.close()
    if self._cleanup is not None:
      self._cleanup()

  # ---- the forward loop ------------------------------------------------------------------------

  def _run(self, tokens_BT, positions_BT, valid_BT, budget_B, budget, cache, hidden_only, recorder):
    p = self.parts
    x, cos, sin = steps.embed_step(p.embed, tokens_BT, positions_BT, rope=p.rope, head_dim=p.head_dim)
    valid_j, budget_j = jnp.asarray(valid_BT), jnp.asarray(budget_B)
    new_cache, infos = [], []
    for layer in p.layers:
      kv = None if cache is None else cache[layer.index]
      x, h, kv = steps.attention_step(layer.attention, x, positions_BT, cos, sin, kv)
      new_cache.append(kv)
      if layer.is_moe:
        x, info = self._moe_layer(layer, x, h, valid_j, budget_j, budget, recorder)
        infos.append(info)
      else:
        x = steps.dense_step(layer.dense, x, h)
    logits = steps.head_step(p.final_norm, p.embed, p.lm_head, x, tied=p.tied, hidden_only=hidden_only)
    return ForwardOutput(logits_BTV=logits, cache=None if cache is None else tuple(new_cache), moe=tuple(infos))

  def _moe_layer(self, layer, x, h, valid_j, budget_j, budget, recorder: StepRecorder):
    spec, index = self.parts.routing, layer.index
    found = route_layer(spec, layer.router, h, valid_j, budget_j, budget=budget)
    following = self._next_moe.get(index)
    predicted = None
    if self.prefetcher is not None and following is not None:
      nxt = self.parts.layers[following]
      predicted = steps.predict_step(spec, nxt.attention[2], nxt.router, x, valid_j, budget_j, budget=budget)
    group_SA, mass_SA, valid_SA = (np.asarray(a) for a in (found.group_SA, found.mass_SA, found.valid_SA))
    if predicted is not None:
      self._start_prefetch(following, *(np.asarray(a) for a in predicted))

    unit_SA = group_SA // self.plan.unit_groups
    run_SA = choose(self.offload.selection, unit_SA, mass_SA, valid_SA, self.cache.resident_mask(index, unit_SA))
    recorder.count_candidates(valid_SA, run_SA, mass_SA)
    token_A = np.repeat(np.arange(group_SA.shape[0], dtype=np.int32), group_SA.shape[1])
    y_SD = None
    waves = self._waves(index, np.unique(unit_SA[run_SA]))
    recorder.waves += max(len(waves) - 1, 0)
    for wave in waves:
      started = time.perf_counter()
      hits, misses = self.cache.ensure(index, wave, lambda i, units: self._read(i, units, recorder))
      recorder.stall_s += time.perf_counter() - started
      recorder.hits += len(hits)
      recorder.misses += len(misses)
      in_wave_SA = run_SA & np.isin(unit_SA, wave)
      rows_SA = np.zeros(group_SA.shape, np.int32)
      rows_SA[in_wave_SA] = self.cache.group_rows(index, group_SA[in_wave_SA])
      part_SD = steps.expert_step(self.cache.gate_RDW, self.cache.up_RDW, self.cache.down_RWD, h, token_A,
                                  rows_SA.reshape(-1), found.weight_SA, in_wave_SA.reshape(-1),
                                  backend=self.dispatch.backend, tile_rows=self.dispatch.tile_rows)
      y_SD = part_SD if y_SD is None else y_SD + part_SD
    if y_SD is None:  # no token ran a sub-expert (every token is padding)
      y_SD = jnp.zeros((group_SA.shape[0], self.config.hidden_size), jnp.float32)
    if self.prefetcher is not None:
      recorder.prefetch_wasted_bytes += self.prefetcher.take(index, np.zeros(0, np.int64)).wasted_bytes
    x = steps.moe_residual_step(layer.shared, layer.shared_gate, x, h, y_SD)
    info = MoEInfo(router_probs_SE=found.probs_SE, top_experts_SK=found.experts_SK,
                   active_S=jnp.asarray(run_SA.sum(axis=1), jnp.int32))
    return x, info

  def _waves(self, layer: int, units: np.ndarray) -> list[np.ndarray]:
    """Units in passes of at most the cache capacity, resident ones first (one pass when they fit)."""
    capacity = self.cache.capacity
    if len(units) <= capacity:
      return [units] if len(units) else []
    resident = self.cache.resident_mask(layer, units)
    ordered = np.concatenate([units[resident], units[~resident]])
    return [ordered[i:i + capacity] for i in range(0, len(ordered), capacity)]

  def _read(self, layer: int, units: np.ndarray, recorder: StepRecorder) -> list[UnitData]:
    """Misses from the prefetcher's staged reads where present, the rest read now."""
    parts, remaining = [], units
    if self.prefetcher is not None:
      staged = self.prefetcher.take(layer, units)
      parts, remaining = staged.parts, staged.remaining
      recorder.prefetched += len(units) - len(remaining)
      recorder.prefetch_wasted_bytes += staged.wasted_bytes
    if len(remaining):
      parts.append(self.tier.read(layer, remaining))
    recorder.bytes_fetched += sum(part.nbytes for part in parts)
    return parts

  def _start_prefetch(self, layer: int, group_SA: np.ndarray, mass_SA: np.ndarray, valid_SA: np.ndarray) -> None:
    """Stage the predicted units of `layer` that are not resident now, heaviest first."""
    unit_SA = group_SA // self.plan.unit_groups
    units, inverse = np.unique(unit_SA[valid_SA], return_inverse=True)
    if not len(units):
      return
    weight = np.bincount(inverse, weights=mass_SA[valid_SA], minlength=len(units))
    missing = ~self.cache.resident_mask(layer, units)
    units, weight = units[missing], weight[missing]
    chosen = units[np.argsort(-weight, kind="stable")][:self.offload.prefetch_limit]
    self.prefetcher.start(layer, np.sort(chosen))
