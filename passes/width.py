"""The width pass: coalesce or de-coalesce the units of spaces.

Semantics (DESIGN.md, "Exact semantics"), for a space with groups G_1..G_m:

- coalesce, producer axis:    new[g] = mean(old[i] for i in G_g)
- coalesce, consumer axis:    new[g] = sum(old[i] for i in G_g)
- de-coalesce, producer axis: new[i] = old[g(i)]
- de-coalesce, consumer axis: new[i] = old[g(i)] / |G_g(i)|

Each tensor axis is rewritten through its layout (products and concatenations of leaf dims
found by the analysis): the axis is viewed as its leaves, the index ops act on the leaves of
resized spaces, and the axis is flattened back. Mappings stay in sparse index form
(``index_add`` / ``index_select``); nothing builds an n-by-n matrix.

A tied tensor (producer and consumer on one axis, e.g. GPT-2's embedding = LM head) keeps the
producer rule; its consumer input is compensated by the group size, folded into the norm that
produces that input where this is exact (power-of-two factors), otherwise by a scale node.

The graph is copied, every literal size of a resized space is rewritten by its op's rule, and
``meta["val"]`` is recomputed with batch and sequence sizes still symbolic.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from vcyclefx.analysis.analyze import PRODUCER, Analysis
from vcyclefx.analysis.dims import PROD, Dim, layout_size, new_size
from passes.args import Edit, get_arg
from vcyclefx.analysis.registry import rule_for
from vcyclefx.errors import PassCheckError, PlanError
from vcyclefx.level import fetch_attr
from vcyclefx.plan.choices import COALESCE, DECOALESCE, DIRECTIONS, one_of
from vcyclefx.plan.mapping import Compensation, SpaceMap

from passes.common import PassResult, copy_graph, rebuild
from passes.contract import Pass
from passes.meta import ShapeUpdater
from passes.ops import NORMS, REARRANGING

log = logging.getLogger("vcyclefx.passes.width")
aten = torch.ops.aten

__all__ = ["COALESCE", "DECOALESCE", "WidthPass", "WidthPlan", "width_pass"]
SCALE_META = "vcyclefx_scale"


@dataclass(frozen=True)
class WidthPlan:
    direction: str  # COALESCE (input is the larger level) or DECOALESCE (input is the smaller)
    spaces: tuple[SpaceMap, ...]


# ---------------------------------------------------------------------------------------------
# preconditions
# ---------------------------------------------------------------------------------------------
def _space_maps(analysis: Analysis, plan: WidthPlan) -> dict[int, SpaceMap]:
    """Map each planned space to its leaf dim; check sizes and resizability."""
    if plan.direction not in DIRECTIONS:
        raise PlanError(f"width direction must be {one_of(DIRECTIONS)}")
    by_root: dict[int, SpaceMap] = {}
    keys = {s.key: s for s in analysis.spaces}
    for sm in plan.spaces:
        space = keys.get(sm.key)
        if space is None:
            raise PlanError(
                f"space {sm.key} is not in this model; the mapping was made for another model "
                "(or another level of it)"
            )
        expected = sm.large if plan.direction == COALESCE else sm.small
        if space.size != expected:
            raise PlanError(
                f"space {sm.key} has {space.size} units here but the mapping expects {expected} "
                f"to {plan.direction}; the mapping was made for another level"
            )
        if not space.resizable:
            raise PlanError(f"space {sm.key} is pinned: {space.reason}")
        by_root[space.root.id] = sm
    return by_root


# ---------------------------------------------------------------------------------------------
# tensors
# ---------------------------------------------------------------------------------------------
class _Units:
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


def _has_resized(layout, resized: dict[int, _Units]) -> bool:
    if isinstance(layout, Dim):
        return layout.id in resized
    return any(_has_resized(k, resized) for k in layout[1])


def _apply_axis(t, axis, layout, resized, direction, producer):
    if not _has_resized(layout, resized):
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


def _new_tensors(analysis: Analysis, resized: dict[int, _Units], direction: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    table = analysis.table
    for name, st in analysis.tensors.items():
        layouts = [table.layout(d) for d in st.dims]
        axes = [i for i, lay in enumerate(layouts) if _has_resized(lay, resized)]
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


# ---------------------------------------------------------------------------------------------
# tied tensors: compensation
# ---------------------------------------------------------------------------------------------
# a scale factor moves through these exactly (and through a crop of the features)
_TRANSPARENT = REARRANGING | {aten.slice.Tensor}


def _group_factor(analysis: Analysis, name: str, axis: int, resized: dict[int, _Units]) -> float:
    factor = 1.0
    for leaf in analysis.table.leaves(analysis.tensors[name].dims[axis]):
        u = resized.get(leaf.id)
        if u is None:
            continue
        sizes = set(u.counts.tolist())
        if len(sizes) != 1:
            raise PlanError(
                f"tensor {name} is tied (producer and consumer) in space {u.sm.key}, which needs "
                "equal group sizes; choose a width factor that divides its "
                f"{u.sm.large} units evenly"
            )
        factor *= sizes.pop()
    return factor


def _fold_target(analysis: Analysis, act: Node) -> tuple[Node, list[str]] | None:
    """The norm producing ``act`` through single-use transparent ops, and its affine tensors."""
    node = act
    while True:
        if len(node.users) != 1:
            return None
        if node.op != "call_function":
            return None
        if node.target in NORMS:
            w = get_arg(node, "weight")
            b = get_arg(node, "bias", None) if node.target is aten.layer_norm.default else None
            params = [p for p in (w, b) if isinstance(p, Node) and p.op == "get_attr"]
            if not isinstance(w, Node) or len(params) != (2 if isinstance(b, Node) else 1):
                return None
            return node, [analysis.alias_of.get(p.target, p.target) for p in params]
        if node.target is aten.mul.Tensor:
            a, b = node.args[0], node.args[1]
            params = [x for x in (a, b) if isinstance(x, Node) and x.op == "get_attr"]
            if len(params) == 1:
                return node, [analysis.alias_of.get(params[0].target, params[0].target)]
            return None
        if node.target not in _TRANSPARENT:
            return None
        node = node.args[0]
        if not isinstance(node, Node):
            return None


def _compensations(analysis: Analysis, resized: dict[int, _Units]) -> list[Compensation]:
    out: list[Compensation] = []
    done = set()
    for c in analysis.consumers:
        roles = analysis.roles.get((c.tensor, c.axis), set())
        if len(roles) < 2:
            continue
        layout = analysis.table.layout(analysis.tensors[c.tensor].dims[c.axis])
        if not _has_resized(layout, resized) or (c.tensor, c.node.name) in done:
            continue
        done.add((c.tensor, c.node.name))
        k = _group_factor(analysis, c.tensor, c.axis, resized)
        spaces = [resized[leaf.id].sm.key for leaf in analysis.table.leaves(
            analysis.tensors[c.tensor].dims[c.axis]) if leaf.id in resized]
        fold = _fold_target(analysis, c.activation)
        exact = math.log2(k).is_integer()
        out.append(Compensation(
            tensor=c.tensor, space=",".join(spaces), factor=k, node=c.node.name,
            fold=fold[1] if (fold and exact) else [],
        ))
    return out


def _apply_folds(tensors: dict[str, torch.Tensor], analysis: Analysis,
                 comps: list[Compensation], direction: str) -> None:
    for comp in comps:
        scale = comp.factor if direction == COALESCE else 1.0 / comp.factor
        for name in comp.fold:
            base = tensors.get(name)
            if base is None:
                base = fetch_attr(analysis.gm, name).detach()
            tensors[name] = base * scale


def _apply_scale_nodes(graph_nodes: dict[str, Node], comps: list[Compensation], direction: str) -> None:
    for comp in comps:
        if comp.fold:
            continue
        node = graph_nodes[comp.node]
        scale = comp.factor if direction == COALESCE else 1.0 / comp.factor
        # the consumer's activation operand is the first argument of the contraction
        act = next(a for a in node.all_input_nodes if a.op != "get_attr")
        if SCALE_META in act.meta:
            value = act.meta[SCALE_META]["value"] * scale
            if value == 1.0:
                act.replace_all_uses_with(act.args[0])
                act.graph.erase_node(act)
            else:
                act.args = (act.args[0], value)
                act.meta[SCALE_META] = {"tensor": comp.tensor, "value": value}
            continue
        with node.graph.inserting_before(node):
            new = node.graph.call_function(aten.mul.Tensor, (act, scale))
        new.meta = {k: v for k, v in act.meta.items() if k != SCALE_META}
        new.meta[SCALE_META] = {"tensor": comp.tensor, "value": scale}
        node.replace_input_with(act, new)


def _scale_node_meta(gm: GraphModule) -> None:
    """A scale node has the shape of its input."""
    for n in gm.graph.nodes:
        if SCALE_META in n.meta and isinstance(n.args[0], Node):
            n.meta["val"] = n.args[0].meta.get("val")


# ---------------------------------------------------------------------------------------------
# graph literals
# ---------------------------------------------------------------------------------------------
class Rewriter:
    """What rule rewrite functions see: the old node's dims and the new sizes."""

    def __init__(self, analysis: Analysis, leaf_sizes: dict[int, int]):
        self.analysis = analysis
        self.leaf_sizes = leaf_sizes

    def new_size(self, d: Dim):
        return new_size(self.analysis.table, d, self.leaf_sizes)

    def dims(self, node: Node):
        return self.analysis.node_dims.get(node)

    def arg(self, node: Node, name: str, default=None):
        return get_arg(node, name, default)

    def record(self, node: Node, key: str):
        return self.analysis.records.get(node, {}).get(key)


def rewrite_graph(gm: GraphModule, rw: Rewriter, shapes: ShapeUpdater):
    """Copy ``gm``'s graph with every literal size rewritten and every value's shape updated;
    also returns rewritten higher-order-op bodies as new submodules."""
    graph, node_map = copy_graph(gm.graph)
    shapes.update(node_map)
    new_subs: dict[str, GraphModule] = {}
    for old in gm.graph.nodes:
        if old.op != "call_function":
            continue
        if isinstance(old.target, torch._ops.HigherOrderOperator):
            for a in old.args:
                if isinstance(a, Node) and a.op == "get_attr" and a.target not in new_subs:
                    sub = fetch_attr(gm, a.target)
                    if isinstance(sub, GraphModule):
                        sub_graph, _, _ = rewrite_graph(sub, rw, shapes)
                        new_subs[a.target] = GraphModule(sub, sub_graph)
            continue
        rule = rule_for(old)
        if rule.rewrite is None:
            continue
        edit = rule.rewrite(rw, old)
        if edit is None:
            continue
        if not isinstance(edit, Edit):
            raise PassCheckError(f"{old.format_node()}: the rewrite of {old.target} returned a "
                                 f"{type(edit).__name__}; a rewrite returns an Edit "
                                 "(registry.replace_args, replace_arg_at, retarget) or None")
        log.debug("%s: %s", old.name, edit)
        edit.map_nodes(lambda n: node_map[n]).apply(node_map[old])
    return graph, node_map, new_subs


# ---------------------------------------------------------------------------------------------
# the pass
# ---------------------------------------------------------------------------------------------
class WidthPass(Pass):
    """Resize the spaces of a WidthPlan, found by ``analysis`` (of the pass's input); the
    result's mapping is the list of compensations applied."""

    name = "width pass"

    def __init__(self, analysis: Analysis):
        self.analysis = analysis

    def requires(self, gm: GraphModule, plan: WidthPlan) -> None:
        if self.analysis.gm is not gm:
            raise PlanError("width pass: the analysis was made of another module than the one "
                            "given; analyze the module the pass rewrites")
        _space_maps(self.analysis, plan)

    def call(self, gm: GraphModule, plan: WidthPlan) -> PassResult:
        analysis = self.analysis
        by_root = _space_maps(analysis, plan)
        resized = {rid: _Units(sm) for rid, sm in by_root.items()}
        leaf_sizes = {rid: (sm.small if plan.direction == COALESCE else sm.large)
                      for rid, sm in by_root.items()}
        comps = _compensations(analysis, resized)
        tensors = _new_tensors(analysis, resized, plan.direction)
        _apply_folds(tensors, analysis, comps, plan.direction)

        rw = Rewriter(analysis, leaf_sizes)
        graph, _, new_subs = rewrite_graph(gm, rw, ShapeUpdater(gm, rw.new_size, rw.dims))
        _apply_scale_nodes({n.name: n for n in graph.nodes}, comps, plan.direction)

        new_attrs: dict = dict(new_subs)
        params = dict(gm.named_parameters(remove_duplicate=False))
        for name, t in tensors.items():
            old = fetch_attr(gm, name)
            obj = torch.nn.Parameter(t, requires_grad=old.requires_grad) if name in params else t
            for alias in analysis.tensors[name].aliases:
                new_attrs[alias] = obj
            new_attrs[name] = obj
        new = rebuild(gm, graph, new_attrs)
        _scale_node_meta(new)
        return PassResult(new, comps, shapes=_planned_shapes(analysis, rw))


def _planned_shapes(analysis: Analysis, rw: Rewriter) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape at the new sizes, from the analysis' dims alone."""
    out = {}
    for name, st in analysis.tensors.items():
        shape = tuple(rw.new_size(d) for d in st.dims)
        shape = tuple(int(s) if getattr(s, "is_Integer", False) else s for s in shape)
        if all(isinstance(s, int) for s in shape):
            out[name] = shape
            out.update({alias: shape for alias in st.aliases})
    return out


def width_pass(gm: GraphModule, analysis: Analysis, plan: WidthPlan) -> PassResult:
    """Resize the spaces in ``plan``; returns the new level and the compensations applied."""
    return WidthPass(analysis)(gm, plan)
