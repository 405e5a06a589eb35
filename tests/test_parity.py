"""Converted models against the transformers reference: logits, expert choices, cached decoding.

Each case of tests.hf_tiny.CASES is built with random weights, saved with save_pretrained,
converted and compared in float32 on 2 rows of 512 tokens. Cases in DECODE_CASES run their
full forward through the KV cache (the same compiled program that prefills before decoding),
the others without a cache, so both paths meet the reference while each case compiles the
full-length program once.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import prism_jax
from converters import convert_checkpoint
from tests import hf_tiny

BATCH, LENGTH, DECODED = 2, 512, 16
TOLERANCE = 1e-4
# Cases with a sliding window, yarn rope or clipping also decode token by token.
DECODE_CASES = ("qwen2_moe_dense_layers_sliding", "qwen3_moe_yarn_sliding", "olmoe_clip_qkv")


def full_forward(model, tokens, *, through_cache: bool, padded_from: int = LENGTH):
  """Forward over all tokens; with `through_cache`, positions >= `padded_from` become padding.

  Padding tokens get position LENGTH, which the cache drops, and are kept out of routing.
  """
  if not through_cache:
    return model.forward(tokens)
  positions = np.broadcast_to(np.arange(LENGTH, dtype=np.int32), tokens.shape).copy()
  positions[:, padded_from:] = LENGTH
  return model.forward(tokens, positions_BT=positions, valid_BT=positions < LENGTH,
                       cache=model.init_cache(tokens.shape[0], LENGTH))


@pytest.fixture(scope="module")
def run_case(hf_checkpoints, tmp_path_factory):
  """`run(case)` -> (model, tokens, our ForwardOutput, reference logits, reference router logits), cached."""
  root = tmp_path_factory.mktemp("prism")
  results: dict = {}

  def run(case: str):
    if case not in results:
      reference, hf_dir = hf_checkpoints(case)
      model = prism_jax.load(convert_checkpoint(hf_dir, root / case))
      tokens = np.random.default_rng(1).integers(3, hf_tiny.VOCAB, (BATCH, LENGTH)).astype(np.int32)
      with torch.no_grad():
        out = reference(torch.from_numpy(tokens).long(), output_router_logits=True)
      router_logits = [np.asarray(r.float()) for r in out.router_logits]
      ours = full_forward(model, tokens, through_cache=case in DECODE_CASES)
      results[case] = model, tokens, ours, out.logits.float().numpy(), router_logits
    return results[case]

  return run


def assert_close(actual: np.ndarray, expected: np.ndarray, label: str) -> None:
  assert np.isfinite(actual).all(), f"{label}: non-finite values in ours"
  assert np.isfinite(expected).all(), f"{label}: non-finite values in the reference"
  error = np.abs(actual - expected)
  relative = error.max() / max(np.abs(expected).max(), 1e-12)
  assert error.max() <= TOLERANCE, f"{label}: max abs error {error.max():.3e} (relative {relative:.3e}) > {TOLERANCE}"


@pytest.mark.parametrize("case", list(hf_tiny.CASES))
def test_logits_match_reference(run_case, case):
  _, _, ours, ref_logits, _ = run_case(case)
  logits = np.asarray(ours.logits_BTV)
  assert logits.shape == ref_logits.shape
  assert_close(logits, ref_logits, f"{case} logits")


@pytest.mark.parametrize("case", list(hf_tiny.CASES))
def test_top_experts_match_reference(run_case, case):
  model, _, ours, _, ref_router_logits = run_case(case)
  assert len(ours.moe) == len(ref_router_logits), "number of MoE layers differs from the reference"
  top_k = model.config.num_experts_per_tok
  for layer, (info, logits_SE) in enumerate(zip(ours.moe, ref_router_logits)):
    probs = torch.softmax(torch.from_numpy(logits_SE), dim=-1)
    ref_SK = np.sort(torch.topk(probs, top_k, dim=-1).indices.numpy(), axis=-1)
    ours_SK = np.sort(np.asarray(info.top_experts_SK), axis=-1)
    assert ours_SK.shape == ref_SK.shape
    differing = np.flatnonzero((ref_SK != ours_SK).any(axis=-1))
    assert differing.size == 0, (f"{case} MoE layer {layer}: top-{top_k} experts differ on {differing.size} of "
                                 f"{len(ref_SK)} tokens, first at flat tokens {differing[:5].tolist()}")


@pytest.mark.parametrize("case", DECODE_CASES)
def test_cached_decoding_matches_full_forward(run_case, case):
  model, tokens, ours, ref_logits, _ = run_case(case)
  prefix = LENGTH - DECODED
  prefill = full_forward(model, tokens, through_cache=True, padded_from=prefix)
  assert_close(np.asarray(prefill.logits_BTV)[:, :prefix], ref_logits[:, :prefix], f"{case} prefill logits")

  cache = prefill.cache
  full_logits = np.asarray(ours.logits_BTV)
  for step in range(prefix, LENGTH):
    step_out = model.forward(tokens[:, step:step + 1], positions_BT=np.full((BATCH, 1), step, np.int32), cache=cache)
    cache = step_out.cache
    step_logits = np.asarray(step_out.logits_BTV)[:, 0]
    assert_close(step_logits, ref_logits[:, step], f"{case} decoded position {step} against the reference")
    assert_close(step_logits, full_logits[:, step], f"{case} decoded position {step} against our full forward")
