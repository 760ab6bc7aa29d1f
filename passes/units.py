"""Width mapping of tensors: the units of a space grouped, as index maps or reshapes.

For a space with groups G_1..G_m (DESIGN.md, "Exact semantics"): coalescing a producer axis
takes each group's mean, a consumer axis its sum; de-coalescing copies a producer unit to its
group and splits a consumer unit over it. Each tensor axis is rewritten through its layout
(products and concatenations of leaf dims found by the analysis): the axis is viewed as its
leaves, the index ops act on the leaves of resized spaces, and the axis is flattened back.
Mappings stay in sparse index form (``index_add`` / ``index_select``); nothing builds an
n-by-n matrix.
"""

from __future__ import annotations

import torch

from vcyclefx.analysis.analyze import PRODUCER, Analysis
from vcyclefx.analysis.dims import PROD, Dim, layout_size
from vcyclefx.errors import PlanError
from vcyclefx.level import fetch_attr
from vcyclefx.plan.choices import COALESCE
from vcyclefx.plan.mapping import SpaceMap


class Units:
    """Index tensors of one space map. Equal strided groups (unit i with i + m, ...) and equal
    adjacent groups (k consecutive units) are applied as a reshape and a sum/repeat, which is
    exactly the index form's result and several times faster; other groupings use
    ``index_add`` / ``index_select``."""

    def __init__(self, sm: SpaceMap):
        self.sm = sm
        self.index = torch.tensor(sm.index, dtype=torch.long)
        self.counts = torch.bincount(self.index, minlength=sm.small)
        n, m = sm.large, sm.small
        self.k = n // m if n % m == 0 else 0
        self.pattern = None
        if self.k:
            if sm.index == [i % m for i in range(n)]:
                self.pattern = "strided"  # axis viewed as (k, m): group = a column
            elif sm.index == [i // self.k for i in range(n)]:
                self.pattern = "adjacent"  # axis viewed as (m, k): group = a row

    def _slices(self, t: torch.Tensor, axis: int) -> list[torch.Tensor]:
        """The k members of every group, as k views of shape (..., m, ...)."""
        k, m = self.k, self.sm.small
        if self.pattern == "strided":  # group g = units g, g + m, g + 2m, ...
            return [t.narrow(axis, j * m, m) for j in range(k)]
        x = t.reshape(*t.shape[:axis], m, k, *t.shape[axis + 1 :])  # group g = units gk .. gk+k-1
        return [x.select(axis + 1, j) for j in range(k)]

    def coalesce(self, t: torch.Tensor, axis: int, producer: bool) -> torch.Tensor:
        if self.pattern is not None:
            parts = self._slices(t, axis)
            if producer and len(parts) == 2:
                return torch.lerp(parts[0], parts[1], 0.5)  # the pair's mean in one pass
            out = torch.add(parts[0], parts[1]) if len(parts) > 1 else parts[0].clone()
            for p in parts[2:]:
                out.add_(p)
            if producer and self.k > 1:
                out = out.mul_(1.0 / self.k) if self.k & (self.k - 1) == 0 else out.div_(self.k)
            return out
        shape = list(t.shape)
        shape[axis] = self.sm.small
        out = torch.zeros(shape, dtype=t.dtype, device=t.device)
        out.index_add_(axis, self.index.to(t.device), t)
        if producer:
            out = out / _along(self.counts.to(t.device, t.dtype), axis, out.dim())
        return out

    def decoalesce(self, t: torch.Tensor, axis: int, producer: bool) -> torch.Tensor:
        if self.pattern is not None:
            k = self.k
            if self.pattern == "strided":
                out = torch.cat([t] * k, dim=axis)
            else:
                shape = list(t.shape)
                out = t.unsqueeze(axis + 1).expand(*shape[: axis + 1], k, *shape[axis + 1 :])
                out = out.reshape(*shape[:axis], shape[axis] * k, *shape[axis + 1 :])
            if producer or k == 1:
                return out
            return out.mul_(1.0 / k) if k & (k - 1) == 0 else out.div_(k)
        idx = self.index.to(t.device)
        out = t.index_select(axis, idx)
        if not producer:
            out = out / _along(self.counts.to(t.device, t.dtype)[idx], axis, out.dim())
        return out


def _along(v: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def has_resized(layout, resized: dict[int, Units]) -> bool:
    if isinstance(layout, Dim):
        return layout.id in resized
    return any(has_resized(k, resized) for k in layout[1])


def _apply_axis(t, axis, layout, resized, direction, producer):
    if not has_resized(layout, resized):
        return t
    if isinstance(layout, Dim):
        u = resized[layout.id]
        return u.coalesce(t, axis, producer) if direction == COALESCE else u.decoalesce(t, axis, producer)
    kind, kids = layout
    sizes = [layout_size(k) for k in kids]
    if kind == PROD:
        x = t.reshape(*t.shape[:axis], *sizes, *t.shape[axis + 1 :])
        for i, kid in enumerate(kids):
            x = _apply_axis(x, axis + i, kid, resized, direction, producer)
        return x.reshape(*t.shape[:axis], -1, *t.shape[axis + 1 :])
    pieces = torch.split(t, sizes, dim=axis)
    return torch.cat(
        [_apply_axis(p, axis, k, resized, direction, producer) for p, k in zip(pieces, kids)],
        dim=axis,
    )


def new_tensors(analysis: Analysis, resized: dict[int, Units], direction: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    table = analysis.table
    for name, st in analysis.tensors.items():
        layouts = [table.layout(d) for d in st.dims]
        axes = [i for i, lay in enumerate(layouts) if has_resized(lay, resized)]
        if not axes:
            continue
        if not st.dtype.is_floating_point:
            raise PlanError(f"tensor {name} ({st.dtype}) lies in a resized space; vcyclefx maps "
                            "float tensors only")
        t = fetch_attr(analysis.gm, name).detach()
        for ax in axes:
            roles = analysis.roles.get((name, ax), set())
            producer = PRODUCER in roles or not roles
            t = _apply_axis(t, ax, layouts[ax], resized, direction, producer)
        out[name] = t
    return out
