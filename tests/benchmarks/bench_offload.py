"""Offloading benchmark: decode latency with a fraction of the expert weights resident.

Run from the repository root:
  python -m tests.benchmarks.bench_offload [--quick] [--checkpoint DIR --partition DIR]

Without --checkpoint it writes a random-weight model (D=512, E=16, K=4, F=1024, N=4, 4
layers) and a random partition to a temporary directory. For each expert-memory budget
(default 25% and 50% of all expert bytes) it decodes the same held-out token sequence,
teacher-forced, one token per step, under:

- whole-expert offloading (whole experts cached and fetched, --policy LRU by default): the baseline;
- sub-expert offloading with exact selection (same outputs as the resident model);
- sub-expert offloading, resident first, for each --tolerances value (minimum fraction of
  the routing mass that must run) and each --min-sub-experts floor;

at the full budget and at each --budgets value. Whole-expert and exact sub-expert runs at
the same budget compute the same outputs, so they compare at equal quality. Settings run
in round-robin order, --repeats times each, and the median run of each is reported.

After each table, every sub-expert run is compared with whole-expert top-k offloading at the
same held-out perplexity (latency interpolated between the top-k budgets measured, so pass
budgets that are multiples of N in --budgets).

Columns: per-token latency, hit rate, bytes fetched, stall time, bytes the prefetcher read
for nothing, sub-experts run, routing mass covered, and held-out perplexity (relative to
exact selection at the same budget, whose outputs equal the resident model's). The
resident model's latency, with every expert on the device, comes first. The held-out text
is the packaged eval text through the checkpoint tokenizer, or random token ids when there
is no tokenizer. With a random-weight model, perplexity only shows that outputs changed.
The slow tier is the page cache or the disk: `--cold start` drops the offload files from
the page cache before each run (and reports whether that took effect), `--cold step` before
every decode step (every miss then reads the block device).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import importlib.resources
import platform
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from prism_jax.checkpoint import load_params, read_meta, save_params
from prism_jax.config import ModelConfig, SubExpertConfig
from prism_jax.model import PrismModel, apply_partition, load_tokenizer
from prism_jax.partition_io import read_partition, write_partition
from prism_jax.subexperts import LayerPartition, Partition
from prism_jax.testing import random_params
from serve.offload import OffloadConfig, OffloadedModel, Selection
from serve.offload.memory import format_bytes
from serve.offload.store import weights_digest


@dataclasses.dataclass(frozen=True)
class Run:
  """One measured configuration."""

  name: str
  granularity: str
  budget: int
  selection: Selection
  step_seconds: list[float]
  nll: float
  agreement: float | None
  stats: object
  residency_after_drop: float | None


def random_checkpoint(root: Path, seed: int, scale: float) -> tuple[Path, Path]:
  config = ModelConfig(family="qwen3_moe", vocab_size=1024, hidden_size=512, num_layers=4, num_heads=8,
                       num_kv_heads=4, head_dim=64, num_experts=16, num_experts_per_tok=4,
                       moe_intermediate_size=1024, qk_norm="head", max_position_embeddings=4096)
  checkpoint = save_params(root / "checkpoint", config, random_params(config, seed, scale=scale),
                           source=f"random seed {seed}, scale {scale}")
  rng = np.random.default_rng(seed)
  n, e, f = 4, config.num_experts, config.moe_intermediate_size
  layers = {}
  for i in config.moe_layer_indices:
    perm = np.stack([rng.permutation(f) for _ in range(e)]).astype(np.int32)
    core = np.stack([[rng.choice(f // n, 4, replace=False) for _ in range(n)] for _ in range(e)]).astype(np.int32)
    layers[i] = LayerPartition(perm, core)
  fingerprint = read_meta(checkpoint)[1]["fingerprint"]
  partition = write_partition(root / "partition", Partition(n, "compound", layers, fingerprint), {"solver": "random"})
  return checkpoint, partition


def held_out_tokens(tokenizer, vocab_size: int, count: int, seed: int) -> np.ndarray:
  if tokenizer is not None:
    text_file = importlib.resources.files("prism_jax") / "data" / "text" / "eval.txt.gz"
    text = gzip.decompress(text_file.read_bytes()).decode()
    ids = tokenizer.encode(text[:count * 20]).ids
    if len(ids) >= count:
      return np.asarray(ids[:count], np.int32)
  return np.random.default_rng(seed).integers(1, vocab_size, count).astype(np.int32)


def decode(model, tokens_BL: np.ndarray, prompt: int, budget: int, cold_steps: bool, steps: int | None = None):
  """Prefill `prompt` tokens, then feed the rest one per step; returns (step seconds, log-probs, argmaxes).

  The KV cache always spans the whole sequence, so a short warm-up run (`steps`) compiles the
  same shapes as the measured one.
  """
  batch, length = tokens_BL.shape
  end = length if steps is None else prompt + steps
  out = model.forward(tokens_BL[:, :prompt], budget=budget, cache=model.init_cache(batch, length))
  logits = np.asarray(out.logits_BTV[:, -1])
  cache = out.cache
  seconds, logprobs, argmaxes = [], [], []
  for position in range(prompt, end):
    target = tokens_BL[:, position]
    logprobs.append(np.asarray(jax.nn.log_softmax(logits))[np.arange(batch), target])
    argmaxes.append(np.argmax(logits, axis=-1))
    if cold_steps:
      model.tier.drop_page_cache()
    start = time.perf_counter()
    out = model.forward(target[:, None], budget=budget, positions_BT=np.full((batch, 1), position, np.int32),
                        cache=cache)
    logits = np.asarray(out.logits_BTV[:, 0])  # waits for the step
    seconds.append(time.perf_counter() - start)
    cache = out.cache
  return seconds, np.stack(logprobs, 1), np.stack(argmaxes, 1)


@dataclasses.dataclass
class Loaded:
  """A checkpoint read once: expert-layout params for the resident model, sub-expert params for offloading."""

  config: ModelConfig
  raw_params: dict
  params: dict
  partition: Partition
  sub: SubExpertConfig
  digest: str
  tokenizer: object

  def offloaded(self, offload: OffloadConfig) -> OffloadedModel:
    return OffloadedModel(self.config, self.params, self.sub, offload, digest=self.digest, tokenizer=self.tokenizer)

  def resident(self) -> PrismModel:
    return PrismModel(self.config, self.raw_params, partition=self.partition, tokenizer=self.tokenizer)


def load(args) -> Loaded:
  config, raw_params, meta = load_params(args.checkpoint)
  partition = read_partition(args.partition)
  if partition.fingerprint != meta["fingerprint"]:
    raise SystemExit(f"partition {args.partition} was built for checkpoint {partition.fingerprint}, not "
                     f"{meta['fingerprint']}")
  sub = SubExpertConfig(partition.num_sub_experts, partition.router, partition.num_core_neurons)
  params = apply_partition(config, raw_params, partition)
  digest = weights_digest(config, sub, params["layers"], meta["fingerprint"])
  return Loaded(config, raw_params, params, partition, sub, digest, load_tokenizer(args.checkpoint))


@dataclasses.dataclass(frozen=True)
class Setting:
  """One offloading configuration to measure."""

  name: str
  granularity: str
  budget: int
  selection: Selection


def run_once(args, loaded, setting: Setting, fraction: float, tokens_BL):
  """Decode the held-out tokens once from an empty cache; returns (seconds, log-probs, argmaxes, stats, residency)."""
  offload = OffloadConfig(expert_memory=fraction, granularity=setting.granularity, policy=args.policy,
                          prefetch=not args.no_prefetch, selection=setting.selection,
                          offload_dir=str(args.offload_dir), max_batch=args.batch)
  model = loaded.offloaded(offload)
  try:
    decode(model, tokens_BL, args.prompt, setting.budget, False, steps=2)  # compile, then start cold
    model.clear_cache()
    model.reset_stats()
    residency = model.tier.drop_page_cache() if args.cold != "none" else None
    seconds, logprobs, argmaxes = decode(model, tokens_BL, args.prompt, setting.budget, args.cold == "step")
    return seconds, logprobs, argmaxes, model.stats(), residency
  finally:
    model.close()


def measure(args, loaded, settings: list[Setting], fraction: float, tokens_BL) -> list[Run]:
  """Run every setting `repeats` times in round-robin order and keep each setting's median run.

  Round robin spreads drifting machine load over all settings alike. Every run decodes the
  same tokens from an empty cache, so only the timings differ between repeats.
  """
  samples = {setting: [] for setting in settings}
  for _ in range(args.repeats):
    for setting in settings:
      samples[setting].append(run_once(args, loaded, setting, fraction, tokens_BL))
  chosen = {s: sorted(runs, key=lambda r: statistics.mean(r[0]))[len(runs) // 2] for s, runs in samples.items()}
  exact_argmax = {s.budget: chosen[s][2] for s in settings if s.granularity == "sub_expert" and
                  s.selection.mode == "exact"}
  results = []
  for setting in settings:
    seconds, logprobs, argmaxes, stats, residency = chosen[setting]
    reference = exact_argmax.get(setting.budget)
    is_exact = setting.granularity == "sub_expert" and setting.selection.mode == "exact"
    agreement = None if reference is None or is_exact else float(np.mean(argmaxes == reference))
    results.append(Run(setting.name, setting.granularity, setting.budget, setting.selection, seconds,
                       float(-np.mean(logprobs)), agreement, stats, residency))
  return results


def resident_latency(model, args, tokens_BL, budget) -> float:
  decode(model, tokens_BL, args.prompt, budget, False, steps=2)
  runs = [statistics.mean(decode(model, tokens_BL, args.prompt, budget, False)[0]) for _ in range(args.repeats)]
  return statistics.median(runs)


def print_table(runs: list[Run], batch: int, exact_nll: dict[int, float]) -> None:
  header = (f"{'configuration':<28} {'budget':>6} {'ms/token':>8} {'p90 ms':>7} {'hit %':>6} {'MB/token':>8} "
            f"{'stall ms/tok':>12} {'wasted MB/tok':>13} {'sub-exp/tok':>11} {'mass %':>6} {'ppl':>9} {'ppl/exact':>9} "
            f"{'agree %':>7}")
  print(header)
  for run in runs:
    steps = sorted(run.step_seconds)
    per_token = statistics.mean(steps) / batch
    p90 = steps[int(0.9 * (len(steps) - 1))] / batch
    stats = run.stats
    ppl, ppl_exact = np.exp(run.nll), np.exp(exact_nll[run.budget])
    agree = "-" if run.agreement is None else f"{run.agreement:7.1%}"
    print(f"{run.name:<28} {run.budget:6d} {per_token * 1e3:8.2f} {p90 * 1e3:7.2f} {stats.hit_rate:6.1%} "
          f"{stats.bytes_per_token / 1e6:8.2f} {stats.stall_s_per_token * 1e3:12.2f} "
          f"{stats.prefetch_wasted_bytes / max(stats.tokens, 1) / 1e6:13.2f} "
          f"{stats.sub_experts_per_token:11.2f} {stats.mass_coverage:6.1%} {ppl:9.3f} {ppl / ppl_exact:9.4f} "
          f"{agree:>7}")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", type=Path, help="prism checkpoint (default: write a random-weight model)")
  parser.add_argument("--partition", type=Path, help="partition directory of the checkpoint")
  parser.add_argument("--offload-dir", type=Path, help="where the expert files go (default: a temporary directory)")
  parser.add_argument("--memory", default="0.25,0.5",
                      help="expert-memory fractions, comma-separated (default 0.25,0.5)")
  parser.add_argument("--budgets", default="", help="budgets below the full one to measure too, comma-separated "
                      "(default: three quarters of the full budget)")
  parser.add_argument("--tolerances", default="0.9,0.75", help="resident-first minimum routing-mass fractions")
  parser.add_argument("--min-sub-experts", default="", help="resident-first floors in sub-experts per token")
  parser.add_argument("--tokens", type=int, default=96, help="decode steps per run (default 96)")
  parser.add_argument("--prompt", type=int, default=16, help="prefill tokens before decoding (default 16)")
  parser.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
  parser.add_argument("--repeats", type=int, default=3,
                      help="runs per configuration, each from an empty cache; the median run is reported (default 3)")
  parser.add_argument("--policy", default="lru", choices=("lru", "lfu"), help="eviction policy (default lru)")
  parser.add_argument("--no-prefetch", action="store_true", help="turn next-layer prefetching off")
  parser.add_argument("--cold", default="start", choices=("none", "start", "step"),
                      help="drop the offload files from the page cache before each run or each step (default start)")
  parser.add_argument("--weight-scale", type=float, default=2.0, help="scale of the random model's weights")
  parser.add_argument("--no-resident", action="store_true",
                      help="skip the fully resident model's latency (for checkpoints too large to hold)")
  parser.add_argument("--quick", action="store_true", help="32 decode steps, one tolerance, one repeat")
  args = parser.parse_args()
  if args.quick:
    args.tokens, args.tolerances, args.repeats = 32, args.tolerances.split(",")[0], 1

  with tempfile.TemporaryDirectory(prefix="bench-offload-") as scratch:
    scratch = Path(scratch)
    args.random_weights = args.checkpoint is None
    if args.random_weights:
      args.checkpoint, args.partition = random_checkpoint(scratch, seed=0, scale=args.weight_scale)
    args.offload_dir = args.offload_dir or scratch / "offload"
    run_all(args)


def describe(args, loaded: Loaded) -> int:
  """Print the machine and model, write the offload files once; return the full budget."""
  print(f"machine: {platform.machine()}, {jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}")
  config = loaded.config
  probe = loaded.offloaded(OffloadConfig(expert_memory=1.0, max_batch=args.batch, offload_dir=str(args.offload_dir)))
  print(f"model: {args.checkpoint} ({config.family}, D={config.hidden_size}, E={config.num_experts}, "
        f"K={config.num_experts_per_tok}, F={config.moe_intermediate_size}, N={probe.num_sub_experts}, "
        f"{len(config.moe_layer_indices)} MoE layers); expert weights {format_bytes(probe.plan.total_bytes)}, "
        f"resident weights {format_bytes(probe.resident_bytes())}")
  full = probe.full_budget
  probe.close()
  return full


def measure_fraction(args, loaded, fraction, budgets, tokens_BL) -> None:
  """Measure every configuration at one expert-memory fraction and print the table and ratios."""
  print(f"\nexpert memory {fraction:.0%} of the expert weights")
  tolerances = [float(t) for t in args.tolerances.split(",") if t]
  floors = [int(m) for m in args.min_sub_experts.split(",") if m]
  settings = []
  for budget in budgets:
    settings += [Setting("whole-expert (baseline)", "expert", budget, Selection()),
                 Setting("sub-expert, exact", "sub_expert", budget, Selection())]
    settings += [Setting(f"sub-expert, mass >= {t:g}", "sub_expert", budget, Selection("resident_first", min_mass=t))
                 for t in tolerances]
    settings += [Setting(f"sub-expert, >= {m} per token", "sub_expert", budget,
                         Selection("resident_first", min_sub_experts=m)) for m in floors]
  runs = measure(args, loaded, settings, fraction, tokens_BL)
  exact_nll = {r.budget: r.nll for r in runs if r.granularity == "sub_expert" and r.selection.mode == "exact"}
  print_table(runs, args.batch, exact_nll)

  drops = [r.residency_after_drop for r in runs if r.residency_after_drop is not None]
  if drops:
    effect = "took effect" if max(drops) < 0.05 else "did not fully take effect"
    print(f"page cache after dropping: at most {max(drops):.1%} of the offload files still cached ({effect})")
  if args.random_weights:
    print("no equal-perplexity comparison: the built-in model has random weights (pass --checkpoint)")
  else:
    equal_quality_table(runs, loaded.sub.num_sub_experts, args.batch)
  for budget in budgets:
    same = [r for r in runs if r.budget == budget]
    base = statistics.mean(same[0].step_seconds)
    for run in same[1:]:
      latency = statistics.mean(run.step_seconds) / base
      fetched = run.stats.bytes_fetched / max(same[0].stats.bytes_fetched, 1)
      print(f"  budget {budget}: {run.name} / whole-expert: latency {latency:.3f}, bytes fetched {fetched:.3f}")


def equal_quality_table(runs: list[Run], n: int, batch: int) -> None:
  """Compare each sub-expert run with whole-expert top-k offloading at the same held-out perplexity.

  Whole-expert runs at budgets that are multiples of N are plain top-k (what existing offloading
  systems offer). Their (perplexity, latency) points form a curve, and a sub-expert run whose
  perplexity lies inside the curve's range is compared with the latency interpolated linearly at
  that perplexity.
  """
  top_k = sorted((r.budget, float(np.exp(r.nll)), statistics.mean(r.step_seconds) / batch) for r in runs
                 if r.granularity == "expert" and r.budget % n == 0)
  if len(top_k) < 2:
    return
  if any(later[1] >= earlier[1] for earlier, later in zip(top_k, top_k[1:])):
    print("no equal-perplexity comparison: top-k perplexity does not fall as k grows (random weights?)")
    return
  curve = sorted((ppl, seconds) for _, ppl, seconds in top_k)
  ppl_points, latency_points = zip(*curve)
  print(f"at equal held-out perplexity, against whole-expert top-k offloading (top-k points: "
        f"{', '.join(f'{p:.3f} ppl {t * 1e3:.2f} ms' for p, t in curve)}):")
  for run in runs:
    ppl = float(np.exp(run.nll))
    if run.granularity != "sub_expert" or not ppl_points[0] <= ppl <= ppl_points[-1]:
      continue
    baseline = float(np.interp(ppl, ppl_points, latency_points))
    latency = statistics.mean(run.step_seconds) / batch
    print(f"  budget {run.budget:3d} {run.name:<28} ppl {ppl:8.3f}: {latency * 1e3:7.2f} ms against "
          f"{baseline * 1e3:7.2f} ms, ratio {latency / baseline:.3f}")


def run_all(args):
  loaded = load(args)
  full = describe(args, loaded)
  length = args.prompt + args.tokens
  tokens_BL = held_out_tokens(loaded.tokenizer, loaded.config.vocab_size, args.batch * length, seed=3)
  tokens_BL = tokens_BL.reshape(args.batch, length)
  print(f"held-out text: {'tokenized eval text' if loaded.tokenizer is not None else 'random token ids'}, "
        f"{args.batch} x ({args.prompt} prompt + {args.tokens} decoded) tokens, prefetch "
        f"{'off' if args.no_prefetch else 'on'}, policy {args.policy}, page cache dropped: {args.cold}, "
        f"{args.repeats} repeats")
  budgets = [full] + ([int(b) for b in args.budgets.split(",") if b] or [3 * full // 4])

  if not args.no_resident:
    resident = loaded.resident()
    for budget in budgets:
      seconds = resident_latency(resident, args, tokens_BL, budget)
      print(f"resident model (every expert on the device), budget {budget}: {seconds / args.batch * 1e3:.2f} ms/token")
    del resident
  for fraction in (float(f) for f in args.memory.split(",")):
    measure_fraction(args, loaded, fraction, budgets, tokens_BL)


if __name__ == "__main__":
  main()
