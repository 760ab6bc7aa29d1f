"""Architecture-agnostic analysis: spaces, units, roles, pins and tied tensors.

The analysis walks the captured graph once. Every op's rule (``vcyclefx.analysis.rules``) relates the
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
from typing import Any

import torch
from torch.fx import GraphModule, Node

from vcyclefx.analysis import rules  # noqa: F401 - registers the op rules
from vcyclefx.analysis.chains import find_chains
from vcyclefx.analysis.dims import PROD, Dim, DimTable
from vcyclefx.analysis.context import CONSUMER, PRODUCER, Consumer, Context, _where
from vcyclefx.level import fetch_attr
from vcyclefx.analysis.walk import walk

log = logging.getLogger("vcyclefx.analysis.analyze")

__all__ = ["analyze", "Analysis", "Space", "Member", "StateTensor", "Consumer", "Context",
           "PRODUCER", "CONSUMER", "walk", "natural_key"]


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
class Analysis:
    gm: GraphModule
    table: DimTable
    node_dims: dict[Node, Any]
    tensors: dict[str, StateTensor]  # canonical name -> tensor
    alias_of: dict[str, str]  # any name -> canonical name
    roles: dict[tuple[str, int], set[str]]
    consumers: list[Consumer]
    spaces: list[Space]
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


def analyze(gm: GraphModule, *, chains: bool = True) -> Analysis:
    """Analyse a level GraphModule: spaces, roles, pins, tied tensors and (optionally) chains."""
    start = time.perf_counter()
    ctx = Context(gm)
    walk(ctx, gm)
    tensors, alias_of = _collect_tensors(ctx, gm)
    _pin_mixed_roles(ctx, tensors)
    _pin_unowned(ctx, tensors)
    _pin_merged_replicas(ctx)
    spaces = _collect_spaces(ctx, tensors)
    result = Analysis(
        gm=gm, table=ctx.table, node_dims=ctx.out, tensors=tensors, alias_of=alias_of,
        roles=ctx.roles, consumers=ctx.consumers, spaces=spaces,
        records=ctx.records,
    )
    if chains:
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
        obj = fetch_attr(gm, node.target)
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


def _pin_mixed_roles(ctx: Context, tensors: dict[str, StateTensor]) -> None:
    """A tensor axis that is a consumer on only some of its leaves and a producer on it: pin
    the consumer's leaves and drop that consumer role.

    Roles are kept per tensor axis, and the width pass maps an axis as a producer (copy/mean)
    or as a consumer (split/sum) as a whole. A packed projection whose rows make a query from
    a parameter (an attention-pooling query, ``in_proj_weight`` rows viewed as (3, H, Dh)) is a
    producer on its heads but a consumer on head_dim where q·kᵀ contracts that query against
    activation keys: as one "tied" axis it would be mapped wrongly (copied on head_dim, then
    compensated as a whole). Consumers that cover the whole axis (a tied embedding = LM head)
    keep the tied handling."""
    table = ctx.table
    kept: list[Consumer] = []
    for c in ctx.consumers:
        st = tensors.get(c.tensor)
        roles = ctx.roles.get((c.tensor, c.axis), set())
        if st is None or c.dim is None or PRODUCER not in roles:
            kept.append(c)
            continue
        part = {x.id for x in table.leaves(c.dim) if x.size != 1}
        whole = {x.id for x in table.leaves(st.dims[c.axis]) if x.size != 1}
        if not part or part >= whole:
            kept.append(c)
            continue
        ctx.pin(c.dim, f"{c.tensor} axis {c.axis} is a producer of its other parts but is "
                       f"contracted on this one against an activation at {_where(c.node)} (a "
                       "query made from parameters); one axis cannot be both copied and split")
    still = {(k.tensor, k.axis) for k in kept}
    for c in ctx.consumers:
        if (c.tensor, c.axis) not in still:
            ctx.roles[(c.tensor, c.axis)].discard(CONSUMER)
    ctx.consumers[:] = kept


def _pin_unowned(ctx: Context, tensors: dict[str, StateTensor]) -> None:
    """Axes of tensors that never meet an activation have no role: their spaces are pinned."""
    for name, t in tensors.items():
        for ax, d in enumerate(t.dims):
            if not ctx.roles.get((name, ax)):
                ctx.pin(d, f"{name} axis {ax} never meets an activation")


def _pin_merged_replicas(ctx: Context) -> None:
    """A replication factor that a reshape merges into another axis (``repeat_kv``'s
    expand + reshape: key/value heads x copies x head_dim) counts copies of something else, the
    groups before it: keep it. Replication used directly elementwise (a mask expanded to the
    hidden size) is an ordinary axis of its space, and so is one with no group before it
    (multi-query attention: one key/value head that every query head reads, so the query heads
    resize like any heads) where an ``expand`` made it (Mamba2's ``repeat_interleave`` of its
    groups keeps its counts)."""
    grouped: set[int] = set()
    for r in ctx.table.roots():
        if r.kind == PROD:
            kids = [ctx.table.find(c) for c in r.children]
            for i, c in enumerate(kids):
                if any(not _is_one(x.size) for x in kids[:i]):
                    grouped.add(c.id)
    for d, node in ctx.replicas:
        # only an expand's sizes are rewritten with its space; a repeat's counts are not
        if ctx.table.find(d).id in grouped or node.target is not torch.ops.aten.expand.default:
            ctx.pin(d, f"replication factor made at {_where(node)}: copies per group are kept "
                       "(query heads stay with their key/value head)")


def _is_one(size) -> bool:
    try:
        return int(size) == 1
    except (TypeError, ValueError):  # a symbolic size is not 1
        return False


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
