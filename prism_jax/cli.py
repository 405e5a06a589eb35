"""The `prism` command: each subcommand parses its arguments and calls one library function."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

import prism_jax

# Subcommand name -> module that defines `add_arguments(parser)` and `run(args) -> int`.
SUBCOMMANDS = {
    "convert": ("converters.cli_convert", "convert a Hugging Face MoE checkpoint to a prism checkpoint"),
    "export": ("converters.cli_export", "export a prism checkpoint back to Hugging Face format"),
    "partition": ("partition.cli_partition", "split experts into sub-experts (offline refactoring)"),
    "curve": ("partition.cli_curve", "measure quality and cost at every budget (operating points)"),
    "train-reference": ("prism_jax.reference.cli", "train the small reference MoE model from scratch"),
    "demo": ("prism_jax.demo", "run the whole pipeline on the embedded default model"),
    "profile": ("serve.cli_profile", "measure step time per (bucket, budget) for the schedulers"),
    "serve": ("serve.cli_serve", "serve a model over an OpenAI-style HTTP API"),
}


def _available() -> dict[str, tuple[str, str]]:
  found = {}
  for name, (module, help_text) in SUBCOMMANDS.items():
    if importlib.util.find_spec(module.rsplit(".", 1)[0]) is None:
      continue
    try:
      if importlib.util.find_spec(module) is not None:
        found[name] = (module, help_text)
    except ModuleNotFoundError:
      continue
  return found


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, tuple[str, str]]]:
  # No abbreviations: options before the command are checked by exact name in main().
  parser = argparse.ArgumentParser(prog="prism", description="Elastic Mixture-of-Experts serving in JAX.",
                                   allow_abbrev=False)
  parser.add_argument("--version", action="version", version=f"prism-jax {prism_jax.__version__}")
  parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
  subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
  commands = _available()
  for name, (_, help_text) in commands.items():
    # No -h on the stub: `prism NAME --help` must reach the subcommand's own parser below.
    subparsers.add_parser(name, help=help_text, description=help_text, add_help=False)
  return parser, commands


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser, commands = build_parser()
  # Parse the subcommand first, then import only its module to add its arguments.
  known, _ = parser.parse_known_args(argv)
  command_at = argv.index(known.command) if known.command is not None else len(argv)
  unknown = [a for a in argv[:command_at] if a.startswith("-") and a not in ("-v", "--verbose")]
  if unknown:
    parser.error(f"unrecognized option {unknown[0]!r} before the command; options other than -v go after it, "
                 "as in `prism COMMAND --help`")
  if known.command is None:
    parser.print_help()
    return 2
  module = importlib.import_module(commands[known.command][0])
  sub = argparse.ArgumentParser(prog=f"prism {known.command}", description=commands[known.command][1])
  sub.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
  module.add_arguments(sub)
  args = sub.parse_args(argv[command_at + 1:])
  verbose = known.verbose or args.verbose
  level = logging.DEBUG if verbose else logging.INFO
  root = logging.getLogger()
  # Imports may leave absl's handler or an implicit default handler on the root logger, and
  # basicConfig does nothing while one is there. Drop those two kinds and keep the rest (pytest's).
  for handler in list(root.handlers):
    if type(handler).__name__ == "ABSLHandler" or type(handler) is logging.StreamHandler:
      root.removeHandler(handler)
  logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
  root.setLevel(level)
  # orbax logs every save and restore through absl at INFO; keep those at -v only.
  logging.getLogger("absl").setLevel(logging.DEBUG if verbose else logging.WARNING)
  import jax  # pylint: disable=import-outside-toplevel

  logging.getLogger("prism").info("prism-jax %s, jax %s, devices %s", prism_jax.__version__, jax.__version__,
                                  [str(d) for d in jax.devices()])
  return int(module.run(args) or 0)


if __name__ == "__main__":
  sys.exit(main())
