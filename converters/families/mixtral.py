"""Mixtral (model_type "mixtral"): Mistral attention, top-k experts with renormalized weights.

Released checkpoints keep experts under `block_sparse_moe.experts.{e}.w1/w3/w2` (gate, up,
down); transformers 5 fuses them under `mlp.experts`. Every layer is MoE, `intermediate_size`
is the expert width, and a non-null `sliding_window` applies to every layer.
"""

from __future__ import annotations

from typing import Any

from prism_jax.config import ModelConfig

from converters.errors import ConversionError
from converters.family import Family
from converters.hf_config import (ConfigFields, positive_window, read_attention_sizes, read_token_ids, require_silu,
                                  write_attention_sizes, write_token_ids)
from converters.hf_rope import read_rope, write_rope
from converters.key_table import FUSED, per_expert_layout

# MixtralConfig defaults in transformers 5.25, for fields a config.json leaves out.
DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu", "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
    "sliding_window": None, "num_experts_per_tok": 2, "num_local_experts": 8,
}
IGNORED = {"router_jitter_noise": "multiplicative noise on router inputs, applied only in training"}


def read_config(fields: ConfigFields) -> dict[str, Any]:
  require_silu(fields)
  sizes = read_attention_sizes(fields)
  window = None if fields.get("sliding_window") is None else positive_window(fields)
  return dict(
      **sizes,
      num_experts=fields.get("num_local_experts", "num_experts"),
      num_experts_per_tok=fields.get("num_experts_per_tok"),
      moe_intermediate_size=fields.get("intermediate_size"),
      norm_topk_prob=True,  # Mixtral always renormalizes the top-k weights.
      rope=read_rope(fields, default_theta=1e6, max_position_embeddings=sizes["max_position_embeddings"]),
      sliding_window=window,
      **read_token_ids(fields),
  )


def write_config(config: ModelConfig) -> dict[str, Any]:
  if any(config.sliding_window_layers) and not all(config.sliding_window_layers):
    raise ConversionError("mixtral applies sliding_window to every layer; this config windows only layers "
                          f"{[i for i, s in enumerate(config.sliding_window_layers) if s]}")
  return {
      **write_attention_sizes(config),
      "intermediate_size": config.moe_intermediate_size,
      "num_local_experts": config.num_experts,
      "num_experts_per_tok": config.num_experts_per_tok,
      "sliding_window": config.sliding_window if any(config.sliding_window_layers) else None,
      **write_rope(config.rope),
      **write_token_ids(config),
  }


FAMILY = Family(
    model_type="mixtral",
    architecture="MixtralForCausalLM",
    defaults=DEFAULTS,
    ignored=IGNORED,
    read_config=read_config,
    write_config=write_config,
    expert_layouts=(per_expert_layout("block_sparse_moe", gate="w1", up="w3", down="w2"), FUSED),
)
