"""`prism convert HF_DIR OUT_DIR`: Hugging Face MoE checkpoint -> prism checkpoint."""

from __future__ import annotations

import argparse
import logging

from converters.errors import ConversionError
from converters.registry import FAMILIES

logger = logging.getLogger("prism.convert")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("hf_dir", help="Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer)")
  parser.add_argument("out_dir", help="prism checkpoint directory to create")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="weight dtype of the output (default float32, the fast choice on CPU)")
  parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists and is not empty")
  parser.epilog = f"supported model types: {', '.join(sorted(FAMILIES))}"


def run(args: argparse.Namespace) -> int:
  from converters.convert import convert_checkpoint  # pylint: disable=import-outside-toplevel

  try:
    path = convert_checkpoint(args.hf_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite)
  except (ConversionError, FileExistsError, FileNotFoundError) as error:
    logger.error("%s", error)
    return 1
  print(path)
  return 0
