"""The context op rules see while the analysis walks a graph.

A rule reads the dims of its inputs (``ctx.dims``/``ctx.arg_dims``), states how they relate to
its outputs (``set_out``, ``unify``, ``refine``, ``match_products``), and marks what is special:
contractions (``contract``), indexed axes (``index_axis``), normalisations (``normalized``),
pins with reasons (``pin``), replication factors (``replica``) and literal sizes the rewrite
must update (``literal``/``record``). After each node the context assigns parameter roles:
a parameter-derived operand that meets an activation elementwise is a producer on its axes, one
contracted against an activation is a consumer on the contracted axis.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch.fx import GraphModule, Node

from vcyclefx.analysis.dims import Dim, DimConflict, DimTable, as_size
from vcyclefx.errors import AnalysisError
from vcyclefx.fx.args import get_arg

PRODUCER = "producer"
CONSUMER = "consumer"


@dataclass
class Consumer:
    """A contraction where a tensor acts as a consumer: the activation operand it meets."""

    tensor: str
    axis: int
    node: Node
    activation: Node
    dim: Dim | None = None  # the contracted axis (a part of the tensor's axis, or all of it)


def _where(node: Node) -> str:
    return f"node {node.name} ({node.target if node.op != 'call_function' else _short(node.target)})"


def _short(target) -> str:
    s = str(target)
    return s[len("aten."):] if s.startswith("aten.") else getattr(target, "__name__", s)


class Context:
    """What op rules use: dims of values, unification, pins, contractions, records."""

    def __init__(self, gm: GraphModule):
        self.gm = gm
        self.table = DimTable(_shape_env_equality(gm))
        self.out: dict[Node, Any] = {}
        self.prov: dict[Node, Any] = {}  # param-derived nodes: per axis set of (tensor, axis)
        self.roles: dict[tuple[str, int], set[str]] = {}
        self.consumers: list[Consumer] = []
        self.records: dict[Node, dict] = {}
        self.replicas: list[tuple[Dim, Node]] = []
        self._contracted: list[tuple[Dim, list[tuple[Node, int]], str]] = []
        self._exempt: set[tuple[int, int]] = set()  # (id(operand), axis) not producers here
        self.subgraph_stack: list[GraphModule] = [gm]

    # -- values ------------------------------------------------------------------------------
    def where(self, node: Node) -> str:
        return _where(node)

    def val(self, node: Node):
        return node.meta.get("val")

    def dims(self, x) -> Any:
        """Dims of an argument: a list (tensor), list of lists (tuple of tensors), a Dim
        (SymInt node) or None (literal / non-tensor)."""
        if isinstance(x, Node):
            if x not in self.out:
                raise AnalysisError(f"{_where(x)} is used before the analysis saw it")
            return self.out[x]
        return None

    def arg(self, node: Node, name: str, default=None):
        return get_arg(node, name, default)

    def arg_dims(self, node: Node, name: str):
        return self.dims(get_arg(node, name, None))

    def fresh_like(self, val) -> Any:
        if isinstance(val, torch.Tensor):
            return [self.table.new(as_size(s)) for s in val.shape]
        if isinstance(val, (list, tuple)):
            return [self.fresh_like(v) for v in val]
        if isinstance(val, torch.SymInt):
            return self.table.new(as_size(val))
        return None

    def fresh(self, node: Node) -> Any:
        return self.fresh_like(self.val(node))

    def set_out(self, node: Node, dims) -> None:
        self.out[node] = dims

    def out_fresh(self, node: Node):
        d = self.fresh(node)
        self.out[node] = d
        return d

    # -- relations ------------------------------------------------------------------------------
    def unify(self, a: Dim, b: Dim, node: Node) -> None:
        if a is None or b is None:
            return
        try:
            self.table.unify(a, b, _where(node))
        except DimConflict as e:
            raise AnalysisError(f"{node.format_node()}: {e}") from e

    def unify_all(self, xs: Iterable[Dim], ys: Iterable[Dim], node: Node) -> None:
        for a, b in zip(xs, ys):
            self.unify(a, b, node)

    def refine(self, d: Dim, kind: str, parts: list[Dim], node: Node) -> list[Dim]:
        try:
            return self.table.refine(d, kind, parts, _where(node))
        except DimConflict as e:
            raise AnalysisError(f"{node.format_node()}: {e}") from e

    def match_products(self, a: list[Dim], b: list[Dim], node: Node, reason: str) -> None:
        """Reshape semantics; where the two factorisations cannot be matched, pin both sides."""
        try:
            self.table.match_products(a, b, _where(node))
        except DimConflict as e:
            ua, ub = getattr(e, "unmatched", (a, b))
            for d in list(ua) + list(ub):
                self.pin(d, f"{reason} at {_where(node)} mixes axes that cannot be matched")

    def pin(self, d: Dim | None, reason: str) -> None:
        if d is not None:
            self.table.pin(d, reason)

    def normalized(self, d: Dim, node: Node) -> None:
        self.table.flag(d, "normalized", _where(node))

    def contract(self, node: Node, operands: list[tuple[Node, int]], what: str = "") -> None:
        """``operands`` (node, axis) are summed over together at ``node``."""
        ds = [self.out[n][ax] for n, ax in operands if isinstance(n, Node)]
        if ds:
            self._contracted.append((ds[0], [(n, ax) for n, ax in operands if isinstance(n, Node)], what))

    def index_axis(self, node: Node, operand: Node, axis: int, reason: str) -> None:
        """``operand``'s ``axis`` is indexed (its positions are addressed by values): pinned,
        and not a producer role of the tensor it comes from."""
        d = self.out[operand][axis]
        self.pin(d, f"{reason} at {_where(node)}")
        self._exempt.add((id(operand), axis))

    def replica(self, d: Dim, node: Node) -> None:
        """``d`` is a replication factor made by ``node`` (expand/repeat of a size-1 axis)."""
        self.replicas.append((d, node))

    def record(self, node: Node, **info) -> None:
        self.records.setdefault(node, {}).update(info)

    # -- roles ------------------------------------------------------------------------------------
    def _finish_node(self, node: Node) -> None:
        tensor_ins = _tensor_inputs(node)
        param_ins = [a for a in tensor_ins if a in self.prov]
        act_ins = [a for a in tensor_ins if a not in self.prov]
        for d, operands, what in self._contracted:
            p_ops = [(n, ax) for n, ax in operands if n in self.prov]
            a_ops = [(n, ax) for n, ax in operands if n not in self.prov]
            for n, ax in operands:
                self._exempt.add((id(n), ax))
            if p_ops and a_ops:
                for n, ax in p_ops:
                    for t, tax in self.prov[n].get(ax, ()):
                        self.roles.setdefault((t, tax), set()).add(CONSUMER)
                        self.consumers.append(Consumer(t, tax, node, a_ops[0][0], d))
            elif a_ops:
                label = what or "contracted between two activations"
                self.pin(d, f"{label} at {_where(node)}")
            else:
                self.pin(d, f"contracted between two parameters at {_where(node)}")
        if param_ins and act_ins:
            for a in param_ins:
                prov = self.prov[a]
                if not isinstance(prov, dict):
                    continue
                for ax, sources in prov.items():
                    if (id(a), ax) in self._exempt:
                        continue
                    for t, tax in sources:
                        self.roles.setdefault((t, tax), set()).add(PRODUCER)
        elif param_ins and not act_ins:
            self._propagate_prov(node, param_ins)
        self._contracted = []
        self._exempt = set()

    def _propagate_prov(self, node: Node, param_ins: list[Node]) -> None:
        out = self.out.get(node)
        if node.target is _getitem and isinstance(self.prov.get(node.args[0]), list):
            self.prov[node] = self.prov[node.args[0]][node.args[1]]
            return
        if isinstance(out, list) and out and isinstance(out[0], list):
            self.prov[node] = [self._prov_for(o, param_ins) for o in out]
        elif isinstance(out, list):
            self.prov[node] = self._prov_for(out, param_ins)

    def _prov_for(self, out_dims: list[Dim], param_ins: list[Node]) -> dict:
        res: dict[int, set] = {}
        for k, d in enumerate(out_dims):
            leaves = {x.id for x in self.table.leaves(d)}
            for a in param_ins:
                prov = self.prov[a]
                if not isinstance(prov, dict):
                    continue
                for j, src in prov.items():
                    in_leaves = {x.id for x in self.table.leaves(self.out[a][j])}
                    if leaves & in_leaves and self.table.find(d).size != 1:
                        res.setdefault(k, set()).update(src)
        return res


_getitem = operator.getitem


def _shape_env_equality(gm: GraphModule):
    """``(a, b) -> bool``: the capture's shape environment proves ``a == b`` from its guards
    (None when the graph has no symbolic sizes)."""
    env = None
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        for s in (v.shape if isinstance(v, torch.Tensor) else [v]):
            if isinstance(s, torch.SymInt):
                env = s.node.shape_env
                break
        if env is not None:
            break
    if env is None:
        return None
    import sympy

    def known_equal(a, b) -> bool:
        try:
            return env._maybe_evaluate_static(sympy.Eq(sympy.sympify(a), sympy.sympify(b))) is sympy.true
        except Exception:  # noqa: BLE001 - an expression the environment cannot read: not known
            return False

    return known_equal


def _tensor_inputs(node: Node) -> list[Node]:
    seen: list[Node] = []
    for a in node.all_input_nodes:
        v = a.meta.get("val")
        if isinstance(v, torch.Tensor) or (
            isinstance(v, (list, tuple)) and any(isinstance(x, torch.Tensor) for x in v)
        ):
            if a not in seen:
                seen.append(a)
    return seen
