"""Typed, frozen model and runtime configs that validate themselves."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

RopeKind = Literal["default", "linear", "yarn", "llama3"]
QKNorm = Literal["none", "projection", "head"]
RouterKind = Literal["compound", "linear"]
Backend = Literal["auto", "xla", "native", "tiled", "tokamax"]
WeightDtype = Literal["float32", "bfloat16"]


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Rotary embedding settings, including the scaling kinds of released MoE configs."""

  theta: float = 10000.0
  kind: RopeKind = "default"
  factor: float = 1.0
  original_max_position_embeddings: int | None = None
  # yarn
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  attention_factor: float | None = None
  truncate: bool = True
  # llama3
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0

  def __post_init__(self):
    _require(self.theta > 0, f"rope theta must be positive, got {self.theta}")
    _require(
        self.kind in ("default", "linear", "yarn", "llama3"),
        f"rope kind {self.kind!r} is not supported; expected one of default, linear, yarn, llama3",
    )
    _require(self.factor > 0, f"rope factor must be positive, got {self.factor}")
    if self.kind in ("yarn", "llama3"):
      _require(
          self.original_max_position_embeddings is not None,
          f"rope kind {self.kind!r} needs original_max_position_embeddings",
      )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a decoder-only MoE language model (D, F, E, K in the shape alphabet)."""

  family: str
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  num_experts: int
  num_experts_per_tok: int
  moe_intermediate_size: int
  intermediate_size: int = 0
  moe_layers: tuple[bool, ...] = ()
  norm_topk_prob: bool = True
  shared_expert_intermediate_size: int = 0
  qkv_bias: bool = False
  qk_norm: QKNorm = "none"
  clip_qkv: float | None = None
  rms_norm_eps: float = 1e-6
  rope: RopeConfig = RopeConfig()
  max_position_embeddings: int = 4096
  sliding_window: int | None = None
  sliding_window_layers: tuple[bool, ...] = ()
  tie_word_embeddings: bool = False
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None
  dtype: WeightDtype = "float32"

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                 "num_experts", "num_experts_per_tok", "moe_intermediate_size"):
      value = getattr(self, name)
      _require(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")
    _require(
        self.num_heads % self.num_kv_heads == 0,
        f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})",
    )
    _require(
        self.num_experts_per_tok <= self.num_experts,
        f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_experts ({self.num_experts})",
    )
    if not self.moe_layers:
      object.__setattr__(self, "moe_layers", (True,) * self.num_layers)
    if not self.sliding_window_layers:
      object.__setattr__(self, "sliding_window_layers", (self.sliding_window is not None,) * self.num_layers)
    _require(
        len(self.moe_layers) == self.num_layers,
        f"moe_layers has {len(self.moe_layers)} entries but num_layers is {self.num_layers}",
    )
    _require(
        len(self.sliding_window_layers) == self.num_layers,
        f"sliding_window_layers has {len(self.sliding_window_layers)} entries but num_layers is {self.num_layers}",
    )
    if not all(self.moe_layers):
      _require(
          self.intermediate_size > 0,
          f"dense layers need intermediate_size > 0, got {self.intermediate_size}",
      )
    _require(self.qk_norm in ("none", "projection", "head"), f"qk_norm {self.qk_norm!r} is not one of none, projection, head")
    _require(self.dtype in ("float32", "bfloat16"), f"dtype {self.dtype!r} is not one of float32, bfloat16")
    if self.sliding_window is not None:
      _require(self.sliding_window > 0, f"sliding_window must be positive, got {self.sliding_window}")

  @property
  def moe_layer_indices(self) -> tuple[int, ...]:
    return tuple(i for i, is_moe in enumerate(self.moe_layers) if is_moe)

  def layer_window(self, layer: int) -> int | None:
    """Sliding-window length of one layer, or None for full causal attention."""
    return self.sliding_window if self.sliding_window_layers[layer] else None

  def replace(self, **changes: Any) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
      raise ValueError(f"unknown model config fields {unknown}; this file was written by another prism-jax version")
    data = dict(data)
    data["rope"] = RopeConfig(**data.get("rope", {}))
    for name in ("moe_layers", "sliding_window_layers", "eos_token_ids"):
      if name in data:
        data[name] = tuple(data[name])
    return cls(**data)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2)


@dataclasses.dataclass(frozen=True)
class SubExpertConfig:
  """Run-time split of each expert into N sub-experts, and the router that picks among them."""

  num_sub_experts: int = 1
  router: RouterKind = "compound"
  num_core_neurons: int = 4

  def __post_init__(self):
    _require(
        isinstance(self.num_sub_experts, int) and self.num_sub_experts >= 1,
        f"num_sub_experts must be a positive integer, got {self.num_sub_experts!r}",
    )
    _require(self.router in ("compound", "linear"), f"router {self.router!r} is not one of compound, linear")
    _require(self.num_core_neurons >= 1, f"num_core_neurons must be >= 1, got {self.num_core_neurons}")

  def check_divides(self, moe_intermediate_size: int) -> None:
    _require(
        moe_intermediate_size % self.num_sub_experts == 0,
        f"num_sub_experts={self.num_sub_experts} does not divide the expert width F={moe_intermediate_size}; "
        f"choose N among the divisors of {moe_intermediate_size}",
    )
    group_width = moe_intermediate_size // self.num_sub_experts
    _require(
        self.num_core_neurons <= group_width,
        f"num_core_neurons={self.num_core_neurons} exceeds the sub-expert width {group_width}",
    )
