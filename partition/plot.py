"""curve.png: perplexity against routed-expert FLOPs for the budgets and the top-k baseline."""

from __future__ import annotations

import os
from pathlib import Path

from partition.curve import Curve


def plot_curve(curve: Curve, path: str | os.PathLike, title: str | None = None) -> Path:
  """Draw both curves, ring the stable points and mark the tolerance line; returns the path."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, ax = plt.subplots(figsize=(7, 4.5))
  styles = {"budget": ("tab:blue", "o", "sub-expert budget k'"), "top_k": ("tab:orange", "s", "original top-k")}
  for kind, (color, marker, label) in styles.items():
    points = sorted((p for p in curve.points if p.kind == kind), key=lambda p: p.flops_per_token)
    if not points:
      continue
    x = [p.flops_per_token / 1e6 for p in points]
    y = [p.perplexity for p in points]
    ax.plot(x, y, marker=marker, color=color, label=label)
    stable = [(xi, yi) for xi, yi, p in zip(x, y, points) if p.stable]
    if stable:
      ax.scatter(*zip(*stable), s=140, facecolors="none", edgecolors=color, linewidths=1.5)
    for xi, yi, p in zip(x, y, points):
      ax.annotate(str(p.k), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
  limit = curve.tolerance * curve.full_perplexity
  ax.axhline(limit, color="gray", linestyle="--", linewidth=1, label=f"{curve.tolerance} x full perplexity")
  counts = curve.stable_counts
  ax.set_xlabel("routed-expert MFLOPs per token")
  ax.set_ylabel("perplexity (held-out text)")
  ax.set_yscale("log")
  ax.set_title(title or f"stable points: {counts['budget']} budgets vs {counts['top_k']} top-k (circled)")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  path = Path(path)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
