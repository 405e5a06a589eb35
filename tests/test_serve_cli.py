"""`prism profile` and `prism serve` end to end: a latency table, and SIGTERM draining a subprocess server."""

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from prism_jax.cli import main
from serve.latency import LatencyTable
from serve.testing import tiny_served_checkpoint

# The same engine settings as tests/test_engine_model.py, so the shared compilation cache hits.
ENGINE_FLAGS = ["--batch-buckets", "2", "--token-buckets", "16", "--budgets", "8", "--max-len", "64"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  checkpoint, partition = tiny_served_checkpoint(tmp_path_factory.mktemp("cli"))
  cache = tmp_path_factory.getbasetemp() / "jax-compilation-cache"
  return checkpoint, partition, cache


def test_profile_writes_table(served, tmp_path):
  checkpoint, partition, cache = served
  out = tmp_path / "table.json"
  code = main(["profile", str(checkpoint), "--partition", str(partition), "--out", str(out), "--repeats", "2",
               "--compilation-cache-dir", str(cache), *ENGINE_FLAGS])
  assert code == 0
  table = LatencyTable.load(out)
  assert sorted(table.seconds) == [(2, 1, 8), (2, 16, 8)]
  assert all(0 < s < 10 for s in table.seconds.values()), table.seconds
  assert table.meta["num_sub_experts"] == 4
  assert table.meta["fingerprint"] == json.loads((checkpoint / "prism.json").read_text())["fingerprint"]


def test_profile_offloaded_model(served, tmp_path, capsys):
  checkpoint, partition, cache = served
  out = tmp_path / "table.json"
  code = main(["profile", str(checkpoint), "--partition", str(partition), "--out", str(out), "--repeats", "1",
               "--expert-memory", "50%", "--offload-dir", str(tmp_path / "offload"),
               "--compilation-cache-dir", str(cache), *ENGINE_FLAGS])
  assert code == 0
  table = LatencyTable.load(out)
  assert sorted(table.seconds) == [(2, 1, 8), (2, 16, 8)]
  assert table.meta["expert_memory"] == "50%"
  assert "expert cache while timing: hit rate" in capsys.readouterr().out


def test_profile_rejects_bad_flags(served, tmp_path, capsys):
  checkpoint, partition, _ = served
  code = main(["profile", str(checkpoint), "--partition", str(partition), "--out", str(tmp_path / "t.json"),
               "--batch-buckets", "4,2"])
  assert code == 2
  assert "strictly increasing" in capsys.readouterr().err


def start_server(checkpoint, partition, cache):
  command = [sys.executable, "-m", "prism_jax.cli", "serve", str(checkpoint), "--partition", str(partition),
             "--port", "0", "--compilation-cache-dir", str(cache), "--max-queue", "32", *ENGINE_FLAGS]
  process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"})
  deadline = time.monotonic() + 180
  while time.monotonic() < deadline:
    line = process.stdout.readline()
    if line.startswith("listening on "):
      return process, line.split()[-1]
    if not line and process.poll() is not None:
      break
  process.kill()
  raise AssertionError(f"server failed to start within 180 s: {process.stderr.read()[-3000:]}")


def test_sigterm_drains_in_flight_requests(served):
  process, url = start_server(*served)
  try:
    count, max_tokens = 12, 60

    def ask(i):
      return httpx.post(f"{url}/v1/completions", timeout=120,
                        json={"prompt": [i + 1, 2, 3], "max_tokens": max_tokens, "temperature": 0})

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
      futures = [pool.submit(ask, i) for i in range(count)]
      deadline = time.monotonic() + 30
      while time.monotonic() < deadline:
        health = httpx.get(f"{url}/health", timeout=10).json()
        if health["waiting"] + health["running"] + sum(f.done() for f in futures) >= count:
          break
        time.sleep(0.005)
      in_flight = sum(not f.done() for f in futures)
      process.send_signal(signal.SIGTERM)
      responses = [f.result(120) for f in futures]
    code = process.wait(60)
  finally:
    if process.poll() is None:
      process.kill()
  log = process.stderr.read()
  assert in_flight > 0, "every request finished before SIGTERM; the test proved nothing"
  assert [r.status_code for r in responses] == [200] * count, [r.text for r in responses if r.status_code != 200]
  for response in responses:
    choice = response.json()["choices"][0]
    assert len(choice["token_ids"]) == max_tokens or choice["finish_reason"] == "stop", choice
  assert code == 0, log[-3000:]
  assert "received SIGTERM" in log
  assert "server stopped cleanly" in log
