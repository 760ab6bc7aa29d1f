"""The effective saving of a schedule against a baseline *frontier* (pure functions).

The baseline trained at several budgets C_1 < C_2 < ... (each with its own warm-up and full
cosine decay) ends at losses L_1 > L_2 > ...; the frontier L(C) is piecewise linear in log C
through those points. A schedule that spends C and ends at L would have needed C_frontier(L) as a
plain baseline, so its **effective saving** is::

    saving = 1 - C / C_frontier(L)
    log C_frontier(L) = log C_i + (L_i - L) / (L_i - L_{i+1}) * (log C_{i+1} - log C_i)
                        for L_{i+1} <= L <= L_i

in training FLOPs, and in wall seconds with the baseline's cost of budget i taken as its steps
times the baseline's measured seconds per step (in the same run, so machine load cancels).

A point that costs more than a cheaper one and ends no lower is dominated (noise, or a budget
past the point of no return) and left out, so the frontier is strictly decreasing and has an
inverse. Outside the bracket ``[L_last, L_first]`` there is no measured baseline: ``cost_at``
returns None, or with ``extrapolate=True`` the nearest segment's line, and the estimate says
``extrapolated=True`` (tables print it as such).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Estimate:
    value: float
    extrapolated: bool  # True: outside the measured bracket, from the nearest segment's line


@dataclass(frozen=True)
class Frontier:
    """Baseline points ``(cost, loss)``, cheapest first, losses strictly decreasing."""

    points: tuple[tuple[float, float], ...]

    @classmethod
    def from_points(cls, points) -> "Frontier":
        pts = sorted((float(c), float(l)) for c, l in points)
        if any(c <= 0 or not math.isfinite(c) or not math.isfinite(l) for c, l in pts):
            raise ValueError(f"frontier points need positive finite costs and finite losses: {pts}")
        kept: list[tuple[float, float]] = []
        for c, l in pts:
            if kept and (c == kept[-1][0] or l >= kept[-1][1]):
                continue  # dominated: costs as much or more, and is no lower
            kept.append((c, l))
        return cls(tuple(kept))

    @property
    def bracket(self) -> tuple[float, float]:
        """(lowest, highest) loss the frontier measures."""
        return self.points[-1][1], self.points[0][1]

    def _segment(self, loss: float) -> tuple[int, bool]:
        """Index i of the segment (points i, i+1) for ``loss`` and whether it lies inside."""
        lo, hi = self.bracket
        if loss > hi:
            return 0, False
        if loss < lo:
            return len(self.points) - 2, False
        for i in range(len(self.points) - 1):
            if self.points[i + 1][1] <= loss <= self.points[i][1]:
                return i, True
        raise AssertionError("unreachable: the losses are strictly decreasing")

    def cost_at(self, loss: float, extrapolate: bool = False) -> Estimate | None:
        """C_frontier(loss): the baseline cost that ends at ``loss``."""
        if len(self.points) == 1:
            c, l = self.points[0]
            return Estimate(c, False) if loss == l else None
        i, inside = self._segment(loss)
        if not inside and not extrapolate:
            return None
        (c0, l0), (c1, l1) = self.points[i], self.points[i + 1]
        t = (l0 - loss) / (l0 - l1)
        return Estimate(math.exp(math.log(c0) + t * (math.log(c1) - math.log(c0))), not inside)

    def loss_at(self, cost: float, extrapolate: bool = False) -> Estimate | None:
        """L(cost) on the frontier."""
        cs = [c for c, _ in self.points]
        if len(cs) == 1:
            return Estimate(self.points[0][1], False) if cost == cs[0] else None
        inside = cs[0] <= cost <= cs[-1]
        if not inside and not extrapolate:
            return None
        i = 0 if cost < cs[0] else len(cs) - 2
        for j in range(len(cs) - 1):
            if cs[j] <= cost <= cs[j + 1]:
                i = j
                break
        (c0, l0), (c1, l1) = self.points[i], self.points[i + 1]
        t = (math.log(cost) - math.log(c0)) / (math.log(c1) - math.log(c0))
        return Estimate(l0 + t * (l1 - l0), not inside)


def effective_saving(cost: float, loss: float, frontier: "Frontier | Envelope",
                     extrapolate: bool = False) -> Estimate | None:
    """``1 - cost / C_frontier(loss)`` (None outside the bracket unless ``extrapolate``); a
    frontier or an envelope (anything with ``cost_at``)."""
    need = frontier.cost_at(loss, extrapolate)
    if need is None:
        return None
    return Estimate(1.0 - cost / need.value, need.extrapolated)


@dataclass(frozen=True)
class Envelope:
    """The lower hull of several model sizes' frontiers (each in the same cost unit, FLOPs):
    at every loss, the cheapest size's cost. A schedule that ends at L for C beat every size the
    user could have trained instead only if ``1 - C / C_envelope(L) > 0``.

    ``cost_at(L)`` takes, over the frontiers whose measured bracket holds L, the lowest cost;
    when none holds it, the lowest of the extrapolated ones (labelled extrapolated), so a small
    model is never credited with a loss it was not measured to reach while a measured size is
    there. ``size_at`` says which frontier that was."""

    frontiers: dict  # name -> Frontier

    def _best(self, loss: float, extrapolate: bool) -> tuple[str, Estimate] | None:
        got = {n: f.cost_at(loss, extrapolate=True) for n, f in self.frontiers.items()}
        got = {n: e for n, e in got.items() if e is not None}
        inside = {n: e for n, e in got.items() if not e.extrapolated}
        pool = inside or (got if extrapolate else {})
        if not pool:
            return None
        name = min(pool, key=lambda n: pool[n].value)
        return name, pool[name]

    def cost_at(self, loss: float, extrapolate: bool = False) -> Estimate | None:
        best = self._best(loss, extrapolate)
        return best[1] if best else None

    def size_at(self, loss: float, extrapolate: bool = True) -> str | None:
        """The name of the frontier that is the envelope at ``loss``."""
        best = self._best(loss, extrapolate)
        return best[0] if best else None

    def best_at_cost(self, cost: float) -> tuple[str, float] | None:
        """(name, loss) of the size with the lowest measured loss at ``cost`` (inside brackets
        only), for "is the requested model the compute-efficient size at this budget?"."""
        got = {n: f.loss_at(cost) for n, f in self.frontiers.items()}
        got = {n: e.value for n, e in got.items() if e is not None}
        if not got:
            return None
        name = min(got, key=got.get)
        return name, got[name]


def envelope_saving(cost: float, loss: float, envelope: Envelope,
                    extrapolate: bool = False) -> Estimate | None:
    """``1 - cost / C_envelope(loss)`` (None where no size is measured unless ``extrapolate``)."""
    return effective_saving(cost, loss, envelope, extrapolate)


def saving_against(baselines: list[dict], schedule: dict, seconds_per_step: float | None = None,
                   extrapolate: bool = True) -> dict:
    """The effective saving of ``schedule`` (``flops``, ``wall``, ``loss``) against the frontier
    of ``baselines`` (each ``flops``, ``steps``, ``loss``, optionally ``wall``), in FLOPs and in
    wall seconds. The wall frontier costs budget i ``steps_i * seconds_per_step``; by default
    that rate is the median of the baselines' own ``wall / steps``. A JSON-able dict: per axis
    the saving, the frontier cost at the schedule's loss, and whether it was extrapolated."""
    flops = Frontier.from_points([(b["flops"], b["loss"]) for b in baselines])
    if seconds_per_step is None:
        rates = [b["wall"] / b["steps"] for b in baselines if b.get("wall") and b["steps"]]
        seconds_per_step = statistics.median(rates) if rates else None
    out: dict = {"loss": schedule["loss"], "bracket": list(flops.bracket),
                 "baseline_seconds_per_step": seconds_per_step}
    axes = {"flops": (flops, schedule["flops"])}
    if seconds_per_step:
        wall = Frontier.from_points([(b["steps"] * seconds_per_step, b["loss"]) for b in baselines])
        axes["wall"] = (wall, schedule.get("wall"))
    for axis in ("flops", "wall"):
        if axis not in axes or axes[axis][1] is None:
            out[axis] = out[f"{axis}_frontier"] = None
            out[f"{axis}_extrapolated"] = None
            continue
        front, cost = axes[axis]
        need = front.cost_at(schedule["loss"], extrapolate)
        s = effective_saving(cost, schedule["loss"], front, extrapolate)
        out[axis] = s.value if s else None
        out[f"{axis}_frontier"] = need.value if need else None
        out[f"{axis}_extrapolated"] = need.extrapolated if need else None
    return out


def envelope_against(sizes: dict[str, list[dict]], schedule: dict,
                     extrapolate: bool = True) -> dict:
    """The effective saving in FLOPs of ``schedule`` (``flops``, ``loss``) against the envelope
    of ``sizes`` (name -> that size's baselines, each ``flops`` and ``loss``; the same-size one
    among them), with the envelope's cost at the schedule's loss, which size it was, and whether
    it was extrapolated. A JSON-able dict (``summary.json``'s ``effective_saving.envelope``)."""
    env = Envelope({n: Frontier.from_points([(b["flops"], b["loss"]) for b in pts])
                    for n, pts in sizes.items() if pts})
    need = env.cost_at(schedule["loss"], extrapolate)
    best = env.best_at_cost(schedule["flops"])
    return {"flops": None if need is None else 1.0 - schedule["flops"] / need.value,
            "flops_frontier": None if need is None else need.value,
            "flops_extrapolated": None if need is None else need.extrapolated,
            "size_at_loss": env.size_at(schedule["loss"], extrapolate),
            "best_size_at_cost": None if best is None else {"size": best[0], "loss": best[1]},
            "sizes": {n: [[b["flops"], b["loss"]] for b in pts] for n, pts in sizes.items()}}


def steady_wall(records: list[dict], schedule: str) -> float | None:
    """Training wall seconds of ``schedule`` in ``metrics.jsonl`` records with load spikes left
    out: per stage, its steps times the median seconds per step between consecutive training
    records, plus what happens between stages as measured (capture, coalescing, de-coalescing,
    moment mapping: the gap from a stage's last training record to the next stage's start).

    On a shared machine a few intervals take many times the others (another job runs); the
    median ignores them, and the baseline and the V-cycle get the same treatment."""
    recs = [r for r in records if r.get("schedule") == schedule]
    stages = [r for r in recs if r["event"] == "stage"]
    if not stages:
        return None
    total, last_wall = 0.0, 0.0
    for st in stages:
        total += st["wall"] - last_wall  # before the stage's first step (capture, transition)
        train = [r for r in recs if r["event"] == "train" and r["stage"] == st["stage"]]
        marks = [st] + train
        rates = [(b["wall"] - a["wall"]) / (b["step"] - a["step"])
                 for a, b in zip(marks, marks[1:]) if b["step"] > a["step"]]
        if not rates:
            return None
        # the steps it trained: fewer than planned when --grow-when slope ended it early
        done = train[-1]["step"] - st["step"] if train else st["steps"]
        total += statistics.median(rates) * done
        last_wall = train[-1]["wall"] if train else st["wall"]
    return total


def steady_seconds_per_step(records: list[dict], schedule: str, level: int = 0) -> float | None:
    """The median seconds per step of ``schedule``'s stages at ``level`` (as ``steady_wall``):
    the rate at which a run trained that level, load spikes left out. Pricing a baseline
    frontier at a V-cycle run's own level-0 rate cancels sustained load between separate runs."""
    recs = [r for r in records if r.get("schedule") == schedule]
    rates = []
    for st in (r for r in recs if r["event"] == "stage" and r["level"] == level):
        marks = [st] + [r for r in recs if r["event"] == "train" and r["stage"] == st["stage"]]
        rates += [(b["wall"] - a["wall"]) / (b["step"] - a["step"])
                  for a, b in zip(marks, marks[1:]) if b["step"] > a["step"]]
    return statistics.median(rates) if rates else None


def describe(value: float | None, extrapolated: bool | None) -> str:
    """A saving as the tables print it: ``23.4%``, ``-5.0% (extrapolated)``, ``n/a``."""
    if value is None:
        return "n/a (outside the frontier)"
    return f"{100 * value:.1f}%" + (" (extrapolated)" if extrapolated else "")
