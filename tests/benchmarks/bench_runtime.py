"""Runtime benchmark: grouped-matmul efficiency, cost versus budget, decode bandwidth.

Run from the repository root: python -m tests.benchmarks.bench_runtime [--quick]
Every figure is a ratio of two timings taken side by side in this one run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prism_jax.config import ModelConfig
from prism_jax.grouped_matmul import grouped_matmul
from prism_jax.model import PrismModel
from prism_jax.native import native_available
from prism_jax.subexperts import identity_partition
from prism_jax.testing import random_params
from tests.benchmarks.timing import interleaved_medians, median_seconds, min_seconds

XLA_RAGGED_LIMIT_BYTES = 2 << 30  # XLA:CPU ragged_dot materializes [G, M, D]; skip it above this.


def grouped_matmul_table(groups_list, rows_list, d, f, repeats):
  print(f"\n(1) grouped matmul, D={d}, F/N={f}: FLOP rate relative to dense jnp.dot of the same useful FLOPs")
  rng = np.random.default_rng(0)
  dense = jax.jit(lambda a, b: a @ b)
  backends = (["native"] if native_available() else []) + ["tiled"]
  fast = {name: jax.jit(functools.partial(grouped_matmul, backend=name)) for name in backends}
  xla = jax.jit(functools.partial(grouped_matmul, backend="xla"))
  cells = []
  for groups in groups_list:
    rhs = jnp.asarray(rng.normal(size=(groups, d, f)), jnp.float32)
    for rows in rows_list:
      num_rows = groups * rows
      lhs = jnp.asarray(rng.normal(size=(num_rows, d)), jnp.float32)
      # Uneven group sizes with the same total: a realistic router is not balanced.
      sizes = jnp.asarray(rng.multinomial(num_rows, rng.dirichlet(np.full(groups, 2.0))), jnp.int32)
      cells.append((groups, rows, lhs, rhs, sizes))
  # The dense, native and tiled timings of every cell come first: XLA:CPU's ragged_dot allocates
  # up to 2 GiB per call, and in one run that slowed the tiled timings taken after it by up to 3x.
  timings = []
  for _, _, lhs, rhs, sizes in cells:
    fns = {"dense": functools.partial(dense, lhs, rhs[0])}
    fns.update({name: functools.partial(fn, lhs, rhs, sizes) for name, fn in fast.items()})
    timings.append(list(interleaved_medians(fns, repeats=repeats).values()))
  header = "".join(f" {name + ' ms':>10} {name + '/dense':>12}" for name in backends)
  print(f"{'groups':>7} {'rows/group':>10} {'dense ms':>9}{header} {'xla ms':>9} {'xla/dense':>9}")
  for (groups, rows, lhs, rhs, sizes), (t_dense, *t_fast) in zip(cells, timings):
    if groups * lhs.shape[0] * d * 4 <= XLA_RAGGED_LIMIT_BYTES:
      t_xla = median_seconds(lambda: xla(lhs, rhs, sizes), repeats=max(1, repeats // 2))
      xla_cols = f"{t_xla * 1e3:9.1f} {t_dense / t_xla:9.1%}"
    else:
      xla_cols = f"{'skipped':>9} {'(>2 GiB)':>9}"
    fast_cols = "".join(f" {t * 1e3:10.2f} {t_dense / t:12.1%}" for t in t_fast)
    print(f"{groups:7d} {rows:10d} {t_dense * 1e3:9.2f}{fast_cols} {xla_cols}")


def budget_model(d, e, k, f, layers, vocab):
  return ModelConfig(family="qwen3_moe", vocab_size=vocab, hidden_size=d, num_layers=layers, num_heads=8,
                     num_kv_heads=4, head_dim=d // 8, num_experts=e, num_experts_per_tok=k, moe_intermediate_size=f,
                     qk_norm="head", max_position_embeddings=4096)


def budget_table(config, n, num_tokens, repeats):
  print(f"\n(2) prefill cost versus budget: E={config.num_experts}, K={config.num_experts_per_tok}, N={n}, "
        f"D={config.hidden_size}, F={config.moe_intermediate_size}, {num_tokens} tokens")
  partition = identity_partition(config.num_experts, config.moe_intermediate_size, n, config.moe_layer_indices, "x")
  model = PrismModel(config, random_params(config, seed=0), partition=partition)
  graphdef, state = nnx.split(model.module().layers[0].mlp)

  @functools.partial(jax.jit, static_argnames="budget")
  def layer(state, x, valid, budget):
    return nnx.merge(graphdef, state)(x, valid, budget)[0]

  x = jnp.asarray(np.random.default_rng(0).normal(size=(num_tokens, config.hidden_size)), jnp.float32)
  valid = jnp.ones((num_tokens,), bool)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, config.vocab_size, (1, num_tokens)), jnp.int32)
  full = model.full_budget
  fractions = (0.25, 0.5, 0.75, 1.0)
  layer_times = interleaved_medians(
      {f: functools.partial(layer, state, x, valid, int(f * full)) for f in fractions}, repeats=repeats)
  # End to end, only the MoE share of the full-budget time scales: target (1 - share) + share * (f + 0.1).
  # The rest is timed on a twin whose MoE layers are replaced by a width-8 dense MLP (near zero cost).
  twin_config = config.replace(moe_layers=(False,) * config.num_layers, intermediate_size=8)
  twin = PrismModel(twin_config, random_params(twin_config, seed=0))
  model_fns = {f: functools.partial(model, tokens, budget=int(f * full)) for f in fractions}
  model_times = interleaved_medians({**model_fns, "rest": functools.partial(twin, tokens)}, repeats=repeats)
  rest = model_times["rest"]
  share = max(0.0, 1.0 - rest / model_times[1.0])
  print(f"MoE layers take {share:.0%} of the full-budget model time (the rest, timed without them: "
        f"{rest * 1e3:.1f} ms)")
  print(f"{'fraction':>8} {'budget':>6} {'layer ms':>9} {'layer/full':>10} {'target':>7} {'model ms':>9} {'model/full':>10} "
        f"{'target':>7}")
  for f in fractions:
    print(f"{f:8.2f} {int(f * full):6d} {layer_times[f] * 1e3:9.2f} {layer_times[f] / layer_times[1.0]:10.2f} "
          f"{f + 0.1:7.2f} {model_times[f] * 1e3:9.2f} {model_times[f] / model_times[1.0]:10.2f} "
          f"{1 - share + share * (f + 0.1):7.2f}")


def bandwidth_bytes_per_second(repeats) -> tuple[float, float]:
  """Measure peak read bandwidth over 256 MiB (fastest of the repeats): one core with jnp.sum,
  and every core with NumPy threads."""
  size = 256 << 20
  a = jnp.ones((size // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  one_core = size / min_seconds(lambda: total(a), repeats=repeats)
  # NumPy releases the GIL inside a float32 sum, so one thread per core reads its own slice.
  host = np.ones((size // 4,), np.float32)
  threads = os.cpu_count() or 1
  slices = np.array_split(host, threads)
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    all_cores = size / min_seconds(lambda: list(pool.map(np.sum, slices)), repeats=repeats)
  return one_core, all_cores


def decode_table(config, n, batch_sizes, repeats):
  # Several layers with their own weights run in one program, as in a decode step of a model:
  # their weights do not fit in the last-level cache together, and one launch serves them all.
  num_layers = config.num_layers
  print(f"\n(3) decode step of {num_layers} MoE layers (own weights, one program): time versus bytes of the "
        "sub-experts touched")
  partition = identity_partition(config.num_experts, config.moe_intermediate_size, n, config.moe_layer_indices, "x")
  model = PrismModel(config, random_params(config, seed=0), partition=partition)
  graphdefs, states = zip(*(nnx.split(model.module().layers[i].mlp) for i in range(num_layers)))

  @functools.partial(jax.jit, static_argnames="budget")
  def step(states, x, valid, budget):
    # Every layer reads the same x, so the sub-experts each touches are known from x alone.
    outputs = [nnx.merge(g, st)(x, valid, budget)[0] for g, st in zip(graphdefs, states)]
    return sum(outputs)

  one_core, all_cores = bandwidth_bytes_per_second(repeats)
  bandwidth = max(one_core, all_cores)
  print(f"measured read bandwidth over 256 MiB: {one_core / 1e9:.1f} GB/s on one core (jnp.sum), "
        f"{all_cores / 1e9:.1f} GB/s on {os.cpu_count()} threads (NumPy); the larger is the peak")
  group_bytes = 3 * config.hidden_size * (config.moe_intermediate_size // n) * 4
  print(f"{'batch':>5} {'budget':>6} {'groups':>6} {'MB touched':>10} {'step ms':>8} {'achieved GB/s':>13} {'of peak':>7}")
  rng = np.random.default_rng(2)
  for batch in batch_sizes:
    for budget in (model.full_budget // 4, model.full_budget):
      x = jnp.asarray(rng.normal(size=(batch, config.hidden_size)), jnp.float32)
      valid = jnp.ones((batch,), bool)
      seconds = median_seconds(lambda: step(states, x, valid, budget), repeats=repeats * 4)
      # Count the distinct groups each layer ran, from a reference of the same routing.
      groups = sum(_distinct_groups(model, i, x, budget) for i in range(num_layers))
      touched = groups * group_bytes
      rate = touched / seconds
      print(f"{batch:5d} {budget:6d} {groups:6d} {touched / 1e6:10.2f} {seconds * 1e3:8.3f} {rate / 1e9:13.2f} "
            f"{rate / bandwidth:7.1%}")


def _distinct_groups(model, index, x, budget):
  from prism_jax.moe import route_parent
  from prism_jax.budget import budget_pattern

  mlp = model.module().layers[index].mlp
  _, experts_SK, _ = route_parent(x, mlp.router[...], mlp.top_k, mlp.normalize)
  pattern = budget_pattern(budget, mlp.num_sub_experts, mlp.top_k)
  # Upper bound for partial experts: the ranking picks `count` of N, so count groups per (token, rank).
  groups = set()
  for row in np.asarray(experts_SK):
    for rank, count in enumerate(pattern):
      for s in range(count):
        groups.add((int(row[rank]), s))
  return len(groups)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats")
  args = parser.parse_args()
  repeats = 3 if args.quick else 5
  print(f"machine: {platform.machine()}, {jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}")
  groups_list = (32, 256) if args.quick else (32, 256, 1024)
  grouped_matmul_table(groups_list, (16, 64, 256), d=256, f=128, repeats=repeats)
  config = budget_model(d=512, e=16, k=4, f=512, layers=2, vocab=1024)
  budget_table(config, n=4, num_tokens=512 if args.quick else 1024, repeats=repeats)
  decode_config = budget_model(d=512, e=16, k=4, f=512, layers=8, vocab=1024)
  decode_table(decode_config, n=4, batch_sizes=(1, 8, 32), repeats=repeats)


if __name__ == "__main__":
  main()
