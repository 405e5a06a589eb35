"""`prism demo` end to end on the embedded model (slow: several minutes on two cores)."""

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_and_resumes(tmp_path):
  command = [sys.executable, "-m", "prism_jax.cli", "demo", "--out", str(tmp_path / "demo"), "--calib-tokens",
             "4096", "--eval-tokens", "2048"]
  first = subprocess.run(command, capture_output=True, text=True, timeout=1800)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "stable operating points" in first.stdout
  assert "Sample completions" in first.stdout
  assert (tmp_path / "demo" / "curve" / "curve.png").is_file()
  assert (tmp_path / "demo" / "curve" / "curve.json").is_file()

  second = subprocess.run(command, capture_output=True, text=True, timeout=1800)
  assert second.returncode == 0, second.stderr[-3000:]
  for step in ("convert", "partition", "curve"):
    assert f"{step}: reusing" in second.stderr, f"second run redid the {step} step"
