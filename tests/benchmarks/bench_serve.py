"""Serving benchmark: goodput under a TTFT SLO per policy, sub-expert budgets against whole experts.

Run from the repository root:
  python -m tests.benchmarks.bench_serve [--simulate] [--checkpoint DIR --partition DIR]

The same Poisson workload runs twice on the same engine. The first run uses the budgets the
requests ask for (1..N*K). The second is restricted to whole experts: each budget is rounded up
to a multiple of N, which is what the unsplit model offers. A request meets the SLO when its
first token arrives before its deadline, and a rate meets it when 90% of requests do (p90 TTFT
within the deadline). Goodput is requests per second that met their deadline.

Part (1) bisects, in virtual time where each step costs what the latency table predicts, the
highest rate that meets the SLO. Part (2), skipped with --simulate, replays two rates in real
time. Without --checkpoint the script builds a small random model (N=4, random neuron
permutation), so the figures show the machinery, not a trained model's behaviour.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import platform
import tempfile
from pathlib import Path

import jax
import numpy as np

import prism_jax
from prism_jax.checkpoint import read_meta, save_params
from prism_jax.partition_io import write_partition
from prism_jax.subexperts import LayerPartition, Partition
from prism_jax.testing import TINY, random_params
from serve.config import EngineConfig
from serve.engine import Engine
from serve.latency import LatencyTable, measure_latency
from serve.runner import ModelRunner, enable_compilation_cache
from serve.testing import ManualClock, StubRunner
from serve.workload import WorkloadConfig, make_workload, replay_realtime, replay_simulated

# Wider than the test model, so the expert work (which the budget scales) is a visible part of a step.
BENCH_CONFIG = TINY.replace(hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=32, num_experts=8,
                            num_experts_per_tok=2, moe_intermediate_size=512, vocab_size=512,
                            max_position_embeddings=512)
SLO_ATTAINMENT = 0.9


def build_default_model(root: Path, num_sub_experts: int = 4, seed: int = 0) -> tuple[Path, Path]:
  checkpoint = save_params(root / "checkpoint", BENCH_CONFIG, random_params(BENCH_CONFIG, seed, scale=4.0),
                           source=f"random seed {seed}")
  _, meta = read_meta(checkpoint)
  rng = np.random.default_rng(seed)
  e, f = BENCH_CONFIG.num_experts, BENCH_CONFIG.moe_intermediate_size
  group = f // num_sub_experts
  layers = {i: LayerPartition(np.stack([rng.permutation(f) for _ in range(e)]).astype(np.int32),
                              np.tile(np.arange(4, dtype=np.int32), (e, num_sub_experts, 1)) % group)
            for i in BENCH_CONFIG.moe_layer_indices}
  partition = Partition(num_sub_experts, "compound", layers, meta["fingerprint"])
  return checkpoint, write_partition(root / "partition", partition, {"solver": "random permutation"})


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", type=Path, help="prism checkpoint (default: a small random one)")
  parser.add_argument("--partition", type=Path, help="partition directory for --checkpoint")
  parser.add_argument("--latency-table", type=Path, help="reuse a table from `prism profile` instead of timing")
  parser.add_argument("--policies", default="fcfs,edf,throughput,per_row", help="comma-separated policies")
  parser.add_argument("--rates", default=None,
                      help="real-time arrival rates in requests/s, comma-separated (default: 0.8 and 1.2 x the "
                      "simulated knee of the first policy with whole experts)")
  parser.add_argument("--duration", type=float, default=4.0, help="seconds of arrivals per run (default 4)")
  parser.add_argument("--slo-scale", type=float, default=4.0,
                      help="TTFT deadline = this x (predicted lone prefill + one full decode step) (default 4)")
  parser.add_argument("--batch-buckets", default="1,8", help="compiled batch sizes (default 1,8)")
  parser.add_argument("--token-buckets", default="32", help="compiled prefill chunk lengths (default 32)")
  parser.add_argument("--max-len", type=int, default=128, help="KV-cache positions per request (default 128)")
  parser.add_argument("--all-budgets", action="store_true",
                      help="compile every budget 1..N*K (default: the engine's default, the full budget and the "
                      "tier budgets; other budgets run masked in the next larger program)")
  parser.add_argument("--simulate", action="store_true", help="only the virtual-time search, no real-time runs")
  parser.add_argument("--compilation-cache-dir", default=str(Path.home() / ".cache/prism-jax/jax-compilation"))
  parser.add_argument("--seed", type=int, default=0)
  return parser.parse_args()


def ints(text: str) -> tuple[int, ...]:
  return tuple(int(v) for v in text.split(","))


def print_latency(latency: LatencyTable, batch: int, chunk: int, full: int) -> None:
  print("\nstep time by budget (ms), relative to the full budget:")
  print(f"{'budget':>6} {f'decode x{batch}':>12} {'ratio':>6} {f'prefill 1x{chunk}':>14} {'ratio':>6}")
  decode_full, prefill_full = latency.predict(batch, 1, full), latency.predict(1, chunk, full)
  for budget in sorted({p.budget for p in latency.seconds}):
    decode, prefill = latency.predict(batch, 1, budget), latency.predict(1, chunk, budget)
    print(f"{budget:6d} {decode * 1e3:12.3f} {decode / decode_full:6.2f} {prefill * 1e3:14.3f} "
          f"{prefill / prefill_full:6.2f}")


def estimate_capacity(latency: LatencyTable, workload: WorkloadConfig, full: int, batch: int, chunk: int) -> float:
  """Rough requests/s: one lone prefill plus the request's share of full-batch decode steps, mid budget."""
  middle = (full + 1) // 2
  mean_tokens = (workload.max_tokens_min + workload.max_tokens_max) / 2
  seconds = latency.predict(1, chunk, middle) + mean_tokens * latency.predict(batch, 1, middle) / batch
  return 1.0 / seconds


def main() -> None:
  args = parse_args()
  logging.basicConfig(level=logging.WARNING)
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()})")
  with tempfile.TemporaryDirectory() as tmp:
    if args.checkpoint is None:
      checkpoint, partition = build_default_model(Path(tmp))
    else:
      checkpoint, partition = args.checkpoint, args.partition
    logging.getLogger("absl").setLevel(logging.WARNING)
    model = prism_jax.load(checkpoint, partition)
    run(args, model)


def run(args: argparse.Namespace, model) -> None:
  full, n = model.full_budget, model.num_sub_experts
  batch_buckets, token_buckets = ints(args.batch_buckets), ints(args.token_buckets)
  budgets = tuple(range(1, full + 1)) if args.all_budgets else None
  base = EngineConfig(batch_buckets=batch_buckets, token_buckets=token_buckets, budgets=budgets,
                      max_len=args.max_len, max_queue=4096, compilation_cache_dir=args.compilation_cache_dir,
                      profile_repeats=0)
  programs = base.programs(full, n)
  print(f"model: {model.config.num_layers} layers, D={model.config.hidden_size}, E={model.config.num_experts}, "
        f"K={model.config.num_experts_per_tok}, N={n}, full budget {full}; compiled budgets "
        f"{list(base.resolve_budgets(full, n))}, {len(programs)} programs")

  runner = None
  if not (args.simulate and args.latency_table):
    enable_compilation_cache(Path(args.compilation_cache_dir).expanduser())
    runner = ModelRunner(model, num_slots=base.max_batch, max_len=args.max_len)
    runner.compile(programs, workers=2)
  latency = LatencyTable.load(args.latency_table) if args.latency_table else measure_latency(runner, programs, repeats=7)
  print_latency(latency, base.max_batch, base.max_chunk, full)

  workload = WorkloadConfig(rate=1.0, duration_s=args.duration, slo_scale=args.slo_scale, seed=args.seed,
                            prompt_max=min(96, args.max_len // 2), max_tokens_max=min(16, args.max_len // 4))
  policies = args.policies.split(",")
  print(f"\nworkload: {args.duration:g} s of Poisson arrivals, prompts log-normal around {workload.prompt_median} "
        f"tokens, {workload.max_tokens_min}..{workload.max_tokens_max} new tokens, budgets around {(full + 1) / 2:g}, "
        f"deadline = {args.slo_scale:g} x (lone prefill + full decode step)")

  knees = search_knees(args, model, base, latency, workload, policies)
  if args.simulate:
    return
  if args.rates:
    rates = [float(r) for r in args.rates.split(",")]
  else:
    reference = knees[(policies[0], True)]
    rates = [round(reference * f, 1) for f in (0.8, 1.2)]
  realtime_table(args, model, runner, base, latency, workload, policies, rates)


def workload_items(model, base: EngineConfig, latency: LatencyTable, workload: WorkloadConfig, rate: float):
  return make_workload(dataclasses.replace(workload, rate=rate), vocab_size=model.config.vocab_size,
                       full_budget=model.full_budget, latency=latency, batch_buckets=base.batch_buckets,
                       token_buckets=base.token_buckets)


def search_knees(args, model, base, latency, workload, policies) -> dict[tuple[str, bool], float]:
  """Bisect, in virtual time, the highest rate at which >= 90% of requests meet their deadline."""
  print(f"\n(1) simulated throughput at the SLO: highest arrival rate (req/s) with >= {SLO_ATTAINMENT:.0%} of "
        "requests meeting their TTFT deadline, each step costing what the latency table predicts")
  print(f"{'policy':>10} {'sub-expert':>11} {'whole-expert':>13} {'ratio':>7}")
  sim_args = argparse.Namespace(**{**vars(args), "simulate": True})
  capacity = estimate_capacity(latency, workload, model.full_budget, base.max_batch, base.max_chunk)
  knees = {}
  for policy in policies:
    for whole in (False, True):
      config = base.replace(policy=policy, whole_experts=whole)

      def meets(rate: float) -> bool:
        items = workload_items(model, base, latency, workload, rate)
        return replay(sim_args, model, None, config, latency, items).attainment >= SLO_ATTAINMENT

      low, high = 0.0, capacity
      while meets(high):
        low, high = high, high * 2
      for _ in range(8):
        middle = (low + high) / 2
        low, high = (middle, high) if meets(middle) else (low, middle)
      knees[(policy, whole)] = low
    sub, whole_rate = knees[(policy, False)], knees[(policy, True)]
    ratio = f"{sub / whole_rate:7.3f}" if whole_rate else f"{'inf':>7}"
    print(f"{policy:>10} {sub:11.1f} {whole_rate:13.1f} {ratio}")
  return knees


def realtime_table(args, model, runner, base, latency, workload, policies, rates) -> None:
  print(f"\n(2) real time on this machine, rates {rates} req/s")
  print(f"{'policy':>10} {'budgets':>12} {'rate':>6} {'reqs':>5} {'SLO met':>8} {'p90 TTFT ms':>11} "
        f"{'goodput/s':>9} {'mean budget':>11}")
  goodput: dict[tuple[str, bool, float], float] = {}
  for rate in rates:
    items = workload_items(model, base, latency, workload, rate)
    for policy in policies:
      for whole in (False, True):
        config = base.replace(policy=policy, whole_experts=whole)
        result = replay(args, model, runner, config, latency, items)
        goodput[(policy, whole, rate)] = result.goodput
        print(f"{policy:>10} {'whole-expert' if whole else 'sub-expert':>12} {rate:6.1f} {result.requests:5d} "
              f"{result.attainment:8.1%} {result.ttft_percentile(90) * 1e3:11.2f} {result.goodput:9.2f} "
              f"{result.mean_budget_run:11.2f}")
  print("\ngoodput ratio, sub-expert budgets / whole experts (same engine, same arrivals):")
  print(f"{'policy':>10} " + " ".join(f"{f'@{r:g}/s':>9}" for r in rates))
  for policy in policies:
    cells = []
    for rate in rates:
      whole = goodput[(policy, True, rate)]
      cells.append(f"{goodput[(policy, False, rate)] / whole:9.3f}" if whole else f"{'inf':>9}")
    print(f"{policy:>10} " + " ".join(cells))


def replay(args, model, runner, config: EngineConfig, latency: LatencyTable, items):
  if args.simulate:
    clock = ManualClock()
    stub = StubRunner(full_budget=model.full_budget, num_sub_experts=model.num_sub_experts,
                      num_slots=config.max_batch, max_len=config.max_len, vocab_size=model.config.vocab_size,
                      clock=clock, latency=latency)
    engine = Engine(stub, config, clock=clock, latency=latency, progress=False)
    return replay_simulated(engine, clock, items, args.duration)
  engine = Engine(runner, config, latency=latency, progress=False).start()
  try:
    return replay_realtime(engine, items, args.duration)
  finally:
    engine.stop()


if __name__ == "__main__":
  main()
