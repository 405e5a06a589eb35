"""`prism demo`: the whole pipeline on the embedded reference model.

Steps, each written into its own folder under --out and skipped when already complete:
convert (Hugging Face format -> prism checkpoint), partition (evosax search on the
calibration split), curve (every budget and every top-k on the held-out split), and
serve (a few prompts through `serve.Engine` at three budgets).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

logger = logging.getLogger(__name__)

PROMPTS = (
    "In the beginning",
    "And the LORD said unto Moses,",
    "Blessed are they that",
)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  """Sizes of the demo: small enough for a few minutes on two CPU cores."""

  out: Path = Path("prism-demo")
  num_sub_experts: int = 4
  calib_tokens: int = 32768
  eval_tokens: int = 8192
  sequence_length: int = 256
  max_new_tokens: int = 24
  tolerance: float = 1.25
  seed: int = 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
  defaults = DemoConfig()
  parser.add_argument("--out", type=Path, default=defaults.out,
                      help=f"working directory; completed steps in it are reused (default {defaults.out})")
  parser.add_argument("--num-sub-experts", type=int, default=defaults.num_sub_experts,
                      help=f"sub-experts per expert, N (default {defaults.num_sub_experts})")
  parser.add_argument("--calib-tokens", type=int, default=defaults.calib_tokens,
                      help=f"calibration tokens for the partition search (default {defaults.calib_tokens})")
  parser.add_argument("--eval-tokens", type=int, default=defaults.eval_tokens,
                      help=f"held-out tokens per operating point (default {defaults.eval_tokens})")
  parser.add_argument("--tolerance", type=float, default=defaults.tolerance,
                      help="stable points: perplexity within this factor of the full model (default 1.25)")
  parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the search and sampling")


SETTINGS_FILE = "demo_settings.json"


def _reusable(folder: Path, marker: str, settings: dict) -> bool:
  """True when `folder` contains a completed step that was run with the same settings.

  A completed step run with other settings is removed so that it is computed again.
  """
  if not (folder / marker).is_file():
    return False
  stored = folder / SETTINGS_FILE
  if stored.is_file() and json.loads(stored.read_text()) == settings:
    return True
  logger.info("%s was made with other settings; computing it again", folder)
  shutil.rmtree(folder)
  return False


def _record(folder: Path, settings: dict) -> None:
  (folder / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))


def _convert(config: DemoConfig) -> Path:
  from converters import convert_checkpoint  # pylint: disable=import-outside-toplevel
  from prism_jax.reference import default_model_dir  # pylint: disable=import-outside-toplevel

  path = config.out / "checkpoint"
  if (path / "prism.json").is_file():
    logger.info("step 1/4 convert: reusing %s", path)
    return path
  logger.info("step 1/4 convert: %s -> %s", default_model_dir(), path)
  return convert_checkpoint(default_model_dir(), path, overwrite=True)


def _partition(config: DemoConfig, model) -> Path:
  from partition import PartitionConfig, ProfileConfig, build_partition  # pylint: disable=import-outside-toplevel
  from partition.calibration import encode_text  # pylint: disable=import-outside-toplevel
  from prism_jax.partition_io import write_partition  # pylint: disable=import-outside-toplevel
  from prism_jax.reference import default_text  # pylint: disable=import-outside-toplevel

  path = config.out / "partition"
  settings = {"num_sub_experts": config.num_sub_experts, "calib_tokens": config.calib_tokens,
              "sequence_length": config.sequence_length, "seed": config.seed}
  if _reusable(path, "partition.json", settings):
    logger.info("step 2/4 partition: reusing %s", path)
    return path
  logger.info("step 2/4 partition: evosax search, N=%d, %d calibration tokens", config.num_sub_experts,
              config.calib_tokens)
  ids = encode_text(default_text("calibration"), model.tokenizer)
  partition_config = PartitionConfig(
      num_sub_experts=config.num_sub_experts, solver="evosax", seed=config.seed,
      profile=ProfileConfig(sequence_length=config.sequence_length, max_tokens=config.calib_tokens, seed=config.seed))
  partition, summary = build_partition(model, ids, partition_config, calibration_source="shipped calibration split")
  write_partition(path, partition, summary, overwrite=True)
  _record(path, settings)
  return path


def _curve(config: DemoConfig, model, partitioned) -> dict:
  from partition import CurveConfig, measure_curve, plot_curve  # pylint: disable=import-outside-toplevel
  from partition.calibration import encode_text  # pylint: disable=import-outside-toplevel
  from prism_jax.reference import default_text  # pylint: disable=import-outside-toplevel

  folder = config.out / "curve"
  result_file = folder / "curve.json"
  settings = {"partition": partitioned.partition.fingerprint, "num_sub_experts": partitioned.num_sub_experts,
              "partition_mtime": (config.out / "partition" / "tensors.npz").stat().st_mtime,
              "eval_tokens": config.eval_tokens, "tolerance": config.tolerance,
              "sequence_length": config.sequence_length}
  if _reusable(folder, "curve.json", settings) and (folder / "curve.png").is_file():
    logger.info("step 3/4 curve: reusing %s", result_file)
    return json.loads(result_file.read_text())
  logger.info("step 3/4 curve: %d budgets and %d top-k settings on %d held-out tokens", partitioned.full_budget,
              model.config.num_experts_per_tok, config.eval_tokens)
  ids = encode_text(default_text("eval"), model.tokenizer)
  curve = measure_curve(model, partitioned, ids, CurveConfig(tolerance=config.tolerance,
                                                             sequence_length=config.sequence_length,
                                                             max_tokens=config.eval_tokens, timing_repeats=3))
  folder.mkdir(parents=True, exist_ok=True)
  plot_curve(curve, folder / "curve.png")
  tmp = result_file.with_suffix(".json.partial")
  tmp.write_text(json.dumps(curve.to_dict(), indent=2))
  _record(folder, settings)
  tmp.replace(result_file)
  return curve.to_dict()


def _serve(config: DemoConfig, partitioned) -> list[tuple[int, str, str, float]]:
  from serve import Engine, EngineConfig, QoS, SamplingParams  # pylint: disable=import-outside-toplevel

  full = partitioned.full_budget
  budgets = sorted({max(1, full // 4), full // 2, full})
  logger.info("step 4/4 serve: %d prompts at budgets %s through serve.Engine", len(PROMPTS), budgets)
  # One compiled budget (the full one): each row is masked to its own budget inside the batch,
  # so three budgets share batches and only two programs (prefill and decode) are compiled.
  engine_config = EngineConfig(batch_buckets=(4,), token_buckets=(16,), budgets=(full,), policy="per_row",
                               max_len=64, profile_repeats=0, seed=config.seed)
  engine = Engine.from_model(partitioned, engine_config).start()
  rows = []
  try:
    handles = []
    for budget in budgets:
      for prompt in PROMPTS:
        ids = partitioned.tokenizer.encode(prompt).ids
        if partitioned.config.bos_token_id is not None:
          ids = [partitioned.config.bos_token_id] + ids
        handle = engine.submit(ids, SamplingParams(max_tokens=config.max_new_tokens), QoS(budget=budget))
        handles.append((budget, prompt, handle))
    for budget, prompt, handle in handles:
      done = handle.result()
      rows.append((budget, prompt, done.text or "", done.ttft_s or 0.0))
  finally:
    engine.stop()
  return rows


def run_demo(config: DemoConfig) -> dict:
  """Run (or resume) every step; returns the curve dictionary and the completions."""
  import prism_jax  # pylint: disable=import-outside-toplevel

  start = time.perf_counter()
  config.out.mkdir(parents=True, exist_ok=True)
  checkpoint = _convert(config)
  model = prism_jax.load(checkpoint)
  partition_dir = _partition(config, model)
  partitioned = prism_jax.load(checkpoint, partition=partition_dir)
  curve = _curve(config, model, partitioned)
  completions = _serve(config, partitioned)
  return {"curve": curve, "completions": completions, "seconds": time.perf_counter() - start,
          "curve_png": config.out / "curve" / "curve.png"}


def _print_report(result: dict, num_sub_experts: int) -> None:
  curve = result["curve"]
  print("\nOperating points (held-out perplexity, agreement with the full model's greedy tokens, cost):")
  print(f"{'kind':>6} {'k':>4} {'perplexity':>11} {'agreement':>9} {'MFLOP/token':>12} {'ms/batch':>9} stable")
  for p in curve["points"]:
    print(f"{p['kind']:>6} {p['k']:>4} {p['perplexity']:>11.2f} {p['agreement']:>9.3f} "
          f"{p['flops_per_token'] / 1e6:>12.3f} {p['seconds'] * 1e3:>9.1f} {'yes' if p['stable'] else ''}")
  counts = curve["stable_counts"]
  ratio = counts["budget"] / counts["top_k"] if counts["top_k"] else float("inf")
  print(f"\nstable operating points (perplexity within {curve['tolerance']}x of the full model, not dominated): "
        f"sub-expert budgets {counts['budget']}, top-k {counts['top_k']}, ratio {ratio:.1f}x")
  print(f"\nSample completions (greedy, N={num_sub_experts}):")
  for budget, prompt, text, ttft in result["completions"]:
    print(f"  budget {budget:>2}  TTFT {ttft * 1e3:6.0f} ms  {prompt!r} -> {text!r}")
  print(f"\ncurve plot: {result['curve_png']}")
  print(f"total time: {result['seconds']:.0f} s")


def run(args: argparse.Namespace) -> int:
  config = DemoConfig(out=args.out, num_sub_experts=args.num_sub_experts, calib_tokens=args.calib_tokens,
                      eval_tokens=args.eval_tokens, tolerance=args.tolerance, seed=args.seed)
  try:
    result = run_demo(config)
  except (ValueError, FileNotFoundError) as error:
    logger.error("demo failed: %s", error)
    return 1
  _print_report(result, config.num_sub_experts)
  return 0
