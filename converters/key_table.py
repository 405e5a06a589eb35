"""Key tables: our parameter paths <-> Hugging Face tensor keys, with the transform between them.

Each `Row` maps one or more of our paths (dotted, relative to a checkpoint item such as
"layer_003") to one Hugging Face key template (relative to the item's prefix, such as
"model.layers.3."). A template containing "{e}" expands to one key per expert. The tables
below are shared by every family; a family declares only its expert layouts. Shapes in the
comments read ours <- Hugging Face, with D hidden size, F expert width, I dense width,
E experts, H*Dh query width and Hkv*Dh key/value width.
"""

from __future__ import annotations

import dataclasses

from prism_jax.checkpoint import layer_item
from prism_jax.config import ModelConfig

from converters.transforms import (FUSED_TRANSPOSE, IDENTITY, SPLIT_GATE_UP, STACK_TRANSPOSE, TRANSPOSE,
                                   Transform)


@dataclasses.dataclass(frozen=True)
class Row:
  """One table entry: our path(s), the Hugging Face key template and the transform between them."""

  ours: tuple[str, ...]
  hf: str
  transform: Transform

  def __post_init__(self):
    if isinstance(self.ours, str):
      object.__setattr__(self, "ours", (self.ours,))
    if ("{e}" in self.hf) != self.transform.per_expert:
      raise ValueError(f"row {self.hf!r}: a per-expert key template needs a per-expert transform, "
                       f"got {self.transform!r}")

  def hf_keys(self, prefix: str, num_experts: int) -> list[str]:
    if "{e}" in self.hf:
      return [prefix + self.hf.format(e=e) for e in range(num_experts)]
    return [prefix + self.hf]


@dataclasses.dataclass(frozen=True)
class ExpertLayout:
  """Storage layout of a MoE layer's router and experts, identified by the relative key `marker`."""

  name: str
  marker: str
  rows: tuple[Row, ...]


@dataclasses.dataclass(frozen=True)
class ItemTable:
  """The rows of one checkpoint item and the Hugging Face prefix their keys live under."""

  item: str
  prefix: str
  rows: tuple[Row, ...]
  layout: ExpertLayout | None = None


EMBED = (Row("embedding", "embed_tokens.weight", IDENTITY),)  # [V, D] <- [V, D]
FINAL_NORM = (Row("scale", "norm.weight", IDENTITY),)  # [D] <- [D]
LM_HEAD = (Row("kernel", "lm_head.weight", TRANSPOSE),)  # [D, V] <- [V, D]

ATTENTION = (
    Row("attn_norm.scale", "input_layernorm.weight", IDENTITY),  # [D] <- [D]
    Row("attn.q_proj.kernel", "self_attn.q_proj.weight", TRANSPOSE),  # [D, H*Dh] <- [H*Dh, D]
    Row("attn.k_proj.kernel", "self_attn.k_proj.weight", TRANSPOSE),  # [D, Hkv*Dh] <- [Hkv*Dh, D]
    Row("attn.v_proj.kernel", "self_attn.v_proj.weight", TRANSPOSE),  # [D, Hkv*Dh] <- [Hkv*Dh, D]
    Row("attn.o_proj.kernel", "self_attn.o_proj.weight", TRANSPOSE),  # [H*Dh, D] <- [D, H*Dh]
    Row("mlp_norm.scale", "post_attention_layernorm.weight", IDENTITY),  # [D] <- [D]
)
QKV_BIAS = (
    Row("attn.q_proj.bias", "self_attn.q_proj.bias", IDENTITY),  # [H*Dh] <- [H*Dh]
    Row("attn.k_proj.bias", "self_attn.k_proj.bias", IDENTITY),  # [Hkv*Dh] <- [Hkv*Dh]
    Row("attn.v_proj.bias", "self_attn.v_proj.bias", IDENTITY),  # [Hkv*Dh] <- [Hkv*Dh]
)
# qk_norm "projection" (OLMoE): [H*Dh] and [Hkv*Dh]; qk_norm "head" (Qwen3): [Dh] and [Dh].
QK_NORM = (
    Row("attn.q_norm.scale", "self_attn.q_norm.weight", IDENTITY),
    Row("attn.k_norm.scale", "self_attn.k_norm.weight", IDENTITY),
)
DENSE_MLP = (
    Row("mlp.gate_proj.kernel", "mlp.gate_proj.weight", TRANSPOSE),  # [D, I] <- [I, D]
    Row("mlp.up_proj.kernel", "mlp.up_proj.weight", TRANSPOSE),  # [D, I] <- [I, D]
    Row("mlp.down_proj.kernel", "mlp.down_proj.weight", TRANSPOSE),  # [I, D] <- [D, I]
)
SHARED_EXPERT = (
    Row("mlp.shared_expert.gate_proj.kernel", "mlp.shared_expert.gate_proj.weight", TRANSPOSE),  # [D, Fs] <- [Fs, D]
    Row("mlp.shared_expert.up_proj.kernel", "mlp.shared_expert.up_proj.weight", TRANSPOSE),  # [D, Fs] <- [Fs, D]
    Row("mlp.shared_expert.down_proj.kernel", "mlp.shared_expert.down_proj.weight", TRANSPOSE),  # [Fs, D] <- [D, Fs]
    Row("mlp.shared_expert_gate", "mlp.shared_expert_gate.weight", TRANSPOSE),  # [D, 1] <- [1, D]
)


def per_expert_layout(moe_prefix: str, gate: str, up: str, down: str) -> ExpertLayout:
  """Released layout: one [out, in] tensor per expert, e.g. `mlp.experts.{e}.gate_proj.weight`."""
  experts = f"{moe_prefix}.experts.{{e}}"
  return ExpertLayout(
      name="per-expert",
      marker=f"{moe_prefix}.experts.0.{gate}.weight",
      rows=(
          Row("mlp.router", f"{moe_prefix}.gate.weight", TRANSPOSE),  # [D, E] <- [E, D]
          Row("mlp.gate", f"{experts}.{gate}.weight", STACK_TRANSPOSE),  # [E, D, F] <- E x [F, D]
          Row("mlp.up", f"{experts}.{up}.weight", STACK_TRANSPOSE),  # [E, D, F] <- E x [F, D]
          Row("mlp.down", f"{experts}.{down}.weight", STACK_TRANSPOSE),  # [E, F, D] <- E x [D, F]
      ),
  )


# Fused layout of transformers 5 (in memory, and on disk when a state dict is saved as is).
FUSED = ExpertLayout(
    name="fused",
    marker="mlp.experts.gate_up_proj",
    rows=(
        Row("mlp.router", "mlp.gate.weight", TRANSPOSE),  # [D, E] <- [E, D]
        Row(("mlp.gate", "mlp.up"), "mlp.experts.gate_up_proj", SPLIT_GATE_UP),  # 2 x [E, D, F] <- [E, 2F, D]
        Row("mlp.down", "mlp.experts.down_proj", FUSED_TRANSPOSE),  # [E, F, D] <- [E, D, F]
    ),
)


def layer_rows(config: ModelConfig, layer: int, layout: ExpertLayout) -> tuple[Row, ...]:
  """Collect the rows of one decoder layer, chosen by the config (bias, QK-norm, MoE or dense, shared expert)."""
  rows = list(ATTENTION)
  if config.qkv_bias:
    rows += QKV_BIAS
  if config.qk_norm != "none":
    rows += QK_NORM
  if config.moe_layers[layer]:
    rows += layout.rows
    if config.shared_expert_intermediate_size:
      rows += SHARED_EXPERT
  else:
    rows += DENSE_MLP
  return tuple(rows)


def item_tables(config: ModelConfig, layouts: list[ExpertLayout]) -> list[ItemTable]:
  """Tables of every checkpoint item in writing order; `layouts[i]` is layer i's expert layout."""
  tables = [ItemTable("embed", "model.", EMBED)]
  for layer in range(config.num_layers):
    layout = layouts[layer] if config.moe_layers[layer] else None
    tables.append(ItemTable(layer_item(layer), f"model.layers.{layer}.", layer_rows(config, layer, layout), layout))
  tables.append(ItemTable("final_norm", "model.", FINAL_NORM))
  if not config.tie_word_embeddings:
    tables.append(ItemTable("lm_head", "", LM_HEAD))
  return tables
