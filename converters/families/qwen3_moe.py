"""Qwen3-MoE (model_type "qwen3_moe", e.g. Qwen3-30B-A3B).

Per-head RMSNorm on queries and keys (QK-norm over head_dim), no QKV bias, optional dense
layers (`decoder_sparse_step`, `mlp_only_layers`). transformers 5.25 applies `sliding_window`
to every layer when `use_sliding_window` is true and never reads `max_window_layers`.
"""

from __future__ import annotations

from typing import Any

from prism_jax.config import ModelConfig

from converters.errors import ConversionError
from converters.family import Family
from converters.hf_config import (ConfigFields, positive_window, read_attention_sizes, read_moe_layers,
                                  read_token_ids, require_silu, write_attention_sizes, write_moe_layers,
                                  write_token_ids)
from converters.hf_rope import read_rope, write_rope
from converters.key_table import FUSED, per_expert_layout

# Qwen3MoeConfig defaults in transformers 5.25, for fields a config.json leaves out.
DEFAULTS = {
    "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 24,
    "num_attention_heads": 32, "num_key_value_heads": 4, "hidden_act": "silu", "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False, "use_sliding_window": False,
    "sliding_window": 4096, "decoder_sparse_step": 1, "moe_intermediate_size": 768, "num_experts_per_tok": 8,
    "num_experts": 128, "norm_topk_prob": False, "mlp_only_layers": None, "bos_token_id": None,
    "eos_token_id": None, "pad_token_id": None,
}
IGNORED = {"max_window_layers": "not read by transformers 5.25's Qwen3-MoE, which windows all layers or none"}


def read_config(fields: ConfigFields) -> dict[str, Any]:
  require_silu(fields)
  if fields.get("attention_bias"):
    raise fields.fail("attention_bias", "is not supported: it also adds an o_proj bias, which the runtime lacks")
  sizes = read_attention_sizes(fields)
  use_window = bool(fields.get("use_sliding_window"))
  fields.get("sliding_window")  # read even when unused, so the field counts as handled
  return dict(
      **sizes,
      num_experts=fields.get("num_experts", "num_local_experts"),
      num_experts_per_tok=fields.get("num_experts_per_tok"),
      moe_intermediate_size=fields.get("moe_intermediate_size"),
      intermediate_size=fields.get("intermediate_size"),
      moe_layers=read_moe_layers(fields, sizes["num_layers"]),
      norm_topk_prob=bool(fields.get("norm_topk_prob")),
      qk_norm="head",
      rope=read_rope(fields, default_theta=10000.0, max_position_embeddings=sizes["max_position_embeddings"]),
      sliding_window=positive_window(fields) if use_window else None,
      **read_token_ids(fields),
  )


def write_config(config: ModelConfig) -> dict[str, Any]:
  sliding = any(config.sliding_window_layers)
  if sliding and not all(config.sliding_window_layers):
    raise ConversionError("qwen3_moe applies sliding_window to every layer or none; this config windows only "
                          f"layers {[i for i, s in enumerate(config.sliding_window_layers) if s]}")
  return {
      **write_attention_sizes(config),
      "intermediate_size": config.intermediate_size,
      "moe_intermediate_size": config.moe_intermediate_size,
      "num_experts": config.num_experts,
      "num_experts_per_tok": config.num_experts_per_tok,
      "norm_topk_prob": config.norm_topk_prob,
      "attention_bias": False,
      **write_moe_layers(config),
      "use_sliding_window": sliding,
      "sliding_window": config.sliding_window if sliding else None,
      **write_rope(config.rope),
      **write_token_ids(config),
  }


FAMILY = Family(
    model_type="qwen3_moe",
    architecture="Qwen3MoeForCausalLM",
    defaults=DEFAULTS,
    ignored=IGNORED,
    read_config=read_config,
    write_config=write_config,
    expert_layouts=(per_expert_layout("mlp", gate="gate_proj", up="up_proj", down="down_proj"), FUSED),
)
