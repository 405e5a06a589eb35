"""OLMoE (model_type "olmoe", e.g. OLMoE-1B-7B).

RMSNorm over the whole query and key projections before splitting into heads (QK-norm of
kind "projection"), optional clipping of q, k and v to +-`clip_qkv`, every layer MoE with
`intermediate_size` as the expert width, no sliding window.
"""

from __future__ import annotations

from typing import Any

from prism_jax.config import ModelConfig

from converters.family import Family
from converters.hf_config import (ConfigFields, read_attention_sizes, read_token_ids, require_silu,
                                  write_attention_sizes, write_token_ids)
from converters.hf_rope import read_rope, write_rope
from converters.key_table import FUSED, per_expert_layout

# OlmoeConfig defaults in transformers 5.25, for fields a config.json leaves out.
DEFAULTS = {
    "vocab_size": 50304, "hidden_size": 2048, "intermediate_size": 2048, "num_hidden_layers": 16,
    "num_attention_heads": 16, "num_key_value_heads": None, "hidden_act": "silu", "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "pad_token_id": 1, "bos_token_id": None, "eos_token_id": 50279,
    "tie_word_embeddings": False, "attention_bias": False, "clip_qkv": None, "num_experts_per_tok": 8,
    "num_experts": 64, "norm_topk_prob": False,
}
IGNORED: dict[str, str] = {}


def read_config(fields: ConfigFields) -> dict[str, Any]:
  require_silu(fields)
  if fields.get("attention_bias"):
    raise fields.fail("attention_bias", "is not supported: it also adds an o_proj bias, which the runtime lacks")
  sizes = read_attention_sizes(fields)
  if sizes["head_dim"] * sizes["num_heads"] != sizes["hidden_size"]:
    # OLMoE sizes q_norm by hidden_size and k_norm by hidden_size // heads * kv_heads.
    raise fields.fail("head_dim", "must equal hidden_size / num_attention_heads for OLMoE's QK-norm")
  clip = fields.get("clip_qkv")
  return dict(
      **sizes,
      num_experts=fields.get("num_experts", "num_local_experts"),
      num_experts_per_tok=fields.get("num_experts_per_tok"),
      moe_intermediate_size=fields.get("intermediate_size"),
      norm_topk_prob=bool(fields.get("norm_topk_prob")),
      qk_norm="projection",
      clip_qkv=None if clip is None else float(clip),
      rope=read_rope(fields, default_theta=10000.0, max_position_embeddings=sizes["max_position_embeddings"]),
      **read_token_ids(fields),
  )


def write_config(config: ModelConfig) -> dict[str, Any]:
  return {
      **write_attention_sizes(config),
      "intermediate_size": config.moe_intermediate_size,
      "num_experts": config.num_experts,
      "num_experts_per_tok": config.num_experts_per_tok,
      "norm_topk_prob": config.norm_topk_prob,
      "attention_bias": False,
      "clip_qkv": config.clip_qkv,
      **write_rope(config.rope),
      **write_token_ids(config),
  }


FAMILY = Family(
    model_type="olmoe",
    architecture="OlmoeForCausalLM",
    defaults=DEFAULTS,
    ignored=IGNORED,
    read_config=read_config,
    write_config=write_config,
    expert_layouts=(per_expert_layout("mlp", gate="gate_proj", up="up_proj", down="down_proj"), FUSED),
)
