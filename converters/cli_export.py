"""`prism export CKPT_DIR OUT_DIR`: prism checkpoint -> Hugging Face checkpoint."""

from __future__ import annotations

import argparse
import logging

from converters.errors import ConversionError

logger = logging.getLogger("prism.export")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("ckpt_dir", help="prism checkpoint directory (from `prism convert` or training)")
  parser.add_argument("out_dir", help="Hugging Face checkpoint directory to create")
  parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists and is not empty")


def run(args: argparse.Namespace) -> int:
  from converters.export import export_checkpoint  # pylint: disable=import-outside-toplevel

  try:
    path = export_checkpoint(args.ckpt_dir, args.out_dir, overwrite=args.overwrite)
  except (ConversionError, FileExistsError, FileNotFoundError) as error:
    logger.error("%s", error)
    return 1
  print(path)
  return 0
