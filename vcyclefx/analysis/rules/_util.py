"""Helpers shared by the op rules."""

from __future__ import annotations

import torch
from torch.fx import Node

from vcyclefx.analysis.dims import Dim, as_size
from vcyclefx.fx.args import Edit, replace_args
from vcyclefx.analysis.registry import op_of

aten = torch.ops.aten


def ndim_of(ctx, x) -> int:
    d = ctx.dims(x)
    return len(d) if isinstance(d, list) else 0


def norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def norm_dims(dims, ndim: int) -> list[int]:
    if dims is None:
        return list(range(ndim))
    if isinstance(dims, int):
        dims = [dims]
    return sorted(norm_dim(d, ndim) for d in dims)


def size(d: Dim):
    return d.size


def tensor_args(node: Node) -> list[Node]:
    """Tensor-valued argument nodes, in argument order, without repeats."""
    out: list[Node] = []
    for a in node.all_input_nodes:
        v = a.meta.get("val")
        if isinstance(v, torch.Tensor) and a not in out:
            out.append(a)
    return out


def broadcast_into(ctx, node: Node, out: list[Dim], inputs: list[Node]) -> None:
    """Unify right-aligned axes of ``inputs`` with ``out`` where sizes agree (numpy rules:
    an input axis of size 1 broadcasts and relates to nothing)."""
    for a in inputs:
        dims = ctx.dims(a)
        if not isinstance(dims, list):
            continue
        off = len(out) - len(dims)
        for j, d in enumerate(dims):
            o = out[off + j]
            if d.size != 1 and _same(d.size, o.size):
                ctx.unify(d, o, node)


def _same(a, b) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return bool((as_size(a) - as_size(b)) == 0)
    except TypeError:
        return False


def shape_entries_rewrite(argname: str, axes_of=None):
    """Rewrite for an op whose argument ``argname`` is a list of sizes, one per output axis
    (or per axis given by ``axes_of(rw, node)``): literal entries become the new sizes."""

    def rewrite(rw, node: Node) -> Edit | None:
        entries = rw.arg(node, argname)
        if not isinstance(entries, (list, tuple)):
            return None
        dims = axes_of(rw, node) if axes_of else rw.dims(node)
        if not isinstance(dims, list) or len(dims) != len(entries):
            return None
        new = list(entries)
        changed = False
        for i, (e, d) in enumerate(zip(entries, dims)):
            if isinstance(e, int) and not isinstance(e, bool) and e not in (-1,) and d is not None:
                n = rw.new_size(d)
                if isinstance(n, int) and n != e:
                    new[i] = n
                    changed = True
        return replace_args(**{argname: new}) if changed else None

    return rewrite


def ops(*names: str) -> list:
    """The op overloads named ``"name.overload"`` that exist in this torch build."""
    out = []
    for full in names:
        name, _, overload = full.partition(".")
        packet = getattr(aten, name, None)
        op = getattr(packet, overload or "default", None) if packet is not None else None
        if op is not None:
            out.append(op)
    return out


def family(node: Node) -> str:
    """The op family a rule analyses ``node`` as: the name of its (functional) op without
    namespace or overload (``aten.split.sizes`` -> ``"split"``), so that a rule treats every
    overload of its family alike."""
    op = op_of(node)
    schema = getattr(op, "_schema", None)
    return schema.name.split("::")[-1] if schema is not None else getattr(op, "__name__", str(op))


def overload(node: Node) -> str:
    """The overload name of the op a rule analyses ``node`` as (``"default"`` for none)."""
    schema = getattr(op_of(node), "_schema", None)
    return (schema.overload_name or "default") if schema is not None else ""
