"""Architecture and training settings of the reference model."""

from __future__ import annotations

import dataclasses

from prism_jax.config import ModelConfig

VOCAB_SIZE = 4096
SEQ_LEN = 256


def reference_model_config(vocab_size: int = VOCAB_SIZE, eos_token_id: int = 0) -> ModelConfig:
  """Build the Qwen3-MoE-shaped reference config: 4 layers, width 128, 16 experts of width 128, top-4.

  F = 128 is divisible by 2, 4 and 8, so every such N splits experts evenly.
  """
  return ModelConfig(
      family="qwen3_moe",
      vocab_size=vocab_size,
      hidden_size=128,
      num_layers=4,
      num_heads=4,
      num_kv_heads=2,
      head_dim=32,
      num_experts=16,
      num_experts_per_tok=4,
      moe_intermediate_size=128,
      norm_topk_prob=True,
      qk_norm="head",
      rms_norm_eps=1e-6,
      max_position_embeddings=2 * SEQ_LEN,
      tie_word_embeddings=False,
      eos_token_ids=(eos_token_id,),
      pad_token_id=eos_token_id,
  )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimizer, schedule, batch shape and bookkeeping of one training run.

  The learning rate rises linearly from 0 over `warmup_steps`, then follows a cosine down
  to `peak_learning_rate * final_lr_fraction` at `steps`.
  """

  seed: int = 0
  steps: int = 600
  batch_size: int = 16
  seq_len: int = SEQ_LEN
  peak_learning_rate: float = 3e-3
  final_lr_fraction: float = 0.05
  warmup_steps: int = 30
  weight_decay: float = 0.1
  grad_clip_norm: float = 1.0
  adam_b2: float = 0.98
  # Weight of the Switch-Transformer load-balancing loss, summed over experts and averaged over layers.
  load_balance_weight: float = 0.01
  eval_every: int = 100
  eval_windows: int = 32
  checkpoint_every: int = 50
  log_every: int = 20

  def __post_init__(self):
    for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_windows", "checkpoint_every", "log_every"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not 0 <= self.warmup_steps < self.steps:
      raise ValueError(f"warmup_steps must be in [0, steps={self.steps}), got {self.warmup_steps}")
    if self.peak_learning_rate <= 0:
      raise ValueError(f"peak_learning_rate must be positive, got {self.peak_learning_rate}")
    if not 0 <= self.final_lr_fraction <= 1:
      raise ValueError(f"final_lr_fraction must be in [0, 1], got {self.final_lr_fraction}")
    if self.grad_clip_norm <= 0:
      raise ValueError(f"grad_clip_norm must be positive, got {self.grad_clip_norm}")
    if self.load_balance_weight < 0:
      raise ValueError(f"load_balance_weight must be >= 0, got {self.load_balance_weight}")

  @property
  def tokens_per_step(self) -> int:
    return self.batch_size * self.seq_len
