"""Reading a Hugging Face config.json field by field, so no field goes unnoticed.

A family reads the fields it understands through `ConfigFields.get`, names the ones that do
not change the model in an ignore table, and `ConfigFields.finish` then rejects whatever is
left, naming it. The helpers below read and write the fields that several families share.
"""

from __future__ import annotations

from typing import Any, Mapping

from converters.errors import ConversionError

_MISSING = object()

# Fields of every PreTrainedConfig serialization that describe no part of the architecture.
COMMON_IGNORED = {
    "architectures": "model class names; the family comes from model_type",
    "transformers_version": "version of the library that wrote the file",
    "dtype": "storage dtype; the output dtype is chosen by the converter's dtype argument",
    "torch_dtype": "storage dtype (older name of dtype)",
    "_name_or_path": "where the checkpoint was loaded from",
    "initializer_range": "used only to initialize weights for training",
    "use_cache": "a generation option",
    "attention_dropout": "dropout is off at inference",
    "output_router_logits": "a switch for returning router logits in training",
    "router_aux_loss_coef": "weight of the load-balancing loss in training",
    "output_attentions": "a switch for returning attention weights",
    "output_hidden_states": "a switch for returning hidden states",
    "return_dict": "a switch for the output container type",
    "chunk_size_feed_forward": "a memory option of the PyTorch implementation",
    "is_encoder_decoder": "always false for these decoder-only families",
    "id2label": "labels of classification heads, which are not converted",
    "label2id": "labels of classification heads, which are not converted",
    "problem_type": "task of classification heads, which are not converted",
}

class ConfigFields:
  """A config.json dict whose fields must each be read or ignored; defaults are the family's."""

  def __init__(self, data: Mapping[str, Any], *, defaults: Mapping[str, Any], source: str):
    self.data = dict(data)
    self.defaults = dict(defaults)
    self.source = source
    self._handled: set[str] = set()

  def get(self, name: str, *aliases: str, default: Any = _MISSING) -> Any:
    """Return the value of `name` (or of an alias), else the family default, else `default`."""
    names = (name,) + aliases
    self._handled.update(names)
    present = [n for n in names if n in self.data]
    values = {repr(self.data[n]) for n in present}
    if len(values) > 1:
      found = ", ".join(f"{n}={self.data[n]!r}" for n in present)
      raise ConversionError(f"{self.source}: fields {found} name the same setting with different values; "
                            "keep one of them")
    if present:
      return self.data[present[0]]
    if name in self.defaults:
      return self.defaults[name]
    if default is not _MISSING:
      return default
    raise ConversionError(f"{self.source}: required field {name!r} is missing; add it to config.json")

  def ignore(self, fields: Mapping[str, str]) -> None:
    """Mark fields that do not change the model as handled; each mapping value gives the reason."""
    self._handled.update(fields)

  def fail(self, name: str, problem: str) -> ConversionError:
    value = self.data.get(name, self.defaults.get(name))
    return ConversionError(f"{self.source}: {name}={value!r} {problem}")

  def finish(self, family: str) -> None:
    """Raise when a field was neither read nor ignored, naming every such field."""
    unhandled = sorted(set(self.data) - self._handled)
    if unhandled:
      raise ConversionError(
          f"{self.source}: config fields {unhandled} are not handled by the {family} converter. If a field does "
          "not change the model, add it to the family's ignore table in converters/families/; otherwise the "
          "converter needs to support it before this checkpoint can be converted")


def read_token_ids(fields: ConfigFields) -> dict[str, Any]:
  """Read bos/eos/pad ids as ModelConfig fields. The eos id may be one id or a list."""
  eos = fields.get("eos_token_id", default=None)
  if eos is None:
    eos_ids = ()
  elif isinstance(eos, (list, tuple)):
    eos_ids = tuple(eos)
  else:
    eos_ids = (eos,)
  return dict(bos_token_id=fields.get("bos_token_id", default=None), eos_token_ids=eos_ids,
              pad_token_id=fields.get("pad_token_id", default=None))


def write_token_ids(config) -> dict[str, Any]:
  eos = list(config.eos_token_ids)
  return {"bos_token_id": config.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
          "pad_token_id": config.pad_token_id}


def read_head_dim(fields: ConfigFields, hidden_size: int, num_heads: int) -> int:
  head_dim = fields.get("head_dim", default=None)
  if head_dim is None:
    if hidden_size % num_heads:
      raise fields.fail("num_attention_heads", f"does not divide hidden_size={hidden_size}; set head_dim")
    head_dim = hidden_size // num_heads
  return head_dim


def require_silu(fields: ConfigFields) -> None:
  if fields.get("hidden_act") != "silu":
    raise fields.fail("hidden_act", "is not supported; the runtime implements SwiGLU experts (silu)")


def read_moe_layers(fields: ConfigFields, num_layers: int) -> tuple[bool, ...]:
  """Decide MoE or dense per layer as Qwen-MoE does.

  Layer i is MoE unless `mlp_only_layers` lists it, and only when i + 1 is a multiple of
  `decoder_sparse_step`.
  """
  step = fields.get("decoder_sparse_step")
  dense = fields.get("mlp_only_layers") or []
  if not isinstance(step, int) or step < 1:
    raise fields.fail("decoder_sparse_step", "must be a positive integer")
  outside = [i for i in dense if not 0 <= i < num_layers]
  if outside:
    raise fields.fail("mlp_only_layers", f"lists layers {outside} outside 0..{num_layers - 1}")
  return tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers))


def write_moe_layers(config) -> dict[str, Any]:
  return {"decoder_sparse_step": 1, "mlp_only_layers": [i for i, moe in enumerate(config.moe_layers) if not moe]}


def read_attention_sizes(fields: ConfigFields) -> dict[str, Any]:
  """Read the sizes shared by every family: vocab, width, layers, heads, norm eps, positions."""
  hidden = fields.get("hidden_size")
  heads = fields.get("num_attention_heads")
  kv_heads = fields.get("num_key_value_heads")
  return dict(
      vocab_size=fields.get("vocab_size"),
      hidden_size=hidden,
      num_layers=fields.get("num_hidden_layers"),
      num_heads=heads,
      # transformers uses num_attention_heads when num_key_value_heads is null.
      num_kv_heads=heads if kv_heads is None else kv_heads,
      head_dim=read_head_dim(fields, hidden, heads),
      rms_norm_eps=float(fields.get("rms_norm_eps")),
      max_position_embeddings=fields.get("max_position_embeddings"),
      tie_word_embeddings=bool(fields.get("tie_word_embeddings")),
  )


def write_attention_sizes(config) -> dict[str, Any]:
  return {
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim,
      "hidden_act": "silu",
      "rms_norm_eps": config.rms_norm_eps,
      "max_position_embeddings": config.max_position_embeddings,
      "tie_word_embeddings": config.tie_word_embeddings,
  }


def positive_window(fields: ConfigFields, name: str = "sliding_window") -> int:
  window = fields.get(name)
  if not isinstance(window, int) or window <= 0:
    raise fields.fail(name, "must be a positive integer when sliding-window attention is on")
  return window
