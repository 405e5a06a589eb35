"""Train the reference MoE from scratch with optax: AdamW, warmup + cosine, clipping, load balancing.

The model is the project's own `Decoder`. Each step samples `batch_size` random windows of
`seq_len + 1` tokens from the training stream; the sampling depends only on (seed, step),
so a run resumed from a checkpoint gets the same batches as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from prism_jax.config import ModelConfig
from prism_jax.decoder import Decoder
from prism_jax.moe import MoEInfo
from prism_jax.reference.recipe import TrainConfig

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.npz"
LOG_FILE = "train_log.jsonl"


@dataclasses.dataclass(frozen=True)
class TrainResult:
  """Trained weights (expert layout, NumPy) and what the run measured."""

  params: dict
  steps: int
  tokens_seen: int
  train_seconds: float
  final_eval_loss: float


def load_balance_loss(info: MoEInfo, num_experts: int) -> jax.Array:
  """Switch-Transformer auxiliary loss E * sum_e f_e * P_e of one MoE layer.

  f_e is the fraction of (token, slot) assignments that went to expert e and P_e the mean
  router probability of e. It is 1 when both are uniform and grows as routing concentrates
  on few experts. Only P_e carries a gradient (top-k is not differentiable).
  """
  experts_SK = info.top_experts_SK
  counts_E = jnp.zeros((num_experts,), jnp.float32).at[experts_SK.reshape(-1)].add(1.0)
  fraction_E = counts_E / experts_SK.size
  mean_prob_E = jnp.mean(info.router_probs_SE, axis=0)
  return num_experts * jnp.sum(fraction_E * mean_prob_E)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=cfg.peak_learning_rate,
      warmup_steps=cfg.warmup_steps,
      decay_steps=cfg.steps,
      end_value=cfg.peak_learning_rate * cfg.final_lr_fraction,
  )
  # Decay matrices only; norm scales stay undecayed.
  decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip_norm),
      optax.adamw(schedule, b2=cfg.adam_b2, weight_decay=cfg.weight_decay, mask=decay_mask),
  )


def init_params(config: ModelConfig, seed: int) -> tuple[nnx.GraphDef, nnx.State]:
  """Fresh weights from the Decoder's own initializers."""
  graphdef, params = nnx.split(Decoder(config, rngs=nnx.Rngs(seed)), nnx.Param)
  return graphdef, params


def make_loss_fn(graphdef: nnx.GraphDef, config: ModelConfig, load_balance_weight: float) -> Callable:
  """loss(params, tokens_BT) -> (total, (cross_entropy, load_balance)); tokens hold T = seq_len + 1."""

  def loss_fn(params, tokens_BT):
    model = nnx.merge(graphdef, params)
    out = model(tokens_BT[:, :-1])
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(out.logits_BTV, tokens_BT[:, 1:]).mean()
    balance = jnp.mean(jnp.stack([load_balance_loss(info, config.num_experts) for info in out.moe]))
    return cross_entropy + load_balance_weight * balance, (cross_entropy, balance)

  return loss_fn


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation) -> Callable:
  def train_step(params, opt_state, tokens_BT):
    (_, (cross_entropy, balance)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, tokens_BT)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"loss": cross_entropy, "load_balance": balance, "grad_norm": optax.tree.norm(grads)}

  return jax.jit(train_step, donate_argnums=(0, 1))


def sample_batch(stream: np.ndarray, cfg: TrainConfig, step: int) -> np.ndarray:
  """Random windows of seq_len + 1 tokens; the same (seed, step) always gives the same batch."""
  window = cfg.seq_len + 1
  if len(stream) <= window:
    raise ValueError(f"training text has {len(stream)} tokens, fewer than one window of {window}; "
                     "use a longer text or a smaller seq_len")
  rng = np.random.default_rng((cfg.seed, step))
  starts = rng.integers(0, len(stream) - window + 1, size=cfg.batch_size)
  return np.stack([stream[s:s + window] for s in starts])


def eval_windows(stream: np.ndarray, seq_len: int, max_windows: int | None = None) -> np.ndarray:
  """Consecutive, non-overlapping windows [W, seq_len + 1] from the start of `stream`.

  Window w holds tokens w*seq_len .. (w+1)*seq_len, so each token is predicted exactly
  once, with at most seq_len - 1 tokens of context.
  """
  count = (len(stream) - 1) // seq_len
  if max_windows is not None:
    count = min(count, max_windows)
  if count == 0:
    raise ValueError(f"text has {len(stream)} tokens, fewer than one window of {seq_len + 1}")
  return np.stack([stream[w * seq_len:(w + 1) * seq_len + 1] for w in range(count)])


def _save_state(path: Path, step: int, seconds: float, params, opt_state, config: ModelConfig,
                cfg: TrainConfig) -> None:
  leaves = jax.tree_util.tree_leaves((params, opt_state))
  arrays = {f"leaf_{i:04d}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
  meta = json.dumps({"step": step, "seconds": seconds, "model": config.to_dict(), "train": dataclasses.asdict(cfg)})
  tmp = path.with_name(path.name + ".partial.npz")
  np.savez(tmp, meta=np.asarray(meta), **arrays)
  os.replace(tmp, path)


def _load_state(path: Path, params, opt_state, config: ModelConfig, cfg: TrainConfig):
  with np.load(path) as data:
    meta = json.loads(str(data["meta"]))
    if meta["model"] != json.loads(config.to_json()) or meta["train"] != dataclasses.asdict(cfg):
      raise ValueError(f"checkpoint {path} was written by a run with other settings; "
                       "pass the same settings, or a fresh --work directory")
    treedef = jax.tree_util.tree_structure((params, opt_state))
    leaves = [jnp.asarray(data[f"leaf_{i:04d}"]) for i in range(treedef.num_leaves)]
  params, opt_state = jax.tree_util.tree_unflatten(treedef, leaves)
  return meta["step"], meta["seconds"], params, opt_state


@functools.lru_cache(maxsize=4)
def _compiled_functions(config: ModelConfig, cfg: TrainConfig) -> tuple[optax.GradientTransformation, Callable, Callable]:
  """Optimizer, jitted train step and jitted eval loss; cached so a resumed run in the same process reuses them."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))), nnx.Param)
  optimizer = make_optimizer(cfg)
  loss_fn = make_loss_fn(graphdef, config, cfg.load_balance_weight)
  eval_loss_fn = jax.jit(lambda params, tokens: loss_fn(params, tokens)[1][0])
  return optimizer, make_train_step(loss_fn, optimizer), eval_loss_fn


def train(config: ModelConfig, cfg: TrainConfig, train_stream: np.ndarray, eval_stream: np.ndarray,
          work_dir: str | Path, *, resume: bool = True, progress: bool = True,
          stop_at: int | None = None) -> TrainResult:
  """Train from scratch (or resume from `work_dir`), log to work_dir/train_log.jsonl, return the weights.

  `stop_at` ends the run after that step with a checkpoint, as an interrupted run would;
  calling again with the same settings continues it.
  """
  work_dir = Path(work_dir)
  work_dir.mkdir(parents=True, exist_ok=True)
  _, params = init_params(config, cfg.seed)
  optimizer, train_step, eval_loss_fn = _compiled_functions(config, cfg)
  opt_state = optimizer.init(params)
  eval_batch = eval_windows(eval_stream, cfg.seq_len, cfg.eval_windows)

  state_path = work_dir / STATE_FILE
  start, elapsed = 0, 0.0
  if resume and state_path.is_file():
    start, elapsed, params, opt_state = _load_state(state_path, params, opt_state, config, cfg)
    logger.info("resumed from %s at step %d", state_path, start)
  log = (work_dir / LOG_FILE).open("a")

  def evaluate(step: int) -> float:
    value = float(eval_loss_fn(params, eval_batch))
    log.write(json.dumps({"step": step, "eval_loss": value}) + "\n")
    log.flush()
    return value

  eval_loss = float("nan")
  end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
  bar = tqdm(range(start, end), initial=start, total=cfg.steps, desc="train", disable=not progress)
  for step in bar:
    tokens = jnp.asarray(sample_batch(train_stream, cfg, step))
    began = time.perf_counter()
    params, opt_state, metrics = train_step(params, opt_state, tokens)
    metrics = {k: float(v) for k, v in metrics.items()}  # waits for the step to finish
    seconds = time.perf_counter() - began
    elapsed += seconds
    done = step + 1
    if done % cfg.log_every == 0 or done == cfg.steps:
      record = {"step": done, **metrics, "seconds": round(seconds, 3), "tokens_per_s": round(cfg.tokens_per_step / seconds)}
      log.write(json.dumps(record) + "\n")
      log.flush()
      bar.set_postfix(loss=f"{metrics['loss']:.3f}", balance=f"{metrics['load_balance']:.3f}")
    if done % cfg.eval_every == 0 or done in (cfg.steps, end):
      eval_loss = evaluate(done)
      logger.info("step %d: train loss %.4f, eval loss %.4f", done, metrics["loss"], eval_loss)
    if done % cfg.checkpoint_every == 0 or done in (cfg.steps, end):
      _save_state(state_path, done, elapsed, params, opt_state, config, cfg)
  if start >= cfg.steps:
    eval_loss = evaluate(cfg.steps)
  log.close()

  pure = jax.tree_util.tree_map(np.asarray, nnx.to_pure_dict(params))
  return TrainResult(params=pure, steps=end, tokens_seen=end * cfg.tokens_per_step,
                     train_seconds=elapsed, final_eval_loss=eval_loss)
