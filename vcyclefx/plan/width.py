"""Planning: which units group together, from a factor and a pairing.

``width`` is a factor on unit counts (0.5 halves every resizable space, 2.0 doubles it). The
pairings follow the paper: ``strided`` pairs unit i with i + n/2 (the paper's width default),
``adjacent`` pairs 2i with 2i+1 (its depth default), ``similarity`` groups the units whose
producer weights have the highest cosine similarity.

Where a factor does not divide a space, groups may be uneven when that stays exact (no norm
runs over the space); otherwise the space is kept as it is and the plan says so. A space is
never coalesced below two units (its structure could not be recovered from one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vcyclefx.analysis.analyze import PRODUCER, Analysis, Space
from vcyclefx.analysis.dims import CAT, Dim, layout_size, new_size
from vcyclefx.errors import PlanError
from vcyclefx.plan.choices import WIDTH_PAIRINGS
from vcyclefx.plan.mapping import SpaceMap



@dataclass
class WidthDecision:
    spaces: list[SpaceMap]
    kept: list[dict]


def check_factor(name: str, factor: float, coalesce: bool) -> None:
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not math.isfinite(factor):
        raise PlanError(f"{name}={factor!r} must be a number")
    if coalesce and not (0 < factor <= 1):
        raise PlanError(f"{name}={factor} must be in (0, 1] to coalesce (e.g. {name}=0.5)")
    if not coalesce and factor < 1:
        raise PlanError(f"{name}={factor} must be >= 1 to de-coalesce (e.g. {name}=2.0)")


def _index(n_large: int, n_small: int, pairing: str) -> list[int]:
    if pairing == "adjacent":
        return [i * n_small // n_large for i in range(n_large)]
    return [i % n_small for i in range(n_large)]  # strided: i, i + m, i + 2m, ...


def _unit_vectors(analysis: Analysis, space: Space) -> torch.Tensor:
    """One row per unit: the unit's slices of every producer tensor, flattened."""
    rows: list[torch.Tensor] = []
    params = dict(analysis.gm.named_parameters(remove_duplicate=False))
    for m in space.members:
        if PRODUCER not in analysis.roles.get((m.tensor, m.axis), set()) or m.tensor not in params:
            continue
        t = params[m.tensor]
        if t.is_meta:
            continue
        layout = analysis.table.layout(analysis.tensors[m.tensor].dims[m.axis])
        r = _unit_rows(t.detach().float(), m.axis, layout, space.root.id)
        if r is not None:
            rows.append(r)
    if not rows:
        raise PlanError(f"space {space.key} has no producer weights to compare for pairing='similarity'")
    return torch.cat(rows, dim=1)


def _unit_rows(t: torch.Tensor, axis: int, layout, leaf_id: int) -> torch.Tensor | None:
    """(units, -1): ``t``'s entries grouped by the unit of leaf ``leaf_id`` along ``axis``."""
    if isinstance(layout, Dim):
        if layout.id != leaf_id:
            return None
        return t.movedim(axis, 0).reshape(t.shape[axis], -1)
    kind, kids = layout
    sizes = [layout_size(k) for k in kids]
    if kind == CAT:
        rows = [r for p, k in zip(torch.split(t, sizes, dim=axis), kids)
                if (r := _unit_rows(p, axis, k, leaf_id)) is not None]
        return torch.cat(rows, dim=1) if rows else None
    x = t.reshape(*t.shape[:axis], *sizes, *t.shape[axis + 1 :])
    for i, k in enumerate(kids):
        r = _unit_rows(x, axis + i, k, leaf_id)
        if r is not None:
            return r
    return None


def _similarity_index(analysis: Analysis, space: Space, m: int) -> list[int]:
    n = space.size
    v = _unit_vectors(analysis, space)
    v = torch.nn.functional.normalize(v, dim=1)
    sim = v @ v.T
    sim.fill_diagonal_(-float("inf"))
    k = n // m
    free = set(range(n))
    groups: list[list[int]] = []
    while free:
        idx = sorted(free)
        sub = sim[idx][:, idx]
        if len(idx) == 1 or k == 1:
            groups.append([idx[0]])
            free.discard(idx[0])
            continue
        flat = int(torch.argmax(sub))
        a, b = idx[flat // len(idx)], idx[flat % len(idx)]
        group = [a, b]
        while len(group) < k:
            rest = sorted(free - set(group))
            score = sim[rest][:, group].mean(dim=1)
            group.append(rest[int(torch.argmax(score))])
        groups.append(sorted(group))
        free -= set(group)
    groups.sort()
    index = [0] * n
    for g, members in enumerate(groups):
        for i in members:
            index[i] = g
    return index


def plan_width(analysis: Analysis, factor: float, pairing: str = WIDTH_PAIRINGS[0], *,
               coalesce: bool) -> WidthDecision:
    """Groups for every resizable space; raises PlanError when nothing can be resized."""
    check_factor("width", factor, coalesce)
    if pairing not in WIDTH_PAIRINGS:
        raise PlanError(f"pairing={pairing!r} is not one of {WIDTH_PAIRINGS}")
    maps: list[SpaceMap] = []
    kept: list[dict] = []
    if factor == 1:
        return WidthDecision([], [])
    for s in analysis.spaces:
        if not s.resizable:
            continue
        n = s.size
        target = n * factor
        new = round(target)
        exact = abs(target - new) < 1e-9
        if coalesce:
            if new < 2:
                kept.append({"key": s.key, "reason": f"{n} units x {factor} would leave fewer than 2"})
                continue
            even = exact and n % new == 0
        else:
            even = exact and new % n == 0
        if not even and s.normalized:
            kept.append({"key": s.key, "reason": f"{n} units x {factor} needs uneven groups, "
                                                 f"which are not exact under the norm at {s.normalized}"})
            continue
        if new == n:
            continue
        if coalesce:
            index = (_similarity_index(analysis, s, new) if pairing == "similarity" and even
                     else _index(n, new, "strided" if pairing == "similarity" else pairing))
            maps.append(SpaceMap(key=s.key, large=n, small=new, index=index, unit=s.unit,
                                 normalized=bool(s.normalized)))
        else:
            index = _index(new, n, "strided" if pairing == "similarity" else pairing)
            maps.append(SpaceMap(key=s.key, large=new, small=n, index=index, unit=s.unit,
                                 normalized=bool(s.normalized)))
    if not maps:
        sizes = sorted({s.size for s in analysis.spaces if s.resizable})
        why = "; ".join(f"{k['key']}: {k['reason']}" for k in kept[:3])
        raise PlanError(
            f"width={factor} resizes no space of this model (resizable space sizes: {sizes}"
            f"{'; ' + why if why else ''}); choose a factor that divides them"
        )
    return WidthDecision(maps, kept)


def predict_parameters(analysis: Analysis, leaf_sizes: dict[int, int]) -> int:
    """Parameter count after resizing leaves (root id -> new size), from the analysis alone."""
    params = dict(analysis.gm.named_parameters(remove_duplicate=False))
    total = 0
    for name, st in analysis.tensors.items():
        if name not in params:
            continue
        total += math.prod(int(new_size(analysis.table, d, leaf_sizes)) for d in st.dims)
    return total
