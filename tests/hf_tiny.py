"""Tiny random Hugging Face MoE models for parity tests, built from configs (no downloads).

`build_model(case)` returns a transformers model with seeded random weights. Norms and biases
are randomized too, so a swapped or dropped tensor shows up in the logits. `save(model, dir)`
writes it with `save_pretrained` (released per-expert names), optionally sharded, or as the
fused in-memory state dict of transformers 5 (`fused=True`), plus a small tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import (MixtralConfig, MixtralForCausalLM, OlmoeConfig, OlmoeForCausalLM, Qwen2MoeConfig,
                          Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

VOCAB = 384
CLASSES = {
    "mixtral": (MixtralConfig, MixtralForCausalLM),
    "qwen2_moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM),
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM),
    "olmoe": (OlmoeConfig, OlmoeForCausalLM),
}
# Shared by every family: 2 layers of width 48, 6 heads over 2 KV heads, 8 experts, top 2.
BASE = dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
            num_experts_per_tok=2, max_position_embeddings=1024, initializer_range=0.1, bos_token_id=1,
            eos_token_id=2, pad_token_id=0)
# Family-specific sizes: expert width F = 32 everywhere, dense width 40, shared expert 24.
FAMILY_SIZES = {
    "mixtral": dict(num_local_experts=8, intermediate_size=32, rope_theta=10000.0),
    "qwen2_moe": dict(num_experts=8, moe_intermediate_size=32, intermediate_size=40,
                      shared_expert_intermediate_size=24),
    "qwen3_moe": dict(num_experts=8, moe_intermediate_size=32, intermediate_size=40, head_dim=12),
    "olmoe": dict(num_experts=8, intermediate_size=32),
}


@dataclasses.dataclass(frozen=True)
class Case:
  """A named tiny model: family plus config overrides."""

  family: str
  overrides: dict[str, Any] = dataclasses.field(default_factory=dict)

  def hf_config(self):
    config_class, _ = CLASSES[self.family]
    return config_class(**{**BASE, **FAMILY_SIZES[self.family], **self.overrides})


CASES = {
    "mixtral": Case("mixtral"),
    "mixtral_sliding_window": Case("mixtral", dict(sliding_window=48)),
    "qwen2_moe_shared_expert": Case("qwen2_moe", dict(norm_topk_prob=False)),
    "qwen2_moe_dense_layers_sliding": Case("qwen2_moe", dict(
        decoder_sparse_step=2, norm_topk_prob=True, use_sliding_window=True, sliding_window=40,
        max_window_layers=2)),
    "qwen3_moe_head_norm": Case("qwen3_moe", dict(norm_topk_prob=True)),
    "qwen3_moe_dense_tied": Case("qwen3_moe", dict(mlp_only_layers=[1], tie_word_embeddings=True,
                                                   norm_topk_prob=False)),
    "qwen3_moe_yarn_sliding": Case("qwen3_moe", dict(
        norm_topk_prob=True, use_sliding_window=True, sliding_window=64,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                             original_max_position_embeddings=256))),
    "olmoe_clip_qkv": Case("olmoe", dict(clip_qkv=0.6, norm_topk_prob=False)),
}


def build_model(case: Case | str, seed: int = 0) -> torch.nn.Module:
  """A float32 transformers model of `case` with seeded random weights, in eval mode."""
  case = CASES[case] if isinstance(case, str) else case
  _, model_class = CLASSES[case.family]
  torch.manual_seed(seed)
  model = model_class(case.hf_config()).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith("norm.weight"):
        param.copy_(1.0 + 0.2 * torch.randn_like(param))
      elif name.endswith(".bias"):
        param.copy_(0.1 * torch.randn_like(param))
  return model


def write_tokenizer(path: Path) -> list[str]:
  """A word-level tokenizer over the tiny vocabulary, with its tokenizer_config.json."""
  from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=import-outside-toplevel

  vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
  tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  tokenizer.save(str(path / "tokenizer.json"))
  (path / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "tokenizer_class": "PreTrainedTokenizerFast"}))
  return ["tokenizer.json", "tokenizer_config.json"]


def save(model: torch.nn.Module, path: str | Path, *, max_shard_size: str | None = None, fused: bool = False,
         tokenizer: bool = True) -> Path:
  """Write `model` as a Hugging Face checkpoint directory and return its path.

  fused=False: `save_pretrained`, which writes the released per-expert names (sharded when
  `max_shard_size` is given). fused=True: the transformers 5 in-memory state dict as is,
  with 3-D `experts.gate_up_proj [E, 2F, D]` and `experts.down_proj [E, D, F]`.
  """
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  if fused:
    model.config.save_pretrained(path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
      state.pop("lm_head.weight", None)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
  else:
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
  if tokenizer:
    write_tokenizer(path)
  return path


def build_and_save(case: Case | str, path: str | Path, seed: int = 0, **save_kwargs) -> tuple[torch.nn.Module, Path]:
  model = build_model(case, seed)
  return model, save(model, path, **save_kwargs)
