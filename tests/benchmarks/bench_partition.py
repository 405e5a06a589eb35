"""Benchmark the partition solvers side by side on one checkpoint.

Every solver runs on the same calibration profile. Per MoE layer the script prints the
objective relative to a random split, the wall seconds (after a warm-up call that
compiles) and the candidate partitions scored per second. Then it prints the perplexity
of each solver's partition at budgets N*K/4, N*K/2 and 3N*K/4. For the solvers named by
--curve-solvers it measures the full operating-point curve and its stable-point count
against top-k.

  python tests/benchmarks/bench_partition.py                       # tiny random checkpoint
  python tests/benchmarks/bench_partition.py --checkpoint DIR --calib TEXT --eval TEXT
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import prism_jax
from partition.build import model_fingerprint, partition_layer, partitioned_model
from partition.calibration import load_token_ids, make_sequences
from partition.config import SOLVER_NAMES, PartitionConfig, ProfileConfig
from partition.curve import CurveConfig, budget_quality, format_table, measure_curve
from partition.profiler import profile_layers
from prism_jax.checkpoint import save_params
from prism_jax.subexperts import Partition
from prism_jax.testing import TINY, random_params


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", type=Path, help="prism checkpoint (default: a tiny random one)")
  parser.add_argument("--calib", type=Path, help="calibration text or .npy ids (default: random ids)")
  parser.add_argument("--eval", type=Path, help="held-out text or .npy ids (default: random ids)")
  parser.add_argument("--num-sub-experts", type=int, default=4)
  parser.add_argument("--solvers", default=",".join(SOLVER_NAMES), help="comma-separated solvers to compare")
  parser.add_argument("--curve-solvers", default="evosax", help="solvers whose full curve is measured ('' = none)")
  parser.add_argument("--tokens-per-expert", type=int, default=1024)
  parser.add_argument("--max-calib-tokens", type=int, default=None)
  parser.add_argument("--max-eval-tokens", type=int, default=None)
  parser.add_argument("--sequence-length", type=int, default=256)
  parser.add_argument("--tolerance", type=float, default=1.25)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", type=Path, help="write all figures to this JSON file")
  return parser.parse_args()


def default_checkpoint() -> Path:
  path = Path(tempfile.mkdtemp(prefix="bench-partition-")) / "tiny"
  return save_params(path, TINY, random_params(TINY, seed=0, scale=6.0), source="random seed 0, scale 6")


def token_ids(path: Path | None, model, count: int, seed: int) -> np.ndarray:
  if path is not None:
    return load_token_ids(path, model.tokenizer)
  return np.random.default_rng(seed).integers(1, model.config.vocab_size, count)


def solve_all_layers(model, profiles, config: PartitionConfig, key) -> tuple[Partition, list[dict]]:
  # Warm-up on the first layer with another key, so the timed calls do not compile.
  partition_layer(model, profiles[0], config, jax.random.fold_in(key, 10_000))
  layers, summaries = {}, []
  for profile in profiles:
    layer, summary = partition_layer(model, profile, config, jax.random.fold_in(key, profile.layer))
    layers[profile.layer] = layer
    summaries.append({"layer": profile.layer, **summary})
  return Partition(config.num_sub_experts, config.router, layers, model_fingerprint(model)), summaries


def main() -> None:
  args = parse_args()
  logging.basicConfig(level=logging.WARNING)
  checkpoint = args.checkpoint or default_checkpoint()
  model = prism_jax.load(checkpoint)
  mc = model.config
  n, top_k = args.num_sub_experts, mc.num_experts_per_tok
  full = n * top_k
  print(f"checkpoint {checkpoint}: {mc.family}, {len(mc.moe_layer_indices)} MoE layers, E={mc.num_experts} "
        f"K={top_k} F={mc.moe_intermediate_size} D={mc.hidden_size}; N={n}; devices {jax.devices()}")

  base = PartitionConfig(num_sub_experts=n, seed=args.seed, reference_solvers=("random",),
                         profile=ProfileConfig(sequence_length=args.sequence_length, max_tokens=args.max_calib_tokens,
                                               max_tokens_per_expert=args.tokens_per_expert, seed=args.seed))
  calib = token_ids(args.calib, model, 16_384, seed=1)
  eval_ids = token_ids(args.eval, model, 8_192, seed=2)
  sequences = make_sequences(calib, args.sequence_length, bos_token_id=mc.bos_token_id,
                             max_tokens=args.max_calib_tokens, vocab_size=mc.vocab_size)
  start = time.perf_counter()
  profiles = list(profile_layers(model, sequences, base.profile))
  print(f"profiled {sequences.num_tokens} calibration tokens in {time.perf_counter() - start:.1f}s; "
        f"activations per layer {tuple(profiles[0].acts_ETF.shape)}")

  curve_config = CurveConfig(tolerance=args.tolerance, sequence_length=args.sequence_length,
                             max_tokens=args.max_eval_tokens)
  budgets = sorted({max(1, round(full * f)) for f in (0.25, 0.5, 0.75)})
  key = jax.random.key(args.seed)
  record = {"checkpoint": str(checkpoint), "num_sub_experts": n, "calibration_tokens": sequences.num_tokens,
            "solvers": {}}
  for solver in args.solvers.split(","):
    config = dataclasses.replace(base, solver=solver)
    partition, layers = solve_all_layers(model, profiles, config, key)
    quality = budget_quality(model, partitioned_model(model, partition), eval_ids, budgets, curve_config)
    record["solvers"][solver] = {
        "layers": [{k: s[k] for k in ("layer", "objective", "relative_to_random", "seconds", "evaluations", "stages")}
                   for s in layers],
        "perplexity": {str(b): q[0] for b, q in zip(budgets, quality)},
        "agreement": {str(b): q[1] for b, q in zip(budgets, quality)},
    }
    if solver in args.curve_solvers.split(","):
      curve = measure_curve(model, partitioned_model(model, partition), eval_ids, curve_config)
      print(f"\n{solver} operating points:\n{format_table(curve)}")
      record["solvers"][solver]["curve"] = curve.to_dict()

  print(f"\n{'solver':>8} {'layer':>5} {'objective/random':>16} {'seconds':>8} {'evals/s':>10}")
  for solver, result in record["solvers"].items():
    for s in result["layers"]:
      rate = s["evaluations"] / s["seconds"] if s["seconds"] else float("nan")
      print(f"{solver:>8} {s['layer']:>5} {s['relative_to_random']:>16.5f} {s['seconds']:>8.2f} {rate:>10.3g}")
  if "sa" in record["solvers"]:
    print("\nagainst simulated annealing (per layer: cost ratio, time ratio; < 1 is better):")
    sa_layers = record["solvers"]["sa"]["layers"]
    for solver, result in record["solvers"].items():
      ratios = [(s["objective"] / a["objective"], s["seconds"] / a["seconds"])
                for s, a in zip(result["layers"], sa_layers)]
      print(f"{solver:>8} " + "  ".join(f"L{s['layer']}: {c:.4f} / {t:.2f}" for s, (c, t) in zip(result["layers"],
                                                                                               ratios)))
  print(f"\nperplexity at budgets {budgets} (of {full}):")
  for solver, result in record["solvers"].items():
    print(f"{solver:>8} " + "  ".join(f"{result['perplexity'][str(b)]:>9.3f}" for b in budgets))
  for solver, result in record["solvers"].items():
    if "curve" in result:
      counts, ratio = result["curve"]["stable_counts"], result["curve"]["stable_ratio"]
      print(f"{solver}: stable points {counts['budget']} budgets vs {counts['top_k']} top-k, ratio {ratio}")
  if args.out:
    args.out.write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
