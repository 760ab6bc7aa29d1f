"""The op registry: one small rule per op, keyed by op identity.

A rule tells the analysis how an op relates the axes of its inputs and outputs (which dims are
the same, which are split or concatenated, which are contracted, which are indexed and so
pinned). An optional *rewrite* tells the width pass how to update the op's literal size
arguments once spaces are resized. An op without a rule is an error naming the node; register
your own with::

    from vcyclefx.registry import register_rule

    @register_rule(torch.ops.mylib.fused_norm.default)
    def _fused_norm(ctx, node):
        x = ctx.arg_dims(node, "input")
        ctx.set_out(node, x)              # output axes are the input axes
        ctx.normalized(x[-1], node)       # mean/variance over the last axis

Arguments are read by name from the op's schema (``ctx.arg(node, "dim")``), never by position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.fx import Node

from .errors import UnsupportedOp

RuleFn = Callable[[Any, Node], None]
RewriteFn = Callable[[Any, Node], None]


@dataclass(frozen=True)
class Rule:
    analyze: RuleFn
    rewrite: RewriteFn | None = None


_RULES: dict[Any, Rule] = {}


def register_rule(*targets, rewrite: RewriteFn | None = None, replace: bool = False):
    """Decorator registering ``fn`` as the analysis rule of every op in ``targets``.

    ``targets`` are op overloads (``torch.ops.aten.linear.default``), OpOverloadPackets (all
    overloads), Python callables (``operator.mul``) or higher-order ops.
    """

    def deco(fn: RuleFn) -> RuleFn:
        for t in targets:
            keys = [getattr(t, o) for o in t.overloads()] if isinstance(t, torch._ops.OpOverloadPacket) else [t]
            for k in keys:
                if k in _RULES and not replace:
                    raise ValueError(f"a rule for {k} is already registered (pass replace=True)")
                _RULES[k] = Rule(fn, rewrite)
        return fn

    return deco


def rule_for(node: Node) -> Rule:
    rule = _RULES.get(node.target)
    if rule is None:
        raise UnsupportedOp(
            f"{node.format_node()}: op {_op_name(node.target)} has no vcyclefx rule, so the "
            "analysis cannot tell how it relates the axes of its inputs and outputs. Register "
            "one with @vcyclefx.register_rule(<op>) (see vcyclefx/registry.py for an example)."
        )
    return rule


def has_rule(target) -> bool:
    return target in _RULES


def _op_name(target) -> str:
    if isinstance(target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)):
        return str(target)
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)


def registered_ops() -> list[str]:
    return sorted(str(k) for k in _RULES)


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
