"""`prism serve CKPT --partition DIR`: an OpenAI-style completions server with QoS budgets."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from serve.app import ServerConfig, create_app
from serve.cli_args import add_engine_arguments, add_model_arguments, engine_config, ensure_info_logging, load_model
from serve.engine import Engine
from serve.latency import LatencyTable
from serve.metrics import ServeMetrics
from serve.server import is_loopback, serve_app

logger = logging.getLogger("prism.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  add_model_arguments(parser)
  parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback only)")
  parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
  parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* (visible in the process list; "
                      "prefer --api-key-file)")
  parser.add_argument("--api-key-file", type=Path, help="read the API key from this file")
  parser.add_argument("--model-name", help="model id in requests and responses (default: the checkpoint folder name)")
  parser.add_argument("--latency-table", type=Path,
                      help="step times from `prism profile` (default: time each program at start-up)")
  parser.add_argument("--default-max-tokens", type=int, default=16,
                      help="max_tokens of requests that omit it (default 16, as OpenAI)")
  parser.add_argument("--drain-timeout", type=float, default=30.0,
                      help="seconds open requests get to finish after SIGTERM (default 30)")
  add_engine_arguments(parser)


def _api_key(args: argparse.Namespace) -> str | None:
  if args.api_key and args.api_key_file:
    raise ValueError("give --api-key or --api-key-file, not both")
  if args.api_key_file:
    key = args.api_key_file.read_text().strip()
    if not key:
      raise ValueError(f"API key file {args.api_key_file} is empty")
    return key
  return args.api_key


def run(args: argparse.Namespace) -> int:
  ensure_info_logging()
  try:
    config = engine_config(args)
    api_key = _api_key(args)
    server_config = ServerConfig(model_name=args.model_name or Path(args.checkpoint).resolve().name,
                                 api_key=api_key, default_max_tokens=args.default_max_tokens)
    latency = LatencyTable.load(args.latency_table) if args.latency_table else None
  except (ValueError, OSError) as error:
    print(f"prism serve: {error}", file=sys.stderr)
    return 2
  if not is_loopback(args.host) and api_key is None:
    logger.warning("listening on %s without an API key: anyone who can reach this address can use the model; "
                   "set --api-key-file", args.host)

  try:
    model = load_model(args, max_batch=config.max_batch)
  except (ValueError, FileNotFoundError) as error:
    print(f"prism serve: {error}", file=sys.stderr)
    return 2
  if latency is not None and latency.meta.get("fingerprint") not in (None, model.fingerprint):
    logger.warning("latency table %s was measured on checkpoint %s, not %s; predictions may be off",
                   args.latency_table, latency.meta.get("fingerprint"), model.fingerprint)
  metrics = ServeMetrics()
  try:
    engine = Engine.from_model(model, config, latency=latency, observer=metrics).start()
  except ValueError as error:
    print(f"prism serve: {error}", file=sys.stderr)
    return 2
  app = create_app(engine, server_config, metrics)
  try:
    serve_app(app, engine, host=args.host, port=args.port, drain_timeout=args.drain_timeout)
  except OSError as error:
    engine.stop(drain=False)
    print(f"prism serve: {error}", file=sys.stderr)
    return 1
  finally:
    if hasattr(model, "close"):  # an OffloadedModel: stop its prefetch thread, delete a temporary offload dir
      model.close()
  logger.info("server stopped cleanly")
  return 0
