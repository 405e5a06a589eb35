"""Test and benchmark helpers: a stub step runner, a manual clock, a tiny tokenizer, a tiny served checkpoint."""

from __future__ import annotations

import contextlib
import string
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from serve.config import Program
from serve.latency import LatencyTable
from serve.runner import StepBatch

TOKENIZER_TEXT = (
    "the quick brown fox jumps over the lazy dog. ",
    "hello world, this is a tiny tokenizer for tests! ",
    "Sub-experts split each expert into N groups of neurons, and the budget says how many run. ",
)


class ManualClock:
  """A clock that moves only by hand: `clock()` reads it, `advance(seconds)` moves it."""

  def __init__(self, start: float = 0.0):
    self.now = start

  def __call__(self) -> float:
    return self.now

  def advance(self, seconds: float) -> None:
    self.now += seconds


class StubRunner:
  """A `StepRunner` without a model, to test scheduling alone.

  Its logits are fixed: a one-hot of `next_token(last fed token)` for every row, so greedy
  and sampled picks agree and outputs are predictable (the default continues 5 -> 6 -> 7 ...
  and wraps to 1, never producing EOS id 0). With `clock` and `latency`, each step advances
  the clock by the table's prediction for its program, which simulates serving in virtual
  time. `fail_when(batch)` raising-condition injects step failures. Every call is recorded
  in `calls`.
  """

  def __init__(self, *, full_budget: int = 8, num_sub_experts: int = 4, num_slots: int = 4, max_len: int = 64,
               vocab_size: int = 32, eos_token_ids: tuple[int, ...] = (0,),
               next_token: Callable[[int], int] | None = None, clock: ManualClock | None = None,
               latency: LatencyTable | None = None, fail_when: Callable[[StepBatch], bool] | None = None):
    self.full_budget, self.num_sub_experts = full_budget, num_sub_experts
    self.num_slots, self.max_len, self.vocab_size = num_slots, max_len, vocab_size
    self.eos_token_ids = eos_token_ids
    self.next_token = next_token or (lambda token: token % (vocab_size - 1) + 1)
    self.clock, self.latency, self.fail_when = clock, latency, fail_when
    self.compiled: list[Program] = []
    self.calls: list[StepBatch] = []
    self.resets = 0

  def compile(self, programs: Sequence[Program], *, workers: int = 1, progress: bool = True) -> None:
    for program in programs:
      if program.batch > self.num_slots:
        raise ValueError(f"batch bucket {program.batch} exceeds the {self.num_slots} cache slots")
      if not 1 <= program.budget <= self.full_budget:
        raise ValueError(f"budget {program.budget} is out of range 1..{self.full_budget}")
    self.compiled.extend(p for p in programs if p not in self.compiled)

  def run(self, batch: StepBatch) -> np.ndarray:
    if batch.program not in self.compiled:
      raise KeyError(f"no compiled program for {batch.program}")
    self.calls.append(batch)
    if self.clock is not None and self.latency is not None:
      self.clock.advance(self.latency.predict(*batch.program))
    if self.fail_when is not None and self.fail_when(batch):
      raise RuntimeError("injected step failure")
    rows = np.arange(batch.tokens_BT.shape[0])
    last_B = batch.tokens_BT[rows, batch.last_index_B]
    return np.array([self.next_token(int(t)) if batch.valid_BT[i].any() else 0 for i, t in enumerate(last_B)],
                    np.int32)

  def cache_intact(self) -> bool:
    return True

  def reset(self) -> None:
    self.resets += 1


def linear_latency(programs: Sequence[Program], *, base_s: float = 1e-3, per_token_s: float = 1e-4,
                   full_budget: int = 8) -> LatencyTable:
  """Build a synthetic table: base + per_token x batch x tokens x (0.5 + 0.5 budget / full budget)."""
  seconds = {p: base_s + per_token_s * p.batch * p.tokens * (0.5 + 0.5 * p.budget / full_budget) for p in programs}
  return LatencyTable(seconds, {"source": "linear_latency"})


def char_tokenizer(vocab_size: int = 128):
  """Train a BPE `tokenizers.Tokenizer` over printable ASCII in milliseconds; id 0 is '<eos>', 1 '<unk>'."""
  from tokenizers import Tokenizer, decoders, models, trainers  # pylint: disable=import-outside-toplevel

  alphabet = list(string.ascii_letters + string.digits + " .,!?'-\n")
  if vocab_size < len(alphabet) + 2:
    raise ValueError(f"vocab_size {vocab_size} is too small for the {len(alphabet)}-character alphabet + 2 specials")
  tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
  tokenizer.decoder = decoders.Fuse()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>", "<unk>"], initial_alphabet=alphabet,
                                limit_alphabet=len(alphabet), show_progress=False)
  tokenizer.train_from_iterator(list(TOKENIZER_TEXT) * 8, trainer)
  return tokenizer


def tiny_served_checkpoint(root: str | Path, *, num_sub_experts: int = 4, seed: int = 0) -> tuple[Path, Path]:
  """Write a tiny random checkpoint with a char tokenizer, and an identity partition; return both dirs."""
  # Imported here: the model stack is heavy and the stub-only tests do not need it.
  from prism_jax.checkpoint import read_meta  # pylint: disable=import-outside-toplevel
  from prism_jax.partition_io import write_partition  # pylint: disable=import-outside-toplevel
  from prism_jax.subexperts import identity_partition  # pylint: disable=import-outside-toplevel
  from prism_jax.testing import TINY, tiny_checkpoint  # pylint: disable=import-outside-toplevel

  root = Path(root)
  checkpoint = tiny_checkpoint(root / "checkpoint", seed=seed)
  tokenizer_dir = checkpoint / "tokenizer"
  tokenizer_dir.mkdir(exist_ok=True)
  char_tokenizer(TINY.vocab_size).save(str(tokenizer_dir / "tokenizer.json"))
  _, meta = read_meta(checkpoint)
  fingerprint = meta["fingerprint"]
  partition = identity_partition(TINY.num_experts, TINY.moe_intermediate_size, num_sub_experts,
                                 TINY.moe_layer_indices, fingerprint)
  partition_dir = write_partition(root / "partition", partition, {"solver": "identity"})
  return checkpoint, partition_dir


@contextlib.contextmanager
def background_server(app, host: str = "127.0.0.1") -> Iterator[str]:
  """Serve `app` with uvicorn on a free loopback port in a thread; yields the base URL."""
  import uvicorn  # pylint: disable=import-outside-toplevel

  from serve.server import bind_socket  # pylint: disable=import-outside-toplevel

  sock = bind_socket(host, 0)
  server = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="off", timeout_graceful_shutdown=5))
  thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="test-server", daemon=True)
  thread.start()
  deadline = time.monotonic() + 30
  while not server.started:
    if time.monotonic() > deadline or not thread.is_alive():
      raise RuntimeError("the test server did not start within 30 s")
    time.sleep(0.01)
  try:
    yield f"http://{host}:{sock.getsockname()[1]}"
  finally:
    server.should_exit = True
    thread.join(30)
    sock.close()
