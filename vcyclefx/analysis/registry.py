"""The op registry: one small rule per op, keyed by op identity.

A rule tells the analysis how an op relates the axes of its inputs and outputs (which dims are
the same, which are split or concatenated, which are contracted, which are indexed and so
pinned). An optional *rewrite* tells the width pass how to update the op's literal size
arguments once spaces are resized: it returns an :class:`Edit` (made by :func:`replace_args`,
:func:`replace_arg_at` or :func:`retarget`) or None. An op without a rule is an error naming the node; register
your own with::

    from vcyclefx.analysis.registry import register_rule

    @register_rule(torch.ops.mylib.fused_norm.default)
    def _fused_norm(ctx, node):
        x = ctx.arg_dims(node, "input")
        ctx.set_out(node, x)              # output axes are the input axes
        ctx.normalized(x[-1], node)       # mean/variance over the last axis

Arguments are read by name from the op's schema (``ctx.arg(node, "dim")``), never by position.

In-place (``add_.Tensor``, ``detach_.default``) and ``out=`` (``add.out``) overloads need no
rule of their own: they compute what their functional overload computes and write it into an
argument, so :func:`rule_for` derives their rule from the functional op's rule and ties the
output to the argument written (``self`` for in-place ops, ``out`` for ``out=`` ones). A rule
asks :func:`op_of` (not ``node.target``) which op it is analysing.

Ops of libraries that register them only when imported (``transformers::grouped_mm_fallback``)
are registered by qualified name, ``"namespace::name"`` (every overload) or
``"namespace::name.overload"``; the name is matched when a graph meets the op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.fx import Node

from vcyclefx.fx.args import (  # noqa: F401 - the argument helpers rules use, re-exported
    Edit,
    arg_index,
    functional_of,
    get_arg,
    replace_arg_at,
    replace_args,
    retarget,
    returned_args,
    set_arg,
    written_args,
)
from vcyclefx.errors import UnsupportedOp

RuleFn = Callable[[Any, Node], None]
RewriteFn = Callable[[Any, Node], "Edit | None"]  # a rule's rewrite: the edit of one node, or None


@dataclass(frozen=True)
class Rule:
    analyze: RuleFn
    rewrite: RewriteFn | None = None


_RULES: dict[Any, Rule] = {}
_DERIVED: dict[Any, Rule | None] = {}  # in-place / out= overload -> rule derived on first use
_BY_NAME: dict[str, Rule] = {}  # "namespace::name[.overload]" -> rule, for ops not imported yet


def register_rule(*targets, rewrite: RewriteFn | None = None, replace: bool = False):
    """Decorator registering ``fn`` as the analysis rule of every op in ``targets``.

    ``targets`` are op overloads (``torch.ops.aten.linear.default``), OpOverloadPackets (the
    whole op family: every overload of :func:`graph_overloads` that writes no argument), Python callables (``operator.mul``), higher-order ops, or qualified op names
    (``"transformers::grouped_mm_fallback"``) for ops that exist once their library is imported.
    """

    def deco(fn: RuleFn) -> RuleFn:
        _DERIVED.clear()  # derived rules may now come from this one
        for t in targets:
            if isinstance(t, str):
                if "::" not in t:
                    raise ValueError(f"{t!r}: an op name is 'namespace::name[.overload]'")
                if t in _BY_NAME and not replace:
                    raise ValueError(f"a rule for {t} is already registered (pass replace=True)")
                _BY_NAME[t] = Rule(fn, rewrite)
                continue
            keys = [t]
            if isinstance(t, torch._ops.OpOverloadPacket):  # the family: its graph overloads
                # that write nothing (in-place and out= ones derive their rule from those)
                keys = [o for o in graph_overloads(t) if not written_args(o._schema)]
            for k in keys:
                if k in _RULES and not replace:
                    raise ValueError(f"a rule for {k} is already registered (pass replace=True)")
                _RULES[k] = Rule(fn, rewrite)
        return fn

    return deco


def _own_rule(target) -> Rule | None:
    """The rule registered for ``target`` itself (by identity, else by qualified name)."""
    rule = _RULES.get(target)
    if rule is None and _BY_NAME and isinstance(target, torch._ops.OpOverload):
        name = target._schema.name
        rule = _BY_NAME.get(f"{name}.{target._overloadname}") or _BY_NAME.get(name)
    return rule


def rule_for(node: Node) -> Rule:
    rule = _own_rule(node.target) or _derived_rule(node.target)
    if rule is None:
        raise UnsupportedOp(
            f"{node.format_node()}: op {_op_name(node.target)} has no vcyclefx rule, so the "
            "analysis cannot tell how it relates the axes of its inputs and outputs. Register "
            "one with @vcyclefx.register_rule(<op>) (see vcyclefx/registry.py for an example)."
            + _no_functional_hint(node.target)
        )
    return rule


def has_rule(target) -> bool:
    """Whether ``target`` has a rule: its own, or one derived from its functional overload."""
    return _own_rule(target) is not None or _derived_rule(target) is not None


def graph_overloads(packet: torch._ops.OpOverloadPacket) -> list:
    """The overloads of ``packet`` that a captured graph can hold: those the dispatcher
    knows (TorchScript's builtins on Python lists and strings, such as ``aten::sum.int`` or
    ``aten::split.str``, are not dispatcher ops) and that take no named-tensor (``Dimname``)
    argument (torch.export does not trace named tensors). A rule is written for an op family:
    every overload listed here gets one (tests/test_op_families.py checks it)."""
    out = []
    for name in packet.overloads():
        op = getattr(packet, name)
        schema = op._schema
        try:
            torch._C._dispatch_find_schema_or_throw(schema.name, schema.overload_name)
        except RuntimeError:
            continue
        if not any("Dimname" in str(a.type) for a in schema.arguments):
            out.append(op)
    return out


def op_of(node: Node):
    """The op a rule analyses ``node`` as: the functional overload of an in-place or ``out=``
    overload without a rule of its own, else ``node.target``."""
    t = node.target
    if _own_rule(t) is not None:
        return t
    f = functional_of(t)
    return f if f is not None and _own_rule(f) is not None else t


def _derived_rule(target) -> Rule | None:
    if target not in _DERIVED:
        f = functional_of(target)
        base = _own_rule(f) if f is not None else None
        _DERIVED[target] = None if base is None else Rule(_tiewritten_args(base.analyze), base.rewrite)
    return _DERIVED[target]


def _tiewritten_args(analyze: RuleFn) -> RuleFn:
    """The functional op's rule, then the output is the argument written: the same axes where
    the shapes agree. (An in-place view op such as ``unsqueeze_`` gives its argument a new
    shape; export makes every later reader read the op's output, so its functional rule is
    the whole story.)"""

    def rule(ctx, node: Node) -> None:
        analyze(ctx, node)
        schema = node.target._schema
        returned = returned_args(schema)
        if not any(returned):  # returns nothing (or new values): each argument written is it
            returned = written_args(schema)
        written = [None if a is None else get_arg(node, a.name, None) for a in returned]
        out = ctx.out.get(node)
        outs = out if len(written) > 1 and isinstance(out, list) else [out]
        res = []
        for o, w in zip(outs, written):
            t = ctx.dims(w) if isinstance(w, Node) else None
            if isinstance(o, list) and isinstance(t, list) and [d.size for d in o] == [d.size for d in t]:
                ctx.unify_all(t, o, node)
                o = t
            res.append(o)
        ctx.set_out(node, res if len(written) > 1 else res[0])

    rule.__name__ = f"written_{getattr(analyze, '__name__', 'rule')}"
    return rule


def _no_functional_hint(target) -> str:
    if isinstance(target, torch._ops.OpOverload) and written_args(target._schema):
        f = functional_of(target)
        if f is None:
            return (" It writes into an argument and has no functional overload whose rule could "
                    "be reused.")
        return f" Its functional form {f} has no rule either."
    return ""


def _op_name(target) -> str:
    if isinstance(target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)):
        return str(target)
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)
