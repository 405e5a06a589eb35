"""Reference-model tooling: text splits, tokenizer, losses and a few training steps on a tiny config."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prism_jax.config import ModelConfig
from prism_jax.moe import MoEInfo
from prism_jax.reference import data as text_data
from prism_jax.reference.recipe import TrainConfig
from prism_jax.reference.tokenizer import encode_documents, end_of_text_id, train_tokenizer
from prism_jax.reference.train import eval_windows, load_balance_loss, sample_batch, train

MICRO = ModelConfig(
    family="qwen3_moe",
    vocab_size=512,
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    qk_norm="head",
    max_position_embeddings=64,
    eos_token_ids=(0,),
)


def _chapter_headers(text: str) -> list[str]:
  return [doc.splitlines()[0] for doc in text_data.split_documents(text)]


@pytest.fixture(scope="module")
def small_tokenizer():
  documents = text_data.split_documents(text_data.default_text("calibration"))
  return train_tokenizer(documents, 512)


def test_parse_bible_output():
  sample = "\nGenesis 1\n\n  1 In the beginning.\n  2 And the earth.\n\n1 Samuel 2\n\n  1 And Hannah prayed.\n"
  chapters = text_data.parse_bible_output(sample)
  assert [(c.book, c.number) for c in chapters] == [("Genesis", 1), ("1 Samuel", 2)]
  assert chapters[0].verses == ("In the beginning.", "And the earth.")
  assert chapters[1].to_text() == "1 Samuel 2\nAnd Hannah prayed."


def test_parse_rejects_stray_line():
  with pytest.raises(ValueError, match="unexpected line"):
    text_data.parse_bible_output("Genesis 1\n  1 In the beginning.\nnot a verse or a header line here:\n")


def test_shipped_splits_are_disjoint():
  headers = {split: _chapter_headers(text_data.default_text(split)) for split in text_data.SPLITS}
  for split, names in headers.items():
    assert len(names) == len(set(names)), f"{split} repeats a chapter"
  assert not set(headers["train"]) & set(headers["eval"])
  assert not set(headers["train"]) & set(headers["calibration"])
  assert not set(headers["eval"]) & set(headers["calibration"])
  assert sum(len(names) for names in headers.values()) == 1189
  assert headers["eval"][0] == "Genesis 11"
  assert headers["calibration"][0] == "Genesis 16"


def test_split_rule():
  assert [text_data.split_of(i) for i in (0, 9, 10, 15, 30, 35)] == [
      "train", "train", "eval", "calibration", "eval", "calibration"]


def test_default_text_sizes_and_file():
  for split, low, high in (("train", 3_000_000, 4_500_000), ("calibration", 100_000, 400_000),
                           ("eval", 100_000, 400_000)):
    size = len(text_data.default_text(split))
    assert low < size < high, f"{split} has {size} characters"
  path = text_data.default_text_file("eval")
  assert path.read_text() == text_data.default_text("eval")
  assert not re.search(r"^\s*\d+ ", text_data.default_text("eval").split("\n", 2)[1]), "verse numbers leaked"


def test_default_text_rejects_unknown_split():
  with pytest.raises(ValueError, match="unknown text split"):
    text_data.default_text("test")


def test_tokenizer_round_trip(small_tokenizer):
  assert end_of_text_id(small_tokenizer) == 0
  chapter = text_data.split_documents(text_data.default_text("eval"))[0]
  ids = small_tokenizer.encode(chapter).ids
  assert small_tokenizer.decode(ids) == chapter
  stream = encode_documents(small_tokenizer, [chapter, chapter])
  assert stream.dtype == np.int32
  assert list(np.flatnonzero(stream == 0)) == [len(ids), 2 * len(ids) + 1]


def test_load_balance_loss_values():
  uniform = MoEInfo(router_probs_SE=jnp.full((8, 4), 0.25), top_experts_SK=jnp.array([[0, 1], [2, 3]] * 4),
                    active_S=jnp.zeros((8,), jnp.int32))
  assert float(load_balance_loss(uniform, 4)) == pytest.approx(1.0)
  # Every token sends both slots to experts 0 and 1 with probability 1/2 each: E * (2 * 1/2 * 1/2) = E / K.
  collapsed = MoEInfo(router_probs_SE=jnp.tile(jnp.array([0.5, 0.5, 0.0, 0.0]), (8, 1)),
                      top_experts_SK=jnp.tile(jnp.array([0, 1]), (8, 1)), active_S=jnp.zeros((8,), jnp.int32))
  assert float(load_balance_loss(collapsed, 4)) == pytest.approx(2.0)


def test_eval_windows_layout():
  stream = np.arange(10, dtype=np.int32)
  windows = eval_windows(stream, 4)
  np.testing.assert_array_equal(windows, [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8]])
  assert eval_windows(stream, 4, max_windows=1).shape == (1, 5)


def test_sample_batch_depends_on_seed_and_step():
  stream = np.arange(1000, dtype=np.int32)
  cfg = TrainConfig(batch_size=4, seq_len=8, steps=10, warmup_steps=1)
  np.testing.assert_array_equal(sample_batch(stream, cfg, 3), sample_batch(stream, cfg, 3))
  assert not np.array_equal(sample_batch(stream, cfg, 3), sample_batch(stream, cfg, 4))
  assert sample_batch(stream, cfg, 3).shape == (4, 9)


def test_training_reduces_loss_and_resumes(small_tokenizer, tmp_path):
  stream = encode_documents(small_tokenizer, text_data.split_documents(text_data.default_text("calibration")))
  train_stream, eval_stream = stream[:-4000], stream[-4000:]
  cfg = TrainConfig(steps=12, batch_size=8, seq_len=32, peak_learning_rate=1e-2, warmup_steps=2,
                    eval_every=100, eval_windows=16, checkpoint_every=100, log_every=1)
  first = train(MICRO, cfg, train_stream, eval_stream, tmp_path / "resumed", progress=False, stop_at=1)
  resumed = train(MICRO, cfg, train_stream, eval_stream, tmp_path / "resumed", progress=False)
  straight = train(MICRO, cfg, train_stream, eval_stream, tmp_path / "straight", progress=False)

  assert np.isfinite(resumed.final_eval_loss)
  assert first.final_eval_loss > resumed.final_eval_loss + 0.5, (
      f"eval loss went from {first.final_eval_loss:.3f} after 1 step to {resumed.final_eval_loss:.3f} after 12")
  assert resumed.steps == 12
  assert resumed.tokens_seen == 12 * 8 * 32
  errors = jax.tree_util.tree_leaves(
      jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(a - b))), resumed.params, straight.params))
  assert max(errors) < 1e-6, f"resumed and uninterrupted weights differ by up to {max(errors):.3g}"
