"""Architecture-agnostic analysis: spaces, units, roles, pins and tied tensors.

The analysis walks the captured graph once. Every op's rule (``vcyclefx.rules``) relates the
dims of its inputs and outputs; nothing here looks at parameter names or module classes. After
the walk:

- every *leaf* dim class that some parameter axis contains is a **space**;
- a parameter axis that meets activations in an elementwise way is a **producer** of its spaces,
  one that is contracted against activations (matmul/conv reduction axis) is a **consumer**; a
  tensor in both roles is **tied**;
- a space is **pinned** when it touches model inputs/outputs, is indexed (embedding rows,
  select), contracted between two activations (attention's head_dim), reduced by something that
  is not invariant to duplicating units (sum, softmax), or viewed inconsistently; each pin keeps
  its reason.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch.fx import GraphModule, Node

from . import rules  # noqa: F401 - registers the op rules
from .dims import CAT, PROD, Dim, DimConflict, DimTable, as_size
from .errors import AnalysisError
from .registry import get_arg, rule_for

log = logging.getLogger("vcyclefx.analysis")

PRODUCER = "producer"
CONSUMER = "consumer"


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
@dataclass
class StateTensor:
    """A parameter, buffer or constant of the graph (aliases share one StateTensor)."""

    name: str  # canonical name (the one the graph reads)
    aliases: tuple[str, ...]  # every name this tensor has (tied weights have several)
    kind: str  # "parameter" | "buffer" | "constant"
    shape: tuple[int, ...]
    dtype: torch.dtype
    dims: list[Dim]  # one per axis


@dataclass
class Member:
    """One parameter axis inside a space, with its role and where the space sits in the axis."""

    tensor: str
    axis: int
    role: str  # "producer" | "consumer" | "tied"
    path: str  # position of the space's leaf in the axis layout, e.g. "1.0"


@dataclass
class Space:
    id: int
    key: str  # stable identity across levels: "<tensor>[<axis>]<path>" of a representative
    size: int  # number of units
    unit: int  # features per unit on the representative axis (head_dim for heads, 1 otherwise)
    resizable: bool
    reason: str  # why pinned ("" if resizable)
    members: list[Member]
    normalized: str | None  # a node normalising over the space (uneven groups are not exact)
    root: Dim = field(repr=False)

    @property
    def kind(self) -> str:
        return "heads" if self.unit > 1 else "features"


@dataclass
class Consumer:
    """A contraction where a tensor acts as a consumer: the activation operand it meets."""

    tensor: str
    axis: int
    node: Node
    activation: Node


@dataclass
class Analysis:
    gm: GraphModule
    table: DimTable
    node_dims: dict[Node, Any]
    tensors: dict[str, StateTensor]  # canonical name -> tensor
    alias_of: dict[str, str]  # any name -> canonical name
    roles: dict[tuple[str, int], set[str]]
    consumers: list[Consumer]
    spaces: list[Space]
    literals: dict[tuple[Node, str], Dim]  # literal ints that are sizes of a dim
    records: dict[Node, dict]  # per-node data rules keep for the rewrite
    chains: list = field(default_factory=list)
    seconds: float = 0.0

    def space(self, key: str) -> Space:
        for s in self.spaces:
            if s.key == key:
                return s
        raise KeyError(key)

    def space_of(self, d: Dim) -> Space | None:
        r = self.table.find(d)
        for s in self.spaces:
            if s.root is r:
                return s
        return None

    @property
    def tied(self) -> list[str]:
        """Tensors in both roles on one axis, or with several names."""
        out = []
        for name, t in self.tensors.items():
            both = any(len(self.roles.get((name, a), ())) > 1 for a in range(len(t.shape)))
            if both or len(t.aliases) > 1:
                out.append(name)
        return out

    def dims(self, node: Node):
        return self.node_dims.get(node)


# ---------------------------------------------------------------------------------------------
# the context rules see
# ---------------------------------------------------------------------------------------------
def _where(node: Node) -> str:
    return f"node {node.name} ({node.target if node.op != 'call_function' else _short(node.target)})"


def _short(target) -> str:
    s = str(target)
    return s[len("aten."):] if s.startswith("aten.") else getattr(target, "__name__", s)


class Context:
    """What op rules use: dims of values, unification, pins, contractions, records."""

    def __init__(self, gm: GraphModule):
        self.gm = gm
        self.table = DimTable()
        self.out: dict[Node, Any] = {}
        self.prov: dict[Node, Any] = {}  # param-derived nodes: per axis set of (tensor, axis)
        self.roles: dict[tuple[str, int], set[str]] = {}
        self.consumers: list[Consumer] = []
        self.literals: dict[tuple[Node, str], Dim] = {}
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

    def literal(self, node: Node, key: str, d: Dim) -> None:
        """The literal int argument ``key`` of ``node`` is the size of ``d``."""
        self.literals[(node, key)] = d

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
                        self.consumers.append(Consumer(t, tax, node, a_ops[0][0]))
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


import operator  # noqa: E402

_getitem = operator.getitem


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


# ---------------------------------------------------------------------------------------------
# the walk
# ---------------------------------------------------------------------------------------------
def _state_tensors(gm: GraphModule) -> tuple[dict[str, tuple[str, torch.Tensor]], dict[int, list[str]]]:
    params = dict(gm.named_parameters(remove_duplicate=False))
    buffers = dict(gm.named_buffers(remove_duplicate=False))
    names_by_id: dict[int, list[str]] = {}
    kinds: dict[str, tuple[str, torch.Tensor]] = {}
    for name, t in params.items():
        kinds[name] = ("parameter", t)
        names_by_id.setdefault(id(t), []).append(name)
    for name, t in buffers.items():
        kinds[name] = ("buffer", t)
        names_by_id.setdefault(id(t), []).append(name)
    return kinds, names_by_id


def walk(ctx: Context, gm: GraphModule, bind: dict[Node, Any] | None = None) -> None:
    """Run every node's rule; ``bind`` gives placeholder dims when walking a subgraph."""
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if bind is not None:
                ctx.out[node], prov = bind[node]
                if prov is not None:
                    ctx.prov[node] = prov
            else:
                dims = ctx.out_fresh(node)
                for i, d in enumerate(dims if isinstance(dims, list) else []):
                    ctx.pin(d, f"model input '{node.name}' dim {i}")
        elif node.op == "get_attr":
            obj = _fetch(gm, node.target)
            if isinstance(obj, torch.Tensor):
                dims = ctx.fresh_like(obj) if "val" not in node.meta else ctx.fresh(node)
                ctx.out[node] = dims
                name = node.target if gm is ctx.gm else None
                if name is not None:
                    ctx.prov[node] = {i: {(name, i)} for i in range(obj.dim())}
            else:
                ctx.out[node] = None
        elif node.op == "call_module":
            if node.target == "_guards_fn" or node.target.endswith("_guards_fn"):
                ctx.out[node] = None
                continue
            raise AnalysisError(
                f"{node.format_node()}: call_module nodes are not supported in captured graphs"
            )
        elif node.op == "call_function":
            rule = rule_for(node)
            try:
                rule.analyze(ctx, node)
            except (AnalysisError, DimConflict):
                raise
            except Exception as e:  # noqa: BLE001 - a rule bug is reported with its node
                raise AnalysisError(f"{node.format_node()}: rule failed: {type(e).__name__}: {e}") from e
            if node not in ctx.out:
                ctx.out[node] = None
            ctx._finish_node(node)
        elif node.op == "output":
            if bind is None:
                for k, leaf in enumerate(_flat_nodes(node.args[0])):
                    dims = ctx.out.get(leaf)
                    if isinstance(dims, list):
                        for i, d in enumerate(dims):
                            if isinstance(d, Dim):
                                ctx.pin(d, f"model output {k} dim {i}")
            else:
                ctx.out[node] = [ctx.out.get(a) for a in _flat_nodes(node.args[0])]


def _flat_nodes(x) -> list:
    out: list = []
    torch.fx.node.map_arg(x, lambda n: out.append(n))
    return out


def _fetch(gm: torch.nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def analyze(gm: GraphModule, *, chains: bool = True) -> Analysis:
    """Analyse a level GraphModule: spaces, roles, pins, tied tensors and (optionally) chains."""
    start = time.perf_counter()
    ctx = Context(gm)
    walk(ctx, gm)
    tensors, alias_of = _collect_tensors(ctx, gm)
    _pin_unowned(ctx, tensors)
    _pin_merged_replicas(ctx)
    spaces = _collect_spaces(ctx, tensors)
    result = Analysis(
        gm=gm, table=ctx.table, node_dims=ctx.out, tensors=tensors, alias_of=alias_of,
        roles=ctx.roles, consumers=ctx.consumers, spaces=spaces, literals=ctx.literals,
        records=ctx.records,
    )
    if chains:
        from .chains import find_chains

        result.chains = find_chains(gm)
    result.seconds = time.perf_counter() - start
    log.debug("analysis of %d nodes took %.3fs", len(gm.graph.nodes), result.seconds)
    return result


def _collect_tensors(ctx: Context, gm: GraphModule):
    """One StateTensor per tensor object; its canonical name is the smallest of its names, so
    it does not depend on which alias the graph happens to read."""
    kinds, names_by_id = _state_tensors(gm)
    tensors: dict[str, StateTensor] = {}
    alias_of: dict[str, str] = {}
    canon_of_id: dict[int, str] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or not isinstance(ctx.out.get(node), list):
            continue
        obj = _fetch(gm, node.target)
        if id(obj) in canon_of_id:
            # another get_attr of the same tensor: its axes are the same axes
            for a, b in zip(tensors[canon_of_id[id(obj)]].dims, ctx.out[node]):
                ctx.table.unify(a, b, f"alias {node.target}")
            continue
        aliases = tuple(sorted(set(names_by_id.get(id(obj), [])) | {node.target}))
        canon = aliases[0]
        canon_of_id[id(obj)] = canon
        kind = kinds.get(node.target, ("constant", obj))[0]
        tensors[canon] = StateTensor(
            name=canon, aliases=aliases, kind=kind, shape=tuple(obj.shape), dtype=obj.dtype,
            dims=ctx.out[node],
        )
        for a in aliases:
            alias_of[a] = canon
    # merge roles recorded under alias names into the canonical name
    for (t, ax), roles in list(ctx.roles.items()):
        canon = alias_of.get(t, t)
        if canon != t:
            ctx.roles.setdefault((canon, ax), set()).update(roles)
            del ctx.roles[(t, ax)]
    for c in ctx.consumers:
        c.tensor = alias_of.get(c.tensor, c.tensor)
    return tensors, alias_of


def _pin_unowned(ctx: Context, tensors: dict[str, StateTensor]) -> None:
    """Axes of tensors that never meet an activation have no role: their spaces are pinned."""
    for name, t in tensors.items():
        for ax, d in enumerate(t.dims):
            if not ctx.roles.get((name, ax)):
                ctx.pin(d, f"{name} axis {ax} never meets an activation")


def _pin_merged_replicas(ctx: Context) -> None:
    """A replication factor that a reshape merges into another axis (``repeat_kv``'s
    expand + reshape) counts copies of something else: keep it. Replication used directly
    elementwise (a mask expanded to the hidden size) is an ordinary axis of its space."""
    children = set()
    for r in ctx.table.roots():
        if r.kind == PROD:
            children.update(ctx.table.find(c).id for c in r.children)
    for d, node in ctx.replicas:
        if ctx.table.find(d).id in children:
            ctx.pin(d, f"replication factor made at {_where(node)}: copies per group are kept "
                       "(query heads stay with their key/value head)")


def _layout_paths(table: DimTable, d: Dim, prefix: str = "") -> list[tuple[Dim, str, list[Dim]]]:
    """(leaf root, path, trailing siblings in its product) for every leaf of ``d``."""
    r = table.find(d)
    if r.kind is None:
        return [(r, prefix, [])]
    out = []
    for i, c in enumerate(r.children):
        sub = _layout_paths(table, c, f"{prefix}{i}." if r.kind else prefix)
        if r.kind == PROD:
            trailing = list(r.children[i + 1 :])
            sub = [(leaf, p, tr + trailing) for leaf, p, tr in sub]
        out.extend(sub)
    return out


def _effective_pins(table: DimTable) -> dict[int, list[str]]:
    """Pins of every dim pushed down to its leaves."""
    pins: dict[int, list[str]] = {}

    def push(d: Dim, reasons: list[str]) -> None:
        r = table.find(d)
        mine = reasons + [p for p in r.pins if p not in reasons]
        if r.kind is None:
            lst = pins.setdefault(r.id, [])
            lst.extend(p for p in mine if p not in lst)
            return
        for c in r.children:
            push(c, mine)

    for r in list(table.roots()):
        push(r, [])
    return pins


def _effective_flags(table: DimTable) -> dict[int, dict[str, str]]:
    flags: dict[int, dict[str, str]] = {}

    def push(d: Dim, inherited: dict[str, str]) -> None:
        r = table.find(d)
        mine = {**r.flags, **inherited}
        if r.kind is None:
            f = flags.setdefault(r.id, {})
            for k, v in mine.items():
                f.setdefault(k, v)
            return
        for c in r.children:
            push(c, mine)

    for r in list(table.roots()):
        push(r, {})
    return flags


def _collect_spaces(ctx: Context, tensors: dict[str, StateTensor]) -> list[Space]:
    table = ctx.table
    pins = _effective_pins(table)
    flags = _effective_flags(table)
    members: dict[int, list[Member]] = {}
    units: dict[tuple[int, str, int, str], int] = {}
    roots: dict[int, Dim] = {}
    for name in sorted(tensors):
        t = tensors[name]
        for ax, d in enumerate(t.dims):
            roles = ctx.roles.get((name, ax), set())
            role = "tied" if len(roles) > 1 else (next(iter(roles)) if roles else "none")
            for leaf, path, trailing in _layout_paths(table, d):
                if leaf.size == 1 or not isinstance(leaf.size, int):
                    continue
                roots[leaf.id] = leaf
                member = Member(name, ax, role, path.rstrip("."))
                members.setdefault(leaf.id, []).append(member)
                unit = 1
                for tr in trailing:
                    size = table.find(tr).size
                    unit *= size if isinstance(size, int) else 1
                units[(leaf.id, name, ax, member.path)] = unit
    spaces = []
    for leaf_id, mem in members.items():
        rep = min(mem, key=lambda m: (m.path.count("."), m.tensor, m.axis, m.path))
        leaf = roots[leaf_id]
        reasons = pins.get(leaf_id, [])
        spaces.append(
            Space(
                id=0,
                key=f"{rep.tensor}[{rep.axis}]{('/' + rep.path) if rep.path else ''}",
                size=int(leaf.size),
                unit=units[(leaf_id, rep.tensor, rep.axis, rep.path)],
                resizable=not reasons,
                reason="; ".join(reasons[:3]) + (f" (+{len(reasons) - 3} more)" if len(reasons) > 3 else ""),
                members=mem,
                normalized=flags.get(leaf_id, {}).get("normalized"),
                root=leaf,
            )
        )
    spaces.sort(key=lambda s: (not s.resizable, natural_key(_first_use(s)), natural_key(s.key)))
    for i, s in enumerate(spaces):
        s.id = i
    return spaces


def _first_use(space: Space) -> str:
    return min((m.tensor for m in space.members), key=natural_key)


def natural_key(name: str) -> tuple:
    """Sort key under which ``h.2`` comes before ``h.10``."""
    import re

    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))
