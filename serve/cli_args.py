"""Command-line options shared by `prism serve` and `prism profile`: model, buckets, budgets, cache."""

from __future__ import annotations

import argparse
import logging

from serve.config import DEFAULT_COMPILATION_CACHE, DEFAULT_TIERS, POLICIES, EngineConfig, bucket_sizes

logger = logging.getLogger(__name__)


def _int_list(text: str) -> tuple[int, ...]:
  try:
    values = tuple(int(v) for v in text.split(",") if v.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,4,8, got {text!r}") from None
  if not values:
    raise argparse.ArgumentTypeError("expected at least one integer")
  return values


def _tier(text: str) -> tuple[str, float]:
  name, sep, value = text.partition("=")
  try:
    fraction = float(value)
  except ValueError:
    fraction = float("nan")
  if not sep or not name or not 0 < fraction <= 1:
    raise argparse.ArgumentTypeError(f"expected NAME=FRACTION with a fraction of the full budget in (0, 1], "
                                     f"such as balanced=0.5; got {text!r}")
  return name, fraction


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("checkpoint", help="prism checkpoint directory (from `prism convert`)")
  parser.add_argument("--partition", help="partition directory (from `prism partition`); without it N=1 and "
                      "budgets are whole experts 1..K")
  parser.add_argument("--backend", default="auto", choices=("auto", "xla", "native", "tiled", "tokamax"),
                      help="grouped-matmul backend (default: auto)")
  group = parser.add_argument_group("offloading (memory-limited devices)")
  group.add_argument("--expert-memory",
                     help="serve in offloading mode with this much fast memory for expert weights: a fraction "
                     "(0.25), a percentage (25%%) or a size (512MB, 2GiB); other experts are read on demand")
  group.add_argument("--offload-dir", help="directory for the offloaded expert files on CPU (default: a temporary "
                     "directory, deleted at exit); reused when it already contains this checkpoint and partition")
  group.add_argument("--offload-granularity", choices=("sub_expert", "expert"), default="sub_expert",
                     help="cache and fetch sub-experts (default) or whole experts")
  group.add_argument("--cache-policy", choices=("lru", "lfu"), default="lru", help="eviction policy (default lru)")
  group.add_argument("--offload-selection", default="exact",
                     help="'exact' runs every sub-expert of the budget (default); 'mass:F' runs resident ones first "
                     "and fetches missing ones until a fraction F of the routing mass runs; 'min:M' until M per token")
  group.add_argument("--no-prefetch", action="store_true", help="do not prefetch the next layer's likely experts")


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
  group = parser.add_argument_group("engine")
  group.add_argument("--batch-buckets", type=_int_list, default=None,
                     help="compiled batch sizes, comma-separated (default 1,4); the largest is the number of "
                     "requests that run at once")
  group.add_argument("--max-batch", type=int, default=None,
                     help="derive batch buckets up to this size: powers of two below 16, then steps of 16")
  group.add_argument("--token-buckets", type=_int_list, default=None,
                     help="compiled prefill chunk lengths in tokens, comma-separated (default 32)")
  group.add_argument("--budgets", type=_int_list, default=None,
                     help="static budgets to compile (default: the full budget and each tier's); other budgets "
                     "run masked in the next larger program")
  group.add_argument("--max-len", type=int, default=None,
                     help="KV-cache positions per request, prompt + completion (default: the model's context)")
  group.add_argument("--max-queue", type=int, default=64, help="waiting requests before HTTP 429 (default 64)")
  group.add_argument("--policy", choices=POLICIES, default="fcfs", help="scheduling policy (default fcfs)")
  group.add_argument("--tier", type=_tier, action="append", default=None, metavar="NAME=FRACTION",
                     help="a quality tier as a fraction of the full budget; repeat for several (default: "
                     + ", ".join(f"{n}={f}" for n, f in DEFAULT_TIERS) + ")")
  group.add_argument("--default-budget", type=int, default=None,
                     help="budget of requests that name neither budget nor tier (default: full budget)")
  group.add_argument("--whole-experts", action="store_true",
                     help="round every budget up to a multiple of N (what the unsplit model offers)")
  group.add_argument("--compilation-cache-dir", default=str(DEFAULT_COMPILATION_CACHE),
                     help="JAX persistent compilation cache directory (default %(default)s)")
  group.add_argument("--no-compilation-cache", action="store_true", help="do not use a persistent compilation cache")
  group.add_argument("--compile-workers", type=int, default=2, help="threads compiling programs (default 2)")


def engine_config(args: argparse.Namespace, **overrides) -> EngineConfig:
  """Build the EngineConfig the flags describe; raises ValueError with the offending value."""
  if args.batch_buckets is not None and args.max_batch is not None:
    raise ValueError("give --batch-buckets or --max-batch, not both")
  batch_buckets = args.batch_buckets
  if args.max_batch is not None:
    batch_buckets = bucket_sizes(args.max_batch, 16)
  values = dict(
      batch_buckets=batch_buckets or EngineConfig.batch_buckets,
      token_buckets=args.token_buckets or EngineConfig.token_buckets,
      budgets=args.budgets,
      max_len=args.max_len,
      max_queue=args.max_queue,
      policy=args.policy,
      tiers=tuple(args.tier) if args.tier else DEFAULT_TIERS,
      default_budget=args.default_budget,
      whole_experts=args.whole_experts,
      compilation_cache_dir=None if args.no_compilation_cache else args.compilation_cache_dir,
      compile_workers=args.compile_workers,
  )
  values.update(overrides)
  return EngineConfig(**values)


def ensure_info_logging() -> None:
  """Show INFO logs (request starts, stops, errors) when the serve CLI runs without `prism`'s setup.

  `prism` configures logging itself; this covers callers that import the CLI module directly.
  """
  root = logging.getLogger()
  if root.level > logging.INFO:
    root.setLevel(logging.INFO)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for handler in root.handlers:
      if handler.formatter is None:
        handler.setFormatter(formatter)


def load_model(args: argparse.Namespace, *, max_batch: int = 1):
  """Load the checkpoint, in offloading mode when --expert-memory is given (raises ValueError on bad settings)."""
  import prism_jax  # pylint: disable=import-outside-toplevel

  # orbax logs every restored item at INFO through absl; keep the serve log readable.
  logging.getLogger("absl").setLevel(logging.WARNING)
  if getattr(args, "expert_memory", None) is None:
    return prism_jax.load(args.checkpoint, args.partition, backend=args.backend)
  from serve.offload import OffloadConfig, Selection, load_offloaded  # pylint: disable=import-outside-toplevel

  offload = OffloadConfig(expert_memory=args.expert_memory, granularity=args.offload_granularity,
                          policy=args.cache_policy, prefetch=not args.no_prefetch,
                          selection=Selection.parse(args.offload_selection), offload_dir=args.offload_dir,
                          max_batch=max_batch)
  return load_offloaded(args.checkpoint, args.partition, offload, backend=args.backend)
