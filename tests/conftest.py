"""Shared fixtures: torch threads, and tiny Hugging Face checkpoints built once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
  """`get(case)` -> (transformers model, checkpoint dir) for a case of tests.hf_tiny.CASES, built once."""
  import torch  # pylint: disable=import-outside-toplevel

  from tests import hf_tiny  # pylint: disable=import-outside-toplevel

  torch.set_num_threads(2)
  root = tmp_path_factory.mktemp("hf")
  built: dict = {}

  def get(case: str):
    if case not in built:
      built[case] = hf_tiny.build_and_save(case, root / case)
    return built[case]

  return get


@pytest.fixture(scope="session")
def tiny_hf_dir(hf_checkpoints):
  """A tiny Qwen3-MoE Hugging Face checkpoint directory (per-expert layout, with a tokenizer)."""
  return hf_checkpoints("qwen3_moe_head_norm")[1]
