"""Transforms that check themselves (DESIGN.md: "Transforms that keep the function ... check it on
the example inputs by default").

A transform stage that must keep the function (width de-coalescing with equal group sizes,
identity depth growth) runs its input and its output on the level's example inputs once (eval
mode, no grad) and compares the outputs. Only when they differ does it look for the cause: it
runs both graphs node by node (``torch.fx.Interpreter``) and names the first node, in the new
graph's order, whose value is not the old one's, seen through the mapping:

- width: a node keeps its name across the width pass (``copy_graph``); an activation axis in a
  resized space holds copies of the old units (de-coalescing copies producers and splits
  consumers, so every activation is the old one gathered by the group index), so the new value
  is compared with the old one de-coalesced as a producer (``passes.units``). Activations
  between a norm that carries a tied tensor's folded compensation and the contraction it feeds
  are expected scaled by that factor; a scale node the pass inserted has no old counterpart.
- depth: the new graph is rebuilt from a template block, so names do not carry over; a node is
  matched by (module path, op, occurrence) with the first block of each group standing for the
  old block (the others are identities and have no counterpart).

Only values that depend on the model's inputs are compared: a value computed from parameters
alone (``w.t()``, weight norm's ``w``) is split on consumer axes, not copied, and is checked
through the activations it produces.

Coalescing cannot keep the function; its result is checked to give finite outputs where the
input does (the first node to go non-finite is named), and to come back through its own mapping:
de-coalescing it with identity growth must pass the checks above (``vcyclefx.api`` runs that
round trip; the graphs' outputs are computed once each inside :func:`reusing_runs`).

Tolerance: the relative error ``max|new - old| / max|old|`` of each output must be at most
:data:`TOLERANCE` = 1e-5. De-coalescing reorders float32 sums (a split consumer adds k*n terms
of 1/k size instead of n): the rounding of each is about ``sqrt(n) * 2**-24`` (6e-8 per step)
and it compounds over the layers; 1e-5 (~170 ulps relative to the largest output) is what the
test suite asserts for every supported model (DESIGN.md, "Exact semantics") and is far below
what a wrong rule gives (1e-2 and more). Levels whose floating tensors are not float32 are not
checked (their own rounding would be compared, not the mapping).
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from typing import Any, Callable

import torch
from torch.fx import GraphModule, Interpreter, Node
from torch.utils import _pytree as pytree

from vcyclefx.fx.device import module_device
from vcyclefx.fx.mode import switch_mode_
from vcyclefx.fx.ops import NORMS, REARRANGING
from passes.units import Units, _apply_axis, has_resized
from vcyclefx.errors import SelfCheckError
from vcyclefx.level import level_info
from vcyclefx.plan.choices import DECOALESCE
from vcyclefx.plan.mapping import TIED, ChainMap, Compensation, SpaceMap

log = logging.getLogger("vcyclefx.selfcheck")
aten = torch.ops.aten

__all__ = ["TOLERANCE", "check_width", "check_depth", "check_finite", "keeps_width",
           "keeps_depth", "checkable"]

TOLERANCE = 1e-5
# tests set this: compare node by node even when the outputs agree, so that a false positive of
# the node comparison (a value expected copied that is not) shows up on correct transforms too
EVERY_NODE = False
SCALE_META = "vcyclefx_scale"  # passes.width marks its scale nodes with this key
_TRANSPARENT = REARRANGING | {aten.slice.Tensor}  # as in passes.width: a scale passes through


# ---------------------------------------------------------------------------------------------
# which stages keep the function
# ---------------------------------------------------------------------------------------------
def keeps_width(spaces: list[SpaceMap]) -> bool:
    """De-coalescing these spaces keeps the function: every group has the same size."""
    return all(len(set(Units(sm).counts.tolist())) == 1 for sm in spaces)


def keeps_depth(chains: list[ChainMap], depth_init: str | None = None) -> bool:
    """De-coalescing these chains keeps the function: every new block starts as an identity."""
    return all((depth_init or c.depth_init) == "identity" for c in chains)


def checkable(*levels) -> bool:
    """The levels have example inputs and float32 tensors that hold values (not meta)."""
    for gm in levels:
        if level_info(gm) is None:
            return False
        for t in list(gm.parameters()) + list(gm.buffers()):
            if t.device.type == "meta" or (t.is_floating_point() and t.dtype != torch.float32):
                return False
    return True


# ---------------------------------------------------------------------------------------------
# running a level
# ---------------------------------------------------------------------------------------------
class _Run(Interpreter):
    """Runs a graph; ``visit(node, value)`` sees every value (it may raise to stop)."""

    def __init__(self, gm: GraphModule, visit: Callable[[Node, Any], None] | None = None):
        super().__init__(gm, garbage_collect_values=visit is None)
        self.visit = visit

    def run_node(self, n: Node):
        out = super().run_node(n)
        if self.visit is not None:
            self.visit(n, out)
        return out


def _flat_inputs(gm: GraphModule) -> list:
    device = module_device(gm)
    args = tuple(x.to(device) if isinstance(x, torch.Tensor) and device is not None else x
                 for x in level_info(gm).example_inputs)
    return list(gm.graph._codegen.process_inputs(*args))


_MEMO: list[dict] = []  # inside reusing_runs(): id(gm) -> (gm, outputs)


@contextlib.contextmanager
def reusing_runs():
    """Inside the block each graph runs on its example inputs once: a stage's output is the
    next stage's input (coalesce, then the round trip's depth and width stages)."""
    _MEMO.append({})
    try:
        yield
    finally:
        _MEMO.pop()


def _run(gm: GraphModule, visit=None) -> list:
    """The flat values of ``gm``'s output node on its example inputs, in eval mode, no grad;
    the level's mode is put back after."""
    if visit is None and _MEMO:
        hit = _MEMO[-1].get(id(gm))
        if hit is None or hit[0] is not gm:
            hit = _MEMO[-1][id(gm)] = (gm, _run_once(gm))
        return hit[1]
    return _run_once(gm, visit)


def _run_once(gm: GraphModule, visit=None) -> list:
    training = gm.training
    try:
        with torch.no_grad():
            switch_mode_(gm, False)
            out = _Run(gm, visit).run(*_flat_inputs(gm))
    finally:
        switch_mode_(gm, training)
    return pytree.tree_leaves(out)


def _output_nodes(gm: GraphModule) -> list:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    return pytree.tree_leaves(out.args[0])


def _activations(gm: GraphModule) -> set[Node]:
    """Nodes whose value depends on a model input."""
    out: set[Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(a in out for a in n.all_input_nodes):
            out.add(n)
    return out


def rel_error(new: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|new - ref| / max|ref|`` (0 or 1 for integer and bool values: equal or not)."""
    if new.shape != ref.shape:
        return float("inf")
    if not (new.is_floating_point() or new.is_complex()):
        return 0.0 if torch.equal(new, ref) else 1.0
    a, b = new.detach().double(), ref.detach().double()
    if not torch.isfinite(a).all() or not torch.isfinite(b).all():
        same = torch.equal(torch.isfinite(a), torch.isfinite(b))
        fa, fb = a[torch.isfinite(a)], b[torch.isfinite(b)]
        if not same or not torch.equal(a[~torch.isfinite(a)], b[~torch.isfinite(b)]):
            return float("inf")
        a, b = fa, fb
        if a.numel() == 0:
            return 0.0
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) if a.numel() else 0.0


# ---------------------------------------------------------------------------------------------
# the comparison both stages share
# ---------------------------------------------------------------------------------------------
def _compare(before: GraphModule, after: GraphModule, what: str,
             counterpart: Callable[[Node], Node | None],
             expected: Callable[[Node, Node, Any], tuple[Any, str]]) -> float:
    """Raise SelfCheckError when ``after``'s outputs are not ``before``'s (through
    ``expected(old_node, new_node, old_value) -> (value, spaces)``); returns the worst output
    error."""
    old_out, new_out = _run(before), _run(after)
    old_nodes, new_nodes = _output_nodes(before), _output_nodes(after)
    worst, bad = 0.0, None
    for i, (o, n, ov, nv) in enumerate(zip(old_nodes, new_nodes, old_out, new_out)):
        if not (isinstance(ov, torch.Tensor) and isinstance(nv, torch.Tensor)):
            continue
        ref = expected(o, n, ov)[0] if isinstance(o, Node) and isinstance(n, Node) else ov
        err = rel_error(nv, ref) if isinstance(ref, torch.Tensor) else float("inf")
        worst = max(worst, err)
        if err > TOLERANCE and bad is None:
            bad = (i, err)
    if bad is None and EVERY_NODE:
        found = _first_divergence(before, after, counterpart, expected)
        if found[0] is not None:
            raise SelfCheckError(f"{what}: the outputs agree but node {found[0]} ({found[1]}) "
                                 f"differs by {found[2]:.2e}", node=found[0], op=found[1],
                                 error=found[2], space=found[3])
    if bad is None:
        log.debug("%s: the function is kept (worst output relative error %.2e)", what, worst)
        return worst
    i, err = bad
    node, op, node_err, spaces = _first_divergence(before, after, counterpart, expected)
    where = (f"the first node whose values diverge is {node} ({op}): relative error "
             f"{node_err:.2e}" + (f" (resized axes in space {spaces})" if spaces else "")
             if node else "no single node diverges before the outputs")
    raise SelfCheckError(
        f"{what} changed the model's function: output {i} differs by a relative error of "
        f"{err:.2e} (float32 tolerance {TOLERANCE:g}); {where}. This is a bug in vcyclefx or in "
        "a registered op rule (check the rule of that op); pass check=False to skip this check",
        node=node, op=op, error=node_err if node else err, space=spaces)


class _Found(Exception):
    pass


def _first_divergence(before, after, counterpart, expected):
    """(name, op, relative error, spaces) of the first comparable activation of ``after``
    whose value is not the old one's; (None, None, inf, "") if none."""
    old_values: dict[Node, Any] = {}

    def keep(n: Node, v):  # a copy: a later in-place op (relu_) must not change it
        old_values[n] = v.clone() if isinstance(v, torch.Tensor) else v

    _run(before, keep)
    acts = _activations(after)
    found: list = []

    def visit(n: Node, value):
        if n not in acts or n.op in ("placeholder", "output") or not isinstance(value, torch.Tensor):
            return
        o = counterpart(n)
        if o is None or not isinstance(old_values.get(o), torch.Tensor):
            return
        ref, spaces = expected(o, n, old_values[o])
        if not isinstance(ref, torch.Tensor) or ref.shape != value.shape:
            return  # not the same value (a different correspondence): nothing to compare
        err = rel_error(value, ref)
        if err > TOLERANCE:
            found.append((n.name, str(n.target), err, spaces))
            raise _Found

    try:
        _run(after, visit)
    except _Found:
        return found[0]
    return None, None, float("inf"), ""


# ---------------------------------------------------------------------------------------------
# width
# ---------------------------------------------------------------------------------------------
def _scaled_by_folds(after: GraphModule, comps: list[Compensation]) -> dict[str, float]:
    """Activations of ``after`` that carry a folded tied compensation: from the norm whose
    affine tensors carry it to the contraction's input, scaled by 1/factor (passes.width)."""
    nodes = {n.name: n for n in after.graph.nodes}
    out: dict[str, float] = {}
    for comp in comps:
        if comp.kind != TIED or not comp.fold or comp.node not in nodes:
            continue
        act = next((a for a in nodes[comp.node].all_input_nodes if a.op != "get_attr"), None)
        while isinstance(act, Node) and act.op == "call_function":
            out[act.name] = out.get(act.name, 1.0) / comp.factor
            if act.target in NORMS or act.target is aten.mul.Tensor or act.target not in _TRANSPARENT:
                break
            act = act.args[0]
    return out


def check_width(before: GraphModule, after: GraphModule, analysis, spaces: list[SpaceMap],
                comps: list[Compensation], what: str | None = None) -> float:
    """``after`` (``before`` de-coalesced in width; ``analysis`` is ``before``'s) computes
    ``before``'s function; returns the worst output error, raises SelfCheckError otherwise."""
    by_key = {s.key: s for s in analysis.spaces}
    resized = {by_key[sm.key].root.id: Units(sm) for sm in spaces if sm.key in by_key}
    old_by_name = {n.name: n for n in before.graph.nodes}
    scaled = _scaled_by_folds(after, comps)
    table = analysis.table

    def counterpart(n: Node) -> Node | None:
        o = old_by_name.get(n.name)
        return o if o is not None and o.op == n.op and o.target == n.target else None

    def expand(value, dims, keys):
        if not isinstance(value, torch.Tensor) or not isinstance(dims, (list, tuple)) or \
                len(dims) != value.dim():
            return value
        for ax, d in enumerate(dims):
            layout = table.layout(d)
            if has_resized(layout, resized):
                keys.update(resized[leaf.id].sm.key for leaf in table.leaves(d)
                            if leaf.id in resized)
                value = _apply_axis(value, ax, layout, resized, DECOALESCE, True)
        return value

    def expected(o: Node, n: Node, value):
        keys: set[str] = set()
        out = expand(value, analysis.node_dims.get(o), keys)
        factor = scaled.get(n.name, 1.0)
        if SCALE_META in n.meta and SCALE_META in o.meta:
            factor *= n.meta[SCALE_META]["value"] / o.meta[SCALE_META]["value"]
        if factor != 1.0 and isinstance(out, torch.Tensor):
            out = out * factor
        return out, ", ".join(sorted(keys))

    return _compare(before, after, what or "de-coalescing in width", counterpart, expected)


# ---------------------------------------------------------------------------------------------
# depth
# ---------------------------------------------------------------------------------------------
def _module_path(n: Node) -> str:
    stack = n.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _keys(gm: GraphModule, rename: Callable[[str], str | None]) -> dict:
    """Node -> (module path, op, occurrence of that op in that path); None: no counterpart."""
    seen: dict = defaultdict(int)
    out = {}
    for n in gm.graph.nodes:
        path = rename(_module_path(n))
        if path is None:
            out[n] = None
            continue
        base = (path, n.op, str(n.target))
        out[n] = base + (seen[base],)
        seen[base] += 1
    return out


def check_depth(before: GraphModule, after: GraphModule, chains: list[ChainMap],
                what: str | None = None) -> float:
    """``after`` (``before`` grown in depth with identity blocks) computes ``before``'s
    function; returns the worst output error, raises SelfCheckError otherwise."""
    moves: list[tuple[str, str | None]] = []  # new block path -> old block path (None: new)
    for c in chains:
        for b, group in enumerate(c.groups):
            for j, big in enumerate(group):
                moves.append((c.large_blocks[big], c.small_blocks[b] if j == 0 else None))
    moves.sort(key=lambda m: -len(m[0]))

    def rename(path: str) -> str | None:
        for new, old in moves:
            if path == new or path.startswith(new + "."):
                return None if old is None else old + path[len(new):]
        return path

    old_by_key = {k: n for n, k in _keys(before, lambda p: p).items()}
    new_keys = _keys(after, rename)
    return _compare(before, after, what or "identity depth growth",
                    lambda n: old_by_key.get(new_keys.get(n)) if new_keys.get(n) else None,
                    lambda o, n, value: (value, ""))


# ---------------------------------------------------------------------------------------------
# coalescing: finite outputs
# ---------------------------------------------------------------------------------------------
def check_finite(before: GraphModule, after: GraphModule, what: str = "coalescing") -> None:
    """``after``'s outputs are finite wherever ``before``'s are (``before`` runs only when
    ``after``'s are not); the error names the first node of ``after`` to go non-finite."""
    def finite(vs):
        return all(torch.isfinite(v).all() for v in vs
                   if isinstance(v, torch.Tensor) and v.is_floating_point())

    if finite(_run(after)) or not finite(_run(before)):
        return
    first: list = []
    acts = _activations(after)

    def visit(n: Node, value):
        if n in acts and isinstance(value, torch.Tensor) and value.is_floating_point() and \
                not torch.isfinite(value).all():
            first.append(n)
            raise _Found

    try:
        _run(after, visit)
    except _Found:
        pass
    node = first[0] if first else None
    where = f"; the first non-finite value is node {node.name} ({node.target})" if node else ""
    raise SelfCheckError(
        f"{what} gave non-finite outputs where the input's are finite{where}; pass check=False "
        "to skip this check",
        node=node.name if node else None, op=str(node.target) if node else None,
        error=float("inf"), space="")
