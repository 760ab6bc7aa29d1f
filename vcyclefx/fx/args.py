"""FX node arguments by schema name, and the typed edits rewrites make to nodes.

``get_arg``/``set_arg`` read and write an argument whether the node holds it positionally or
as a keyword; ``functional_of`` maps an in-place or ``out=`` overload to the functional one it
computes. An :class:`Edit` is what a rewrite rule returns for one node (a new op, arguments by
name or by position); the width pass applies it. Graph-level helpers with no vcyclefx imports,
so that every pass and the Level type can use them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.fx import Node


# -- in-place and out= overloads ------------------------------------------------------------------
def written_args(schema) -> list:
    return [a for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]


def returned_args(schema) -> list:
    """Per return of ``schema``, the argument it is (``Tensor(a!) out`` returned as
    ``Tensor(a!)``), or None for a new value."""
    out = []
    for r in schema.returns:
        alias = r.alias_info
        match = None
        if alias is not None and alias.is_write:
            match = next((a for a in schema.arguments if a.alias_info is not None
                          and a.alias_info.before_set == alias.before_set), None)
        out.append(match)
    return out


def _signature(args, first_by_type: bool = False) -> list[tuple[str, str]]:
    """(name, type) per argument; the first by type only where ``first_by_type`` (in-place ops
    call it ``self`` where some functional ops call it ``input``: ``dropout_`` / ``dropout``)."""
    out = [(a.name, str(a.type)) for a in args]
    if first_by_type and out:
        out[0] = ("", out[0][1])
    return out


@functools.lru_cache(maxsize=None)
def functional_of(target):
    """The functional overload an in-place (``add_.Tensor`` -> ``add.Tensor``) or ``out=``
    (``add.out`` -> ``add.Tensor``) overload computes, or None."""
    if not isinstance(target, torch._ops.OpOverload):
        return None
    schema = target._schema
    written = written_args(schema)
    if not written:
        return None
    ns, _, name = schema.name.partition("::")
    packet_ns = getattr(torch.ops, ns, None)
    if name.endswith("_") and not name.endswith("__") and written[0].name == schema.arguments[0].name:
        packet = getattr(packet_ns, name[:-1], None)  # in-place: same arguments, no write
        want = _signature(schema.arguments, first_by_type=True)
        preferred = schema.overload_name or "default"
    else:
        buffers = {a.name for a in written if a.kwarg_only}  # out=, save_mean=, ...
        if not buffers:
            return None  # an argument written in place that is not an out= buffer
        packet = getattr(packet_ns, name, None)  # out=: the other arguments, one overload
        want = _signature([a for a in schema.arguments if a.name not in buffers])
        preferred = None
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        return None
    candidates = [getattr(packet, o) for o in packet.overloads()]
    if preferred is None:  # out=: the functional op writes no buffer; it may also take the
        # tensor options an out= overload gets from its buffer (dtype=, device=, ...)
        names = {n for n, _ in want}
        candidates = [c for c in candidates if not any(a.kwarg_only for a in written_args(c._schema))
                      and _signature([a for a in c._schema.arguments if a.name in names]) == want
                      and all(a.kwarg_only and a.has_default_value()
                              for a in c._schema.arguments if a.name not in names)]
    else:
        candidates = [c for c in candidates if not written_args(c._schema)
                      and _signature(c._schema.arguments, True) == want]
    candidates.sort(key=lambda c: ((c._schema.overload_name or "default") != preferred,
                                   len(c._schema.arguments)))  # the exact signature first
    return candidates[0] if candidates else None


# -- arguments by name ------------------------------------------------------------------------
_NO_DEFAULT = object()


def _schema_args(target):
    schema = getattr(target, "_schema", None)
    return None if schema is None else schema.arguments


def arg_index(target, name: str) -> int | None:
    """Position of argument ``name`` in ``target``'s schema (None if it is not an argument)."""
    args = _schema_args(target)
    if args is None:
        return None
    for i, a in enumerate(args):
        if a.name == name:
            return i
    return None


def get_arg(node: Node, name: str, default: Any = _NO_DEFAULT) -> Any:
    """Argument ``name`` of ``node`` read through the op schema (positional or keyword),
    falling back to the schema default."""
    if name in node.kwargs:
        return node.kwargs[name]
    args = _schema_args(node.target)
    if args is None:
        raise KeyError(f"{node.format_node()}: op has no schema; cannot read argument {name!r}")
    for i, a in enumerate(args):
        if a.name == name:
            if i < len(node.args) and not a.kwarg_only:
                return node.args[i]
            if a.has_default_value():
                return a.default_value
            if default is not _NO_DEFAULT:
                return default
            raise KeyError(f"{node.format_node()}: argument {name!r} missing")
    f = functional_of(node.target)  # a derived rule reads the functional op's names
    if f is not None and (i := arg_index(f, name)) is not None and i < len(node.args):
        return node.args[i]
    if default is not _NO_DEFAULT:
        return default
    raise KeyError(f"{node.format_node()}: {node.target} has no argument {name!r}")


def set_arg(node: Node, name: str, value: Any) -> None:
    """Set argument ``name`` of ``node`` (where it already is: positional or keyword)."""
    args = _schema_args(node.target)
    idx = arg_index(node.target, name)
    if idx is None:
        raise KeyError(f"{node.format_node()}: {node.target} has no argument {name!r}")
    if idx < len(node.args) and not args[idx].kwarg_only:
        new = list(node.args)
        new[idx] = value
        node.args = tuple(new)
    else:
        node.kwargs = {**node.kwargs, name: value}


# -- edits: what a rewrite changes in a node --------------------------------------------------
@dataclass(frozen=True)
class Edit:
    """A rewrite's change to one node: a new op (``target``, None: the same), then arguments
    set by schema name (``named``) and, for ops without a schema (``operator.mul`` of sizes),
    by position (``positional``). Values may hold nodes of the graph the rewrite read."""

    target: Any = None
    named: tuple[tuple[str, Any], ...] = ()
    positional: tuple[tuple[int, Any], ...] = ()
    nargs: int | None = None  # keep only this many positional arguments (and the keywords the
    # new op takes): the old op's other arguments mean nothing to ``target``

    def map_nodes(self, fn: Callable[[Node], Node]) -> "Edit":
        """The same edit with every node in its values replaced by ``fn(node)``."""
        def m(v):
            return torch.fx.node.map_arg(v, fn)

        return Edit(self.target, tuple((k, m(v)) for k, v in self.named),
                    tuple((i, m(v)) for i, v in self.positional), self.nargs)

    def apply(self, node: Node) -> None:
        """Change ``node`` in place: retarget it, then set the arguments (named ones through
        the new op's schema)."""
        if self.target is not None:
            node.target = self.target
        if self.nargs is not None:
            keep = {a.name for a in _schema_args(node.target) or ()}
            node.args = tuple(node.args[: self.nargs])
            node.kwargs = {k: v for k, v in node.kwargs.items() if k in keep}
        if self.positional:
            args = list(node.args)
            for i, value in self.positional:
                args[i] = value
            node.args = tuple(args)
        for name, value in self.named:
            set_arg(node, name, value)


def replace_args(**values: Any) -> Edit:
    """Set the arguments named in ``values`` (schema names: ``replace_args(start=0, end=8)``)."""
    return Edit(named=tuple(values.items()))


def replace_arg_at(index: int, value: Any) -> Edit:
    """Set positional argument ``index`` (for ops without a schema)."""
    return Edit(positional=((index, value),))


def retarget(op: Any, **values: Any) -> Edit:
    """Make the node call ``op`` and set the arguments named in ``values`` on ``op``'s schema."""
    return Edit(target=op, named=tuple(values.items()))
