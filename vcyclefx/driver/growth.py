"""When to grow, measured: leave the coarse level once its loss falls more slowly per FLOP than
the full model's does at the same loss (staged training's criterion, Shen et al., ICML 2022).

The coarse level's slope is read from the run's own validation curve: the least-squares slope
``dL/dC`` of its last ``window`` evaluations, C the run's cumulative training FLOPs. The full
model's slope at the same loss L is read from its frontier (the baselines, each fully decayed,
piecewise linear in log C: ``driver.saving.Frontier``)::

    dL/dC |full (L) = (L_{i+1} - L_i) / (ln(C_{i+1} / C_i) * C_full(L))

on the segment that holds L (the nearest one's line outside the bracket). Growing pays while
training the coarse level lowers the loss faster per FLOP than the full model would at that loss,
so the coarse stage ends at the first evaluation where

    -dL/dC |coarse  <  -dL/dC |full (L)      (or the coarse loss no longer falls).

The driver's ``--grow-when slope`` applies it to the bottom stage (at most its ``--fractions``
share); the steps it leaves go to the way up, so the V-cycle's total steps stay the same.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from vcyclefx.driver.saving import Frontier

DEFAULT_WINDOW = 4


def curve_slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope dL/dC of ``(cost, loss)`` points (None for fewer than 2)."""
    if len(points) < 2:
        return None
    n = len(points)
    mc = sum(c for c, _ in points) / n
    ml = sum(l for _, l in points) / n
    var = sum((c - mc) ** 2 for c, _ in points)
    if var == 0:
        return None
    return sum((c - mc) * (l - ml) for c, l in points) / var


def frontier_slope(frontier: Frontier, loss: float) -> float:
    """dL/dC of the full model's frontier at ``loss`` (module docstring; negative)."""
    need = frontier.cost_at(loss, extrapolate=True)
    i, _ = frontier._segment(loss)
    (c0, l0), (c1, l1) = frontier.points[i], frontier.points[i + 1]
    return (l1 - l0) / (math.log(c1 / c0) * need.value)


def should_grow(points: list[tuple[float, float]], frontier: Frontier,
                window: int = DEFAULT_WINDOW) -> bool:
    """Whether the coarse level, at the last of its ``(flops, loss)`` evaluations, falls more
    slowly per FLOP than the full frontier at its latest loss (needs ``window`` points)."""
    if len(points) < window:
        return False
    recent = points[-window:]
    slope = curve_slope(recent)
    if slope is None:
        return False
    return slope >= 0 or -slope < -frontier_slope(frontier, recent[-1][1])


def growth_point(points: list[tuple[float, float]], frontier: Frontier,
                 window: int = DEFAULT_WINDOW) -> int | None:
    """Index of the first evaluation at which ``should_grow`` holds (None if never)."""
    for k in range(window, len(points) + 1):
        if should_grow(points[:k], frontier, window):
            return k - 1
    return None


def load_frontier(path: str | Path) -> Frontier:
    """A full model's frontier from ``--grow-frontier``: a JSON ``{"points": [[flops, loss],
    ...]}`` or the ``summary.json`` of a ``--schedule compare`` run (its baselines)."""
    from vcyclefx.driver.config import ConfigError

    try:
        data = json.loads(Path(path).read_text())
        if "points" in data:
            pts = [(float(c), float(l)) for c, l in data["points"]]
        else:
            budgets = data["effective_saving"]["budgets"].values()
            pts = [(b["flops"], b["final_val_loss"]) for b in budgets]
        front = Frontier.from_points(pts)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--grow-frontier {path}: not a frontier ({e}); give a JSON "
                          '{"points": [[flops, loss], ...]} with 2 or more baselines of the full '
                          "model, or the summary.json of a --schedule compare run") from None
    if len(front.points) < 2:
        raise ConfigError(f"--grow-frontier {path}: {len(front.points)} usable baseline point(s); "
                          "the slope needs 2 or more, each costlier one ending lower")
    return front
