"""`prism train-reference`: train the small reference MoE from scratch and export it."""

from __future__ import annotations

import argparse
from pathlib import Path

from prism_jax.reference import data as text_data
from prism_jax.reference.pipeline import RunSpec, run as run_pipeline
from prism_jax.reference.recipe import VOCAB_SIZE, TrainConfig



def add_arguments(parser: argparse.ArgumentParser) -> None:
  defaults = TrainConfig()
  parser.add_argument("--out", type=Path, help="output directory of the Hugging Face-format model")
  parser.add_argument("--text", type=Path, default=None,
                      help="training text (.txt, .gz or .xz; documents separated by blank lines); "
                           "default: the shipped King James Bible training split")
  parser.add_argument("--eval-text", type=Path, default=None,
                      help="held-out text in the same format; default: the shipped eval split")
  parser.add_argument("--work", type=Path, default=Path("runs/reference"),
                      help="directory for the tokenizer, training checkpoints and log; a rerun resumes from it")
  parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE, help="BPE vocabulary size")
  parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of weights and batch sampling")
  parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps")
  parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="windows per step")
  parser.add_argument("--seq-len", type=int, default=defaults.seq_len, help="tokens per window")
  parser.add_argument("--lr", type=float, default=defaults.peak_learning_rate, help="peak learning rate")
  parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps, help="linear warmup steps")
  parser.add_argument("--load-balance-weight", type=float, default=defaults.load_balance_weight,
                      help="weight of the router load-balancing loss")
  parser.add_argument("--eval-every", type=int, default=defaults.eval_every, help="steps between held-out loss evaluations")
  parser.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every,
                      help="steps between training checkpoints")
  parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
  parser.add_argument("--prepare-text", action="store_true",
                      help="only rebuild the shipped text splits from the Debian package bible-kjv-text, then exit")


def run(args: argparse.Namespace) -> int:
  if args.prepare_text:
    paths = text_data.write_splits(text_data.read_debian_bible())
    for split, path in paths.items():
      print(f"{split}: {path}")
    return 0
  if args.out is None:
    raise SystemExit("prism train-reference: --out is required (the directory to write the model to)")
  train_config = TrainConfig(
      seed=args.seed,
      steps=args.steps,
      batch_size=args.batch_size,
      seq_len=args.seq_len,
      peak_learning_rate=args.lr,
      warmup_steps=args.warmup_steps,
      load_balance_weight=args.load_balance_weight,
      eval_every=args.eval_every,
      checkpoint_every=args.checkpoint_every,
  )
  spec = RunSpec(train_text=args.text, eval_text=args.eval_text, work_dir=args.work, out_dir=args.out,
                 vocab_size=args.vocab_size, train=train_config, overwrite=args.overwrite)
  out = run_pipeline(spec)
  print(f"model written to {out}")
  return 0
