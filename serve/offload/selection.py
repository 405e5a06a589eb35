"""Selection of the candidate sub-experts that run: all of them, or resident ones first under a target.

`exact` runs every candidate of the budget (fetching what is missing), which reproduces the
fully resident model. `resident_first` runs every resident candidate, then fetches missing
ones only while the token is below its quality target:

- `min_sub_experts` m: at least min(m, candidates) sub-experts run, missing ones fetched in
  rank order;
- `min_mass` f: the mass of what runs is at least f times the mass of all candidates (see
  `routing` for the mass), missing ones fetched from the heaviest down.

Once a unit is fetched for one token, every token of the step whose candidate it is runs it
too. Routing weights are not renormalized over what runs (as the compound router does not
renormalize over sub-experts), so a skipped sub-expert simply contributes nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

SelectionMode = Literal["exact", "resident_first"]


@dataclasses.dataclass(frozen=True)
class Selection:
  """The quality target of the budget-aware choice (see the module docstring)."""

  mode: SelectionMode = "exact"
  min_sub_experts: int | None = None
  min_mass: float | None = None

  def __post_init__(self):
    if self.mode not in ("exact", "resident_first"):
      raise ValueError(f"selection mode must be 'exact' or 'resident_first', got {self.mode!r}")
    if self.mode == "exact" and (self.min_sub_experts is not None or self.min_mass is not None):
      raise ValueError("min_sub_experts and min_mass apply to mode='resident_first'; exact runs every candidate")
    if self.mode == "resident_first" and self.min_sub_experts is None and self.min_mass is None:
      raise ValueError("mode='resident_first' needs a quality target: min_sub_experts (sub-experts per token "
                       "that must run) and/or min_mass (fraction of routing mass, e.g. 0.9)")
    if self.min_sub_experts is not None and (isinstance(self.min_sub_experts, bool) or self.min_sub_experts < 1):
      raise ValueError(f"min_sub_experts must be an integer >= 1, got {self.min_sub_experts!r}")
    if self.min_mass is not None and not 0 < self.min_mass <= 1:
      raise ValueError(f"min_mass must be a fraction in (0, 1], got {self.min_mass!r}")

  @classmethod
  def parse(cls, text: str) -> Selection:
    """'exact', 'mass:0.9', 'min:4' or 'min:4,mass:0.9' (the command-line form)."""
    text = text.strip()
    if text == "exact":
      return cls()
    values: dict[str, float] = {}
    for item in text.split(","):
      name, _, value = item.partition(":")
      try:
        values[name.strip()] = float(value)
      except ValueError:
        values[name.strip()] = float("nan")
    if not values or not set(values) <= {"min", "mass"} or any(np.isnan(v) for v in values.values()):
      raise ValueError(f"selection {text!r} is not valid; expected 'exact', 'mass:F', 'min:M' or 'min:M,mass:F'")
    minimum = values.get("min")
    return cls("resident_first", None if minimum is None else int(minimum), values.get("mass"))


def choose(selection: Selection, unit_SA: np.ndarray, mass_SA: np.ndarray, valid_SA: np.ndarray,
           resident_SA: np.ndarray) -> np.ndarray:
  """Decide which candidates run: bool [S, A], with candidates in rank order along A."""
  if selection.mode == "exact":
    return valid_SA.copy()
  missing_SA = valid_SA & ~resident_SA
  fetch_SA = np.zeros_like(valid_SA)
  if selection.min_sub_experts is not None:
    floor_S = np.minimum(selection.min_sub_experts, valid_SA.sum(axis=1))
    short_S = np.maximum(floor_S - (valid_SA & resident_SA).sum(axis=1), 0)
    # The n-th missing candidate in rank order is fetched when the token is still n or more short.
    nth_missing_SA = np.cumsum(missing_SA, axis=1)
    fetch_SA |= missing_SA & (nth_missing_SA <= short_S[:, None])
  if selection.min_mass is not None:
    mass_SA = np.where(valid_SA, mass_SA, 0.0)
    covered_S = np.sum(np.where(resident_SA | fetch_SA, mass_SA, 0.0), axis=1)
    target_S = selection.min_mass * mass_SA.sum(axis=1)
    open_SA = missing_SA & ~fetch_SA
    # Heaviest missing first; take each while the mass covered before it is still short.
    order_SA = np.argsort(np.where(open_SA, -mass_SA, np.inf), axis=1, kind="stable")
    sorted_SA = np.take_along_axis(np.where(open_SA, mass_SA, 0.0), order_SA, axis=1)
    before_SA = covered_S[:, None] + np.cumsum(sorted_SA, axis=1) - sorted_SA
    slack_S = 1e-9 * np.maximum(target_S, 1e-30)
    take_sorted = np.take_along_axis(open_SA, order_SA, axis=1) & (before_SA < (target_S - slack_S)[:, None])
    np.put_along_axis(fetch_SA, order_SA, take_sorted | np.take_along_axis(fetch_SA, order_SA, axis=1), axis=1)
  fetched_units = np.unique(unit_SA[fetch_SA])
  return valid_SA & (resident_SA | np.isin(unit_SA, fetched_units))
