"""Operating points: stability rule, top-k baseline, and the CLI end to end on a tiny checkpoint."""

import json

import numpy as np
import pytest

from partition.curve import OperatingPoint, mark_stable
from partition.layerwise import top_k_forward_fn
from prism_jax import cli
from prism_jax.checkpoint import save_params
from prism_jax.model import PrismModel
from prism_jax.testing import TINY, random_params

WORDS = ("the of and to in is was for on that with as by at from his her they we you this which one all were "
         "when there their been has more will would who what said so no up out if about into than them can only "
         "other new some could time these two may then do first any like now my such make over our even most").split()


def point(kind, k, perplexity, flops):
  return OperatingPoint(kind, k, perplexity, 1.0, flops, 0.0)


def test_mark_stable_rule():
  points = [point("budget", 1, 30.0, 1), point("budget", 2, 12.0, 2), point("budget", 3, 12.5, 3),
            point("budget", 4, 10.0, 4), point("top_k", 1, 14.0, 2), point("top_k", 2, 10.0, 4)]
  marked = mark_stable(points, full_perplexity=10.0, tolerance=1.25)
  assert [p.stable for p in marked] == [False, True, False, True, False, True]


@pytest.mark.slow
def test_top_k_baseline_full_k():
  model = PrismModel(TINY, random_params(TINY, seed=0, scale=6.0))
  tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 16)).astype(np.int32)
  valid = np.ones(tokens.shape, bool)
  err = np.abs(np.asarray(top_k_forward_fn(model, TINY.num_experts_per_tok, False)(tokens, valid))
               - np.asarray(model(tokens))).max()
  assert err <= 1e-5, f"max abs logit error {err:.2e}"


@pytest.mark.slow
def test_top_one_baseline_matches_top_one_model():
  # Without top-k normalization, the first expert keeps its softmax weight, as a K=1 model has it.
  config = TINY.replace(norm_topk_prob=False)
  params = random_params(config, seed=1, scale=6.0)
  tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, 16)).astype(np.int32)
  got = np.asarray(top_k_forward_fn(PrismModel(config, params), 1, False)(tokens, np.ones(tokens.shape, bool)))
  want = np.asarray(PrismModel(config.replace(num_experts_per_tok=1), params)(tokens))
  err = np.abs(got - want).max()
  assert err <= 1e-5, f"max abs logit error {err:.2e}"


def write_text(path, words, seed):
  rng = np.random.default_rng(seed)
  paragraphs = [" ".join(rng.choice(WORDS, size=rng.integers(20, 60))) + "." for _ in range(words // 40)]
  path.write_text("\n\n".join(paragraphs))
  return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # pylint: disable=import-outside-toplevel

  root = tmp_path_factory.mktemp("curve")
  tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  trainer = trainers.BpeTrainer(vocab_size=TINY.vocab_size, special_tokens=["[UNK]"], show_progress=False)
  tokenizer.train_from_iterator([" ".join(WORDS)] * 20, trainer)
  assert tokenizer.get_vocab_size() <= TINY.vocab_size
  (root / "tok").mkdir()
  tokenizer.save(str(root / "tok" / "tokenizer.json"))
  ckpt = save_params(root / "ckpt", TINY, random_params(TINY, seed=0, scale=6.0), source="random seed 0",
                     tokenizer_files=[root / "tok" / "tokenizer.json"])
  return root, ckpt


def test_cli_partition_and_curve(checkpoint, capsys):
  root, ckpt = checkpoint
  calib = write_text(root / "calib.txt", 3000, seed=0)
  held_out = write_text(root / "eval.txt", 1200, seed=1)
  part = root / "part"
  assert cli.main(["partition", str(ckpt), "--calib", str(calib), "--out", str(part), "--num-sub-experts", "2",
                   "--sequence-length", "64", "--tokens-per-expert", "256"]) == 0
  printed = capsys.readouterr().out
  for name in ("evosax", "random", "identity"):
    assert name in printed
  summary = json.loads((part / "partition.json").read_text())
  assert summary["solver"] == "evosax"
  assert summary["num_sub_experts"] == 2
  assert summary["calibration"]["source"] == str(calib)
  assert summary["calibration"]["tokens"] > 1000
  for layer in summary["layers"].values():
    assert layer["objective"] <= layer["references"]["random"]
    assert layer["objective"] <= layer["references"]["identity"]

  out = root / "curve"
  assert cli.main(["curve", str(ckpt), "--partition", str(part), "--eval", str(held_out), "--out", str(out),
                   "--sequence-length", "64", "--batch-size", "4"]) == 0
  printed = capsys.readouterr().out
  assert "stable operating points" in printed
  record = json.loads((out / "curve.json").read_text())
  assert (out / "curve.png").stat().st_size > 1000
  points = record["points"]
  full = 2 * TINY.num_experts_per_tok
  assert [(p["kind"], p["k"]) for p in points] == (
      [("budget", k) for k in range(1, full + 1)] + [("top_k", k) for k in range(1, TINY.num_experts_per_tok + 1)])
  for p in points:
    assert set(p) >= {"kind", "k", "perplexity", "agreement", "flops_per_token", "seconds"}
    assert p["perplexity"] > 1
    assert 0 <= p["agreement"] <= 1
    assert p["flops_per_token"] > 0
    assert p["seconds"] > 0
  assert set(record["stable_counts"]) == {"budget", "top_k"}
  assert record["tolerance"] == 1.25
  by_key = {(p["kind"], p["k"]): p for p in points}
  full_budget, full_top_k = by_key[("budget", full)], by_key[("top_k", TINY.num_experts_per_tok)]
  assert full_budget["perplexity"] == pytest.approx(full_top_k["perplexity"], rel=1e-5)
  assert full_budget["agreement"] == pytest.approx(1.0)
  assert full_budget["flops_per_token"] == pytest.approx(full_top_k["flops_per_token"])
  # Budget N runs one whole expert: the same FLOPs as top-1.
  assert by_key[("budget", 2)]["flops_per_token"] == pytest.approx(by_key[("top_k", 1)]["flops_per_token"])

  # Existing outputs are rejected, naming the path and the fix.
  assert cli.main(["curve", str(ckpt), "--partition", str(part), "--eval", str(held_out), "--out", str(out)]) == 2
  assert cli.main(["partition", str(ckpt), "--calib", str(calib), "--out", str(part)]) == 2


def test_cli_rejects_bad_inputs(checkpoint, caplog):
  root, ckpt = checkpoint
  calib = write_text(root / "calib_small.txt", 3000, seed=2)
  assert cli.main(["partition", str(ckpt), "--calib", str(calib), "--out", str(root / "p3"),
                   "--num-sub-experts", "3"]) == 2
  assert "num_sub_experts=3 does not divide" in caplog.text
  (root / "empty.txt").write_text("\n")
  assert cli.main(["partition", str(ckpt), "--calib", str(root / "empty.txt"), "--out", str(root / "p4")]) == 2
  assert "empty" in caplog.text
  assert cli.main(["partition", str(ckpt), "--calib", str(root / "missing.txt"), "--out", str(root / "p5")]) == 2
  assert "not found" in caplog.text
  for name in ("p3", "p4", "p5"):
    assert not (root / name).exists()
    assert not (root / f"{name}.partial").exists()
