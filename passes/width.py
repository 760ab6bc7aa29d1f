"""The width pass: coalesce or de-coalesce the units of spaces.

Semantics (DESIGN.md, "Exact semantics"), for a space with groups G_1..G_m:

- coalesce, producer axis:    new[g] = mean(old[i] for i in G_g)
- coalesce, consumer axis:    new[g] = sum(old[i] for i in G_g)
- de-coalesce, producer axis: new[i] = old[g(i)]
- de-coalesce, consumer axis: new[i] = old[g(i)] / |G_g(i)|

The tensors are mapped by passes/units.py (sparse index form, never an n-by-n matrix).

A tied tensor (producer and consumer on one axis, e.g. GPT-2's embedding = LM head) keeps the
producer rule; its consumer input is compensated by the group size, folded into the norm that
produces that input where this is exact (power-of-two factors), otherwise by a scale node.
Weight normalisation's ``||v||`` is compensated the same way (passes/weight_norm.py).

The graph is copied, every literal size of a resized space is rewritten by its op's rule, and
``meta["val"]`` is recomputed with batch and sequence sizes still symbolic.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from vcyclefx.fx.args import Edit, get_arg
from vcyclefx.analysis.analyze import Analysis
from vcyclefx.analysis.dims import Dim, new_size
from vcyclefx.analysis.registry import rule_for
from vcyclefx.errors import PassCheckError, PlanError
from vcyclefx.level import fetch_attr
from vcyclefx.plan.choices import COALESCE, DECOALESCE, DIRECTIONS, one_of
from vcyclefx.plan.mapping import TIED, Compensation, SpaceMap

from passes.common import PassResult, copy_graph, rebuild
from passes.contract import Pass
from passes.meta import ShapeUpdater
from vcyclefx.fx.ops import NORMS, REARRANGING, value_users
from passes.units import Units, has_resized, new_tensors
from passes.weight_norm import (apply_weight_norm_scales, weight_norm_compensations,
                                weight_norm_scale_meta)

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
# tied tensors: compensation
# ---------------------------------------------------------------------------------------------
# a scale factor moves through these exactly (and through a crop of the features)
_TRANSPARENT = REARRANGING | {aten.slice.Tensor}


def _group_factor(analysis: Analysis, name: str, axis: int, resized: dict[int, Units]) -> float:
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


_CASTS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.to.device}


def _through_casts(x):
    """The parameter behind single-use dtype casts (Cohere's norm: ``weight.to(float32) * x``):
    scaling it by a power of two scales its cast exactly."""
    while isinstance(x, Node) and x.op == "call_function" and x.target in _CASTS and \
            len(value_users(x)) == 1 and isinstance(x.args[0], Node):
        x = x.args[0]
    return x


def _fold_target(analysis: Analysis, act: Node) -> tuple[Node, list[str]] | None:
    """The norm producing ``act`` through single-use transparent ops, and its affine tensors."""
    node = act
    while True:
        if len(value_users(node)) != 1:
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
            a, b = (_through_casts(x) for x in node.args[:2])
            params = [x for x in (a, b) if isinstance(x, Node) and x.op == "get_attr"]
            if len(params) == 1:
                return node, [analysis.alias_of.get(params[0].target, params[0].target)]
            return None
        if node.target not in _TRANSPARENT:
            return None
        node = node.args[0]
        if not isinstance(node, Node):
            return None


def _compensations(analysis: Analysis, resized: dict[int, Units]) -> list[Compensation]:
    out: list[Compensation] = []
    done = set()
    for c in analysis.consumers:
        roles = analysis.roles.get((c.tensor, c.axis), set())
        if len(roles) < 2:
            continue
        layout = analysis.table.layout(analysis.tensors[c.tensor].dims[c.axis])
        if not has_resized(layout, resized) or (c.tensor, c.node.name) in done:
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
        if comp.fold or comp.kind != TIED:
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
        resized = {rid: Units(sm) for rid, sm in by_root.items()}
        leaf_sizes = {rid: (sm.small if plan.direction == COALESCE else sm.large)
                      for rid, sm in by_root.items()}
        comps = _compensations(analysis, resized) + weight_norm_compensations(analysis, resized)
        tensors = new_tensors(analysis, resized, plan.direction)
        _apply_folds(tensors, analysis, comps, plan.direction)

        rw = Rewriter(analysis, leaf_sizes)
        graph, _, new_subs = rewrite_graph(gm, rw, ShapeUpdater(gm, rw.new_size, rw.dims))
        _apply_scale_nodes({n.name: n for n in graph.nodes}, comps, plan.direction)
        apply_weight_norm_scales({n.name: n for n in graph.nodes}, comps, plan.direction)

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
        weight_norm_scale_meta(new)
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
