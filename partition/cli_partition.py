"""`prism partition CKPT_DIR --calib TEXT --out PARTITION_DIR`: build and save a sub-expert partition."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from partition.build import build_partition, check_model
from partition.calibration import load_token_ids
from partition.config import SOLVER_NAMES, PartitionConfig, ProfileConfig, RouterTuningConfig
from prism_jax.checkpoint import read_meta
from prism_jax.model import load, load_tokenizer
from prism_jax.partition_io import write_partition

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("checkpoint", type=Path, help="prism checkpoint directory (from `prism convert`)")
  parser.add_argument("--calib", type=Path, required=True,
                      help="calibration text file (plain, .gz or .xz; tokenized with the checkpoint's tokenizer) "
                           "or a .npy file of token ids")
  parser.add_argument("--out", type=Path, required=True, help="partition directory to create")
  parser.add_argument("--num-sub-experts", type=int, default=4, help="sub-experts per expert, N (default 4)")
  parser.add_argument("--solver", choices=SOLVER_NAMES, default="evosax", help="partition solver (default evosax)")
  parser.add_argument("--router", choices=("compound", "linear"), default="compound",
                      help="sub-expert router stored with the partition (default compound)")
  parser.add_argument("--keep", type=int, default=1,
                      help="groups per token the objective keeps: cost = mass outside each token's KEEP "
                           "heaviest groups (default 1)")
  parser.add_argument("--max-tokens", type=int, default=None, help="use at most this many calibration tokens")
  parser.add_argument("--tokens-per-expert", type=int, default=1024,
                      help="keep at most this many tokens' activations per expert (default 1024)")
  parser.add_argument("--sequence-length", type=int, default=256, help="calibration row length in tokens")
  parser.add_argument("--num-core-neurons", type=int, default=4,
                      help="core neurons per sub-expert for the compound router (default 4)")
  parser.add_argument("--tune-router-steps", type=int, default=0,
                      help="optax steps of router-only fine-tuning for --router linear (default 0: none)")
  parser.add_argument("--seed", type=int, default=0, help="random seed of sampling and search")
  parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def config_from_args(args: argparse.Namespace) -> PartitionConfig:
  return PartitionConfig(
      num_sub_experts=args.num_sub_experts,
      solver=args.solver,
      router=args.router,
      keep=args.keep,
      num_core_neurons=args.num_core_neurons,
      seed=args.seed,
      profile=ProfileConfig(sequence_length=args.sequence_length, max_tokens=args.max_tokens,
                            max_tokens_per_expert=args.tokens_per_expert, seed=args.seed),
      router_tuning=RouterTuningConfig(steps=args.tune_router_steps),
  )


def format_summary(summary: dict) -> str:
  names = list(summary["reference_objectives"])
  header = f"{'layer':>5} {summary['solver']:>12} " + " ".join(f"{n:>12}" for n in names) + f" {'seconds':>8} fallback"
  lines = [header]
  for layer, s in summary["layers"].items():
    refs = " ".join(f"{s['references'][n]:>12.4g}" for n in names)
    lines.append(f"{layer:>5} {s['objective']:>12.4g} {refs} {s['seconds']:>8.2f} {s['fallback_experts'] or ''}")
  calib = summary["calibration"]
  lines.append(f"calibration: {calib['tokens']} tokens in {calib['sequences']} rows from {calib['source']}")
  return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
  try:
    if args.out.exists() and not args.overwrite:
      raise FileExistsError(f"partition directory {args.out} already exists; choose another --out or pass --overwrite")
    config = config_from_args(args)
    # Check the checkpoint's files and read the calibration text before loading the weights, so
    # bad input fails in seconds on a large model.
    read_meta(args.checkpoint)
    ids = load_token_ids(args.calib, load_tokenizer(args.checkpoint), label="calibration")
    model = load(args.checkpoint)
    check_model(model, config)
    partition, summary = build_partition(model, ids, config, calibration_source=str(args.calib))
    summary["checkpoint"] = str(args.checkpoint)
    write_partition(args.out, partition, summary, overwrite=args.overwrite)
  except (ValueError, FileNotFoundError, FileExistsError) as error:
    logger.error("%s", error)
    return 2
  print(format_summary(summary))
  print(f"wrote {args.out}")
  return 0
