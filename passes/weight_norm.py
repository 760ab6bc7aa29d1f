"""Weight normalisation under width mappings: the compensation of ``||v||``.

``w = g * v / ||v||`` (``aten._weight_norm``; the norm over every axis of ``v`` but ``dim``).
The width pass maps ``v`` and ``g`` like ``w`` (DESIGN.md's copy/split/mean/sum per role); on
the ``dim`` axis that is exact as it is (``g`` copied or split with its rows). An axis *inside*
the norm changes it: with equal groups of size k, copying a producer axis multiplies
``||v||^2`` by k, splitting a consumer axis (each part ``v/k``) divides it by k. Because the
direction ``v/||v||`` is what ``w`` is made of, the mapped ``v`` gives ``w`` mapped exactly up to
one constant: the smaller level must multiply ``w`` by ``s = ||v_small|| / ||v_large|| =
prod(k ** (+1/2 per consumer axis, -1/2 per producer axis))`` (a weight-normed conv whose input
channels are widened x2 gets ``s = sqrt(2)``; wav2vec2's ``dim=2`` positional conv, whose output
and input channels are one space, gets ``s = 1``).

``g`` itself is never rescaled by an irrational factor: ``g * (1/sqrt 2) * sqrt 2`` is not ``g``
in floating point, and the round trip ``coalesce(decoalesce(theta)) == theta`` is bit-exact.
Where ``s`` is a power of two it is folded into ``g`` (exact both ways); otherwise a constant
scale node multiplies the op's output, and its exponent is kept in whole half-powers of each
group size in ``meta[WN_SCALE_META]``, so that coalescing cancels it exactly and removes the
node (level 0 never carries one after a V-cycle; ``decoalesce`` straight from level 0 gives a
larger level that does).

Groups of unequal sizes change ``||v||`` by a factor that depends on the values: refused.
"""

from __future__ import annotations

import math

import torch
from torch.fx import Node

from vcyclefx.fx.args import get_arg
from passes.units import Units, has_resized
from vcyclefx.analysis.analyze import PRODUCER, Analysis
from vcyclefx.analysis.dims import PROD, Dim
from vcyclefx.errors import PlanError
from vcyclefx.plan.choices import COALESCE
from vcyclefx.plan.mapping import WEIGHT_NORM, Compensation

aten = torch.ops.aten
WN_SCALE_META = "vcyclefx_weight_norm_scale"


def _halves(layout, resized: dict[int, Units], sign: int, node: Node) -> dict[int, int]:
    """Exponent (in halves) per group size of the factor ``s`` that resizing ``layout`` needs;
    ``sign`` +1 for a consumer axis (split), -1 for a producer axis (copied)."""
    if isinstance(layout, Dim):
        u = resized.get(layout.id)
        if u is None:
            return {}
        sizes = set(u.counts.tolist())
        if len(sizes) != 1:
            raise PlanError(
                f"{node.format_node()}: weight norm over space {u.sm.key}, which needs equal group "
                "sizes (unequal groups change ||v|| by a factor that depends on the weights); "
                f"choose a width factor that divides its {u.sm.large} units evenly")
        k = sizes.pop()
        return {k: sign} if k != 1 else {}
    kind, kids = layout
    parts = [_halves(k, resized, sign, node) for k in kids]
    if kind == PROD:
        out: dict[int, int] = {}
        for p in parts:
            for k, e in p.items():
                out[k] = out.get(k, 0) + e
        return {k: e for k, e in out.items() if e}
    if any(p != parts[0] for p in parts):  # CAT: ||v||^2 is a sum over the segments
        raise PlanError(f"{node.format_node()}: weight norm over an axis concatenated from "
                        "segments resized differently; ||v|| would change by a factor that "
                        "depends on the weights")
    return parts[0]


def value_of(halves: dict) -> float:
    out = 1.0
    for k, e in halves.items():
        out *= float(k) ** (e / 2)
    return out


def _name_of(analysis: Analysis, node, what: str, wn: Node) -> str:
    if not (isinstance(node, Node) and node.op == "get_attr"):
        raise PlanError(f"{wn.format_node()}: weight norm whose {what} is computed (not a "
                        "parameter) lies in a resized space; vcyclefx compensates weight norm "
                        "on parameters only")
    return analysis.alias_of.get(node.target, node.target)


def weight_norm_compensations(analysis: Analysis, resized: dict[int, Units]) -> list[Compensation]:
    """One compensation per weight-norm node whose norm axes are resized."""
    out = []
    for node, rec in analysis.records.items():
        axes = rec.get("weight_norm")
        if axes is None:
            continue
        v = get_arg(node, "v")
        vd = analysis.node_dims[v]
        layouts = {ax: analysis.table.layout(vd[ax]) for ax in axes}
        layouts = {ax: lay for ax, lay in layouts.items() if has_resized(lay, resized)}
        if not layouts:
            continue
        vname = _name_of(analysis, v, "v", node)
        halves: dict[int, int] = {}
        for ax, lay in layouts.items():
            roles = analysis.roles.get((vname, ax), set())
            sign = -1 if (PRODUCER in roles or not roles) else 1
            for k, e in _halves(lay, resized, sign, node).items():
                halves[k] = halves.get(k, 0) + e
        halves = {k: e for k, e in halves.items() if e}
        if not halves:
            continue
        factor = value_of(halves)
        gname = _name_of(analysis, get_arg(node, "g"), "g", node)
        spaces = sorted({resized[leaf.id].sm.key for ax in layouts
                         for leaf in analysis.table.leaves(vd[ax]) if leaf.id in resized})
        out.append(Compensation(
            tensor=vname, space=",".join(spaces), factor=factor, node=node.name,
            fold=[gname] if math.log2(factor).is_integer() else [], kind=WEIGHT_NORM,
            halves={str(k): e for k, e in halves.items()},
        ))
    return out


def _scaled_output(node: Node) -> Node | None:
    """The value to scale: the op's output (``w`` of ``_weight_norm_interface``'s pair)."""
    if node.target is aten._weight_norm_interface.default:
        return next((u for u in node.users if u.args[1] == 0), None)
    return node


def apply_weight_norm_scales(graph_nodes: dict[str, Node], comps: list[Compensation],
                             direction: str) -> None:
    """Insert, update or remove the scale node after each weight-norm node of ``comps`` that
    is not folded."""
    for comp in comps:
        if comp.kind != WEIGHT_NORM or comp.fold:
            continue
        out = _scaled_output(graph_nodes[comp.node])
        if out is None:
            continue
        step = {int(k): (e if direction == COALESCE else -e) for k, e in comp.halves.items()}
        users = list(out.users)
        if len(users) == 1 and WN_SCALE_META in users[0].meta:
            scale = users[0]
            halves = dict(scale.meta[WN_SCALE_META])
            for k, e in step.items():
                halves[k] = halves.get(k, 0) + e
            halves = {k: e for k, e in halves.items() if e}
            if not halves:
                scale.replace_all_uses_with(out)
                scale.graph.erase_node(scale)
            else:
                scale.args = (out, value_of(halves))
                scale.meta[WN_SCALE_META] = halves
            continue
        with out.graph.inserting_after(out):
            scale = out.graph.call_function(aten.mul.Tensor, (out, value_of(step)))
        out.replace_all_uses_with(scale, delete_user_cb=lambda u: u is not scale)
        scale.meta = {k: v for k, v in out.meta.items() if k != WN_SCALE_META}
        scale.meta[WN_SCALE_META] = step


def weight_norm_scale_meta(gm) -> None:
    """A scale node has the shape of its input."""
    for n in gm.graph.nodes:
        if WN_SCALE_META in n.meta and isinstance(n.args[0], Node):
            n.meta["val"] = n.args[0].meta.get("val")
