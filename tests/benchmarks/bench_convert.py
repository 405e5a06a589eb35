"""Converter benchmark: conversion throughput and memory, then our model against transformers.

Run from the repository root: python -m tests.benchmarks.bench_convert [--quick]
The script builds one tiny-but-not-trivial random Qwen3-MoE checkpoint and converts it in a
child process that measures its peak RSS increase. It then times prefill and decode of the
converted model (jitted, after warm-up) and of the transformers reference (float32, with 2
and with 1 torch threads) side by side in this one run.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIZES = {
    "full": dict(hidden_size=384, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=48,
                 num_experts=16, num_experts_per_tok=2, moe_intermediate_size=768, vocab_size=4096),
    "quick": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256, vocab_size=1024),
}


def read_status_kib(field: str) -> int:
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith(field + ":"):
      return int(line.split()[1])
  raise RuntimeError(f"/proc/self/status has no {field} line")


def rss_child(hf_dir: str, out_dir: str) -> None:
  """Convert once to warm up imports and orbax, reset the peak RSS, convert again, print JSON."""
  from converters import convert_checkpoint  # pylint: disable=import-outside-toplevel

  convert_checkpoint(hf_dir, out_dir, overwrite=True)
  gc.collect()
  Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
  baseline = read_status_kib("VmRSS")
  start = time.perf_counter()
  convert_checkpoint(hf_dir, out_dir, overwrite=True)
  seconds = time.perf_counter() - start
  print(json.dumps({"seconds": seconds, "baseline_kib": baseline, "peak_kib": read_status_kib("VmHWM")}))


def build_checkpoint(root: Path, sizes: dict) -> tuple[object, Path]:
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM  # pylint: disable=import-outside-toplevel

  torch.manual_seed(0)
  config = Qwen3MoeConfig(intermediate_size=512, max_position_embeddings=2048, initializer_range=0.05,
                          norm_topk_prob=True, **sizes)
  model = Qwen3MoeForCausalLM(config).eval()
  hf_dir = root / "hf"
  model.save_pretrained(hf_dir)
  return model, hf_dir


def conversion_figures(hf_dir: Path, out_dir: Path) -> None:
  from converters import plan_conversion  # pylint: disable=import-outside-toplevel

  plan = plan_conversion(hf_dir)
  source_bytes = sum(p.stat().st_size for p in hf_dir.glob("*.safetensors"))
  largest_tensor = max(math.prod(shape) * 4 for item in plan.shapes.values() for shape in item.values())
  layer_experts = max(sum(math.prod(shape) * 4 for path, shape in item.items() if path in ("mlp.gate", "mlp.up",
                                                                                              "mlp.down"))
                      for item in plan.shapes.values())
  result = subprocess.run([sys.executable, "-m", "tests.benchmarks.bench_convert", "--rss-child", str(hf_dir),
                           str(out_dir)], check=True, capture_output=True, text=True)
  figures = json.loads(result.stdout.strip().splitlines()[-1])
  increase = (figures["peak_kib"] - figures["baseline_kib"]) * 1024
  mib = 1 << 20
  print(f"\n(1) conversion of {source_bytes / mib:.1f} MiB of safetensors ({len(plan.tensors)} tensors, "
        f"{plan.config.num_layers} layers)")
  print(f"  time {figures['seconds']:.2f} s, throughput {source_bytes / mib / figures['seconds']:.1f} MiB/s")
  print(f"  peak RSS increase {increase / mib:.1f} MiB")
  print(f"  largest output tensor [E, D, F] {largest_tensor / mib:.1f} MiB: ratio {increase / largest_tensor:.2f}x")
  print(f"  one layer's expert block (gate + up + down) {layer_experts / mib:.1f} MiB: "
        f"ratio {increase / layer_experts:.2f}x (target < 3x)")


def speed_figures(reference, ckpt_dir: Path, prefill_tokens: int, prompt: int, decode_steps: int,
                  batch: int, repeats: int) -> None:
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import DynamicCache  # pylint: disable=import-outside-toplevel

  import prism_jax  # pylint: disable=import-outside-toplevel
  from tests.benchmarks.timing import median_seconds  # pylint: disable=import-outside-toplevel

  model = prism_jax.load(ckpt_dir)
  vocab = model.config.vocab_size
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab, (1, prefill_tokens)).astype(np.int32)
  tokens_pt = torch.from_numpy(tokens).long()
  # Decode with teacher-forced tokens, so both sides run exactly the same steps.
  total = prompt + decode_steps
  sequence = rng.integers(0, vocab, (batch, total)).astype(np.int32)

  def ours_decode():
    cache = model.forward(sequence[:, :prompt], cache=model.init_cache(batch, total)).cache
    start = time.perf_counter()
    for step in range(prompt, total):
      out = model.forward(sequence[:, step:step + 1], positions_BT=np.full((batch, 1), step, np.int32), cache=cache)
      cache = out.cache
    out.logits_BTV.block_until_ready()
    return time.perf_counter() - start

  def ref_decode():
    sequence_pt = torch.from_numpy(sequence).long()
    with torch.no_grad():
      cache = DynamicCache(config=reference.config)
      reference(sequence_pt[:, :prompt], cache=cache, use_cache=True)
      start = time.perf_counter()
      for step in range(prompt, total):
        reference(sequence_pt[:, step:step + 1], cache=cache, use_cache=True)
    return time.perf_counter() - start

  ours_prefill = prefill_tokens / median_seconds(lambda: model(tokens), repeats=repeats)
  ours_decode()  # compiles the prompt and step programs
  ours_decode_rate = batch * decode_steps / float(np.median([ours_decode() for _ in range(repeats)]))

  # The comparison is specified at 2 threads. 1 thread shows how much of the reference's time is
  # thread synchronization, which grows when other processes share the cores.
  reference_rates = {}
  for threads in (2, 1):
    torch.set_num_threads(threads)
    with torch.no_grad():
      prefill = median_seconds(lambda: reference(tokens_pt, use_cache=False).logits, repeats=repeats)
    ref_decode()
    decode = float(np.median([ref_decode() for _ in range(repeats)]))
    reference_rates[threads] = (prefill_tokens / prefill, batch * decode_steps / decode)
  torch.set_num_threads(2)

  print("\n(2) speed, float32, jitted prism-jax (backend auto) against transformers")
  print(f"{'':28} {'prism-jax':>10} {'hf 2 thr':>9} {'ratio':>7} {'hf 1 thr':>9} {'ratio':>7}")
  rows = ((f"prefill tok/s (1 x {prefill_tokens})", ours_prefill, 0),
          (f"decode tok/s ({batch} rows)", ours_decode_rate, 1))
  for label, ours, column in rows:
    two, one = reference_rates[2][column], reference_rates[1][column]
    print(f"{label:28} {ours:10.0f} {two:9.0f} {ours / two:6.2f}x {one:9.0f} {ours / one:6.2f}x")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="smaller model and fewer repeats (a smoke run)")
  parser.add_argument("--rss-child", nargs=2, metavar=("HF_DIR", "OUT_DIR"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.rss_child:
    rss_child(*args.rss_child)
    return

  import jax  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel

  from converters import convert_checkpoint  # pylint: disable=import-outside-toplevel

  sizes = SIZES["quick" if args.quick else "full"]
  print(f"bench_convert: {platform.processor() or platform.machine()}, jax {jax.__version__} "
        f"({jax.default_backend()}), torch {torch.__version__}, model {sizes}")
  root = Path(tempfile.mkdtemp(prefix="bench_convert_"))
  try:
    reference, hf_dir = build_checkpoint(root, sizes)
    conversion_figures(hf_dir, root / "rss")
    ckpt_dir = convert_checkpoint(hf_dir, root / "prism")
    speed_figures(reference, ckpt_dir, prefill_tokens=128 if args.quick else 512, prompt=64 if args.quick else 128,
                  decode_steps=8 if args.quick else 32, batch=4, repeats=3 if args.quick else 5)
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
