"""`prism curve CKPT_DIR --partition DIR --eval TEXT --out DIR`: measure every operating point."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from pathlib import Path

from partition.build import partitioned_model
from partition.calibration import load_token_ids
from partition.curve import CurveConfig, format_table, measure_curve
from partition.plot import plot_curve
from prism_jax.model import load
from prism_jax.partition_io import read_partition

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("checkpoint", type=Path, help="prism checkpoint directory")
  parser.add_argument("--partition", type=Path, required=True, help="partition directory from `prism partition`")
  parser.add_argument("--eval", type=Path, required=True,
                      help="held-out text file (plain, .gz or .xz) or a .npy file of token ids")
  parser.add_argument("--out", type=Path, required=True, help="directory to create for curve.json and curve.png")
  parser.add_argument("--tolerance", type=float, default=1.25,
                      help="stable points have perplexity <= TOLERANCE x the full model's (default 1.25)")
  parser.add_argument("--max-tokens", type=int, default=None, help="evaluate on at most this many tokens")
  parser.add_argument("--sequence-length", type=int, default=256, help="evaluation row length in tokens")
  parser.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (also the timed batch)")
  parser.add_argument("--renormalize-top-k", action="store_true",
                      help="rescale the baseline's first k routing weights to the sum of all K (default: keep them)")
  parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
  try:
    if args.out.exists() and not args.overwrite:
      raise FileExistsError(f"output directory {args.out} already exists; choose another --out or pass --overwrite")
    config = CurveConfig(tolerance=args.tolerance, sequence_length=args.sequence_length, batch_size=args.batch_size,
                         max_tokens=args.max_tokens, renormalize_top_k=args.renormalize_top_k)
    full = load(args.checkpoint)
    partitioned = partitioned_model(full, read_partition(args.partition))
    ids = load_token_ids(args.eval, full.tokenizer, label="evaluation")
    curve = measure_curve(full, partitioned, ids, config)
  except (ValueError, FileNotFoundError, FileExistsError) as error:
    logger.error("%s", error)
    return 2

  tmp = args.out.with_name(args.out.name + ".partial")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  try:
    record = {"checkpoint": str(args.checkpoint), "partition": str(args.partition), "eval": str(args.eval),
              **curve.to_dict()}
    (tmp / "curve.json").write_text(json.dumps(record, indent=2))
    plot_curve(curve, tmp / "curve.png")
    if args.out.exists():
      shutil.rmtree(args.out)
    os.replace(tmp, args.out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  print(format_table(curve))
  print(f"wrote {args.out / 'curve.json'} and {args.out / 'curve.png'}")
  return 0
