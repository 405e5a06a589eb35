"""`prism profile CKPT --partition DIR --out table.json`: time every (bucket, budget) step on this machine."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from serve.cli_args import add_engine_arguments, add_model_arguments, engine_config, ensure_info_logging, load_model
from serve.engine import runner_for
from serve.latency import measure_latency
from serve.runner import enable_compilation_cache


def add_arguments(parser: argparse.ArgumentParser) -> None:
  add_model_arguments(parser)
  parser.add_argument("--out", type=Path, required=True, help="where to write the latency table (JSON)")
  parser.add_argument("--repeats", type=int, default=5, help="timed runs per program; the median is kept (default 5)")
  add_engine_arguments(parser)


def run(args: argparse.Namespace) -> int:
  ensure_info_logging()
  try:
    config = engine_config(args)
    if args.repeats < 1:
      raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
  except ValueError as error:
    print(f"prism profile: {error}", file=sys.stderr)
    return 2
  try:
    model = load_model(args, max_batch=config.max_batch)
  except (ValueError, FileNotFoundError) as error:
    print(f"prism profile: {error}", file=sys.stderr)
    return 2
  try:
    programs = config.programs(model.full_budget, model.num_sub_experts)
  except ValueError as error:
    print(f"prism profile: {error}", file=sys.stderr)
    return 2
  if config.cache_dir() is not None:
    enable_compilation_cache(config.cache_dir())
  try:
    return _profile(args, config, model, programs)
  finally:
    if hasattr(model, "close"):  # an OffloadedModel: stop its prefetch thread, delete a temporary offload dir
      model.close()


def _profile(args, config, model, programs) -> int:
  runner = runner_for(model, num_slots=config.max_batch, max_len=config.max_len or model.config.max_position_embeddings)
  runner.compile(programs, workers=config.compile_workers)
  meta = {
      "fingerprint": model.fingerprint,
      "partition": None if args.partition is None else str(Path(args.partition).resolve()),
      "num_sub_experts": model.num_sub_experts,
      "full_budget": model.full_budget,
      "max_len": runner.max_len,
      "expert_memory": getattr(args, "expert_memory", None),
  }
  table = measure_latency(runner, programs, repeats=args.repeats, meta=meta)
  table.save(args.out)

  print(f"{'batch':>5} {'tokens':>6} {'budget':>6} {'ms':>9}")
  for program, seconds in sorted(table.seconds.items()):
    print(f"{program.batch:>5} {program.tokens:>6} {program.budget:>6} {seconds * 1e3:>9.3f}")
  print(f"wrote {len(table.seconds)} entries to {args.out}")
  offload = getattr(model, "stats", None)
  if offload is not None:
    stats = offload()
    print(f"expert cache while timing: hit rate {stats.hit_rate:.1%}, {stats.bytes_per_token / 1e6:.2f} MB fetched "
          f"and {stats.stall_s_per_token * 1e3:.2f} ms stalled per token")
  return 0
