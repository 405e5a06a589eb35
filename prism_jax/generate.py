"""Text generation over the KV cache: greedy or sampled, text in and text out."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prism_jax.model import PrismModel


def sample_next(logits_BV: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
  """Greedy when temperature == 0, else temperature + nucleus (top-p) sampling."""
  if temperature <= 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits = logits_BV / temperature
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    cutoff_index = jnp.sum(cumulative < top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate_tokens(model: PrismModel, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 32,
                    budget: int | None = None, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                    eos_token_ids: Sequence[int] | None = None) -> list[list[int]]:
  """Continue each prompt by up to `max_new_tokens` tokens; stops a row at an EOS token."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  eos = set(model.config.eos_token_ids if eos_token_ids is None else eos_token_ids)
  lengths = np.array([len(p) for p in prompts])
  width = int(lengths.max())
  max_len = width + max_new_tokens
  if max_len > model.config.max_position_embeddings:
    raise ValueError(f"prompt ({width} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                     f"context of {model.config.max_position_embeddings} positions")
  batch = len(prompts)
  tokens = np.zeros((batch, width), np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, :len(prompt)] = prompt
  columns = np.arange(width)[None, :]
  valid = columns < lengths[:, None]
  # Padding goes to position max_len, past the cache, so it is never written or attended to.
  positions = np.where(valid, columns, max_len).astype(np.int32)

  cache = model.init_cache(batch, max_len)
  out = model.forward(tokens, budget=budget, positions_BT=positions, valid_BT=valid, cache=cache)
  last_logits = out.logits_BTV[jnp.arange(batch), jnp.asarray(lengths - 1)]
  cache = out.cache
  key = jax.random.key(seed)
  generated = [[] for _ in range(batch)]
  done = np.zeros(batch, bool)
  position = lengths.copy()
  for _ in range(max_new_tokens):
    key, step_key = jax.random.split(key)
    next_tokens = np.asarray(sample_next(last_logits, step_key, temperature, top_p))
    for row in range(batch):
      if not done[row]:
        generated[row].append(int(next_tokens[row]))
        done[row] = int(next_tokens[row]) in eos
    if done.all():
      break
    out = model.forward(next_tokens[:, None], budget=budget, positions_BT=position[:, None].astype(np.int32),
                        cache=cache)
    cache, last_logits = out.cache, out.logits_BTV[:, 0]
    position += 1
  return generated


def generate(model: PrismModel, prompts: str | Sequence[str], *, max_new_tokens: int = 32,
             budget: int | None = None, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[str]:
  """Complete text prompts with the checkpoint's tokenizer; returns one completion per prompt."""
  if model.tokenizer is None:
    raise ValueError(f"checkpoint {model.path} has no tokenizer/tokenizer.json; pass token ids to generate_tokens")
  texts = [prompts] if isinstance(prompts, str) else list(prompts)
  ids = [model.tokenizer.encode(t).ids for t in texts]
  if model.config.bos_token_id is not None:
    ids = [[model.config.bos_token_id] + i if not i or i[0] != model.config.bos_token_id else i for i in ids]
  outs = generate_tokens(model, ids, max_new_tokens=max_new_tokens, budget=budget, temperature=temperature,
                         top_p=top_p, seed=seed)
  return [model.tokenizer.decode(o) for o in outs]
