"""Qwen2-MoE (model_type "qwen2_moe", e.g. Qwen1.5-MoE, Qwen2-57B-A14B).

QKV bias, a sigmoid-gated shared expert next to the routed experts, optional dense layers
(`decoder_sparse_step`, `mlp_only_layers`). Sliding-window attention follows transformers 5.25:
`layer_types` when given, else layer i slides when `use_sliding_window` is true, i is even
and i < `max_window_layers`; with `use_sliding_window` false no layer slides.
"""

from __future__ import annotations

from typing import Any

from prism_jax.config import ModelConfig

from converters.family import Family
from converters.hf_config import (ConfigFields, positive_window, read_attention_sizes, read_moe_layers,
                                  read_token_ids, require_silu, write_attention_sizes, write_moe_layers,
                                  write_token_ids)
from converters.hf_rope import read_rope, write_rope
from converters.key_table import FUSED, per_expert_layout

# Qwen2MoeConfig defaults in transformers 5.25, for fields a config.json leaves out.
DEFAULTS = {
    "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24,
    "num_attention_heads": 16, "num_key_value_heads": 16, "hidden_act": "silu", "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": 4096,
    "max_window_layers": 28, "decoder_sparse_step": 1, "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632, "num_experts_per_tok": 4, "num_experts": 60, "norm_topk_prob": False,
    "mlp_only_layers": None, "qkv_bias": True, "layer_types": None, "bos_token_id": None, "eos_token_id": None,
    "pad_token_id": None,
}
IGNORED: dict[str, str] = {}
LAYER_TYPES = ("full_attention", "sliding_attention")


def read_sliding_layers(fields: ConfigFields, num_layers: int) -> tuple[bool, ...]:
  use_window = bool(fields.get("use_sliding_window"))
  max_window_layers = fields.get("max_window_layers")
  layer_types = fields.get("layer_types")
  if layer_types is None:
    return tuple(use_window and i % 2 == 0 and i < max_window_layers for i in range(num_layers))
  if len(layer_types) != num_layers or not set(layer_types) <= set(LAYER_TYPES):
    raise fields.fail("layer_types", f"must list one of {LAYER_TYPES} for each of the {num_layers} layers")
  sliding = tuple(kind == "sliding_attention" for kind in layer_types)
  if any(sliding) and not use_window:
    # transformers sets sliding_window = 0 then, which would hide every key from those layers.
    raise fields.fail("layer_types", "marks sliding layers but use_sliding_window is false; set "
                      "use_sliding_window to true or mark every layer full_attention")
  return sliding


def read_config(fields: ConfigFields) -> dict[str, Any]:
  require_silu(fields)
  sizes = read_attention_sizes(fields)
  sliding = read_sliding_layers(fields, sizes["num_layers"])
  fields.get("sliding_window")  # read even when no layer slides, so the field counts as handled
  shared = fields.get("shared_expert_intermediate_size")
  if not isinstance(shared, int) or shared <= 0:
    raise fields.fail("shared_expert_intermediate_size", "must be positive: every Qwen2-MoE layer has a shared expert")
  num_experts = fields.get("num_experts")
  if not num_experts:
    raise fields.fail("num_experts", "makes every layer dense; this converter handles MoE models only")
  return dict(
      **sizes,
      num_experts=num_experts,
      num_experts_per_tok=fields.get("num_experts_per_tok"),
      moe_intermediate_size=fields.get("moe_intermediate_size"),
      intermediate_size=fields.get("intermediate_size"),
      moe_layers=read_moe_layers(fields, sizes["num_layers"]),
      norm_topk_prob=bool(fields.get("norm_topk_prob")),
      shared_expert_intermediate_size=shared,
      qkv_bias=bool(fields.get("qkv_bias")),
      rope=read_rope(fields, default_theta=10000.0, max_position_embeddings=sizes["max_position_embeddings"]),
      sliding_window=positive_window(fields) if any(sliding) else None,
      sliding_window_layers=sliding,
      **read_token_ids(fields),
  )


def write_config(config: ModelConfig) -> dict[str, Any]:
  sliding = any(config.sliding_window_layers)
  return {
      **write_attention_sizes(config),
      "intermediate_size": config.intermediate_size,
      "moe_intermediate_size": config.moe_intermediate_size,
      "shared_expert_intermediate_size": config.shared_expert_intermediate_size,
      "num_experts": config.num_experts,
      "num_experts_per_tok": config.num_experts_per_tok,
      "norm_topk_prob": config.norm_topk_prob,
      "qkv_bias": config.qkv_bias,
      **write_moe_layers(config),
      "use_sliding_window": sliding,
      "sliding_window": config.sliding_window if sliding else None,
      "max_window_layers": config.num_layers,
      "layer_types": ["sliding_attention" if s else "full_attention" for s in config.sliding_window_layers],
      **write_rope(config.rope),
      **write_token_ids(config),
  }


FAMILY = Family(
    model_type="qwen2_moe",
    architecture="Qwen2MoeForCausalLM",
    defaults=DEFAULTS,
    ignored=IGNORED,
    read_config=read_config,
    write_config=write_config,
    expert_layouts=(per_expert_layout("mlp", gate="gate_proj", up="up_proj", down="down_proj"), FUSED),
)
