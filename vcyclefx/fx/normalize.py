"""Normalisation of a freshly captured graph.

export shares symbolic-size arithmetic between unrelated uses (``mul(batch, 4)`` computed once
and used by the views of every attention layer). Each use is a different size once layers are
resized independently, so every such node gets its own copy per user.

A size that export read symbolically and then specialised to a constant (a Python loop over the
sequence length fixes it mid-trace: ``sym_size(x, 1)`` whose value is now the int 16) is a
literal like every later use of the same size: the node is replaced by its value, so repeated
blocks look alike whichever of them happened to read the size first. For the same reason a
slice over a whole axis (``x[:, :]``, emitted once the size is a constant) is its input, and a
slice's default start is written ``0``.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

_SIZE_OPS = {operator.mul, operator.add, operator.sub, operator.floordiv, operator.mod}


def _is_size_arith(n: Node) -> bool:
    return (n.op == "call_function" and n.target in _SIZE_OPS
            and isinstance(n.meta.get("val"), (torch.SymInt, int)))


def _static_value(n: Node) -> int | None:
    """The int a size node always has (export specialised it), else None."""
    if n.op != "call_function" or not (n.target in _SIZE_OPS or n.target is torch.ops.aten.sym_size.int):
        return None
    v = n.meta.get("val")
    if isinstance(v, torch.SymInt) and getattr(v.node.expr, "is_number", False):
        return int(v.node.expr)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def fold_static_sizes(gm: GraphModule) -> int:
    """Replace size nodes whose value export specialised to an int by that int (in place);
    returns the number of nodes folded."""
    folded = 0
    for node in list(gm.graph.nodes):
        value = _static_value(node)
        if value is None:
            continue
        for user in list(node.users):
            user.args = torch.fx.node.map_arg(user.args, lambda a: value if a is node else a)
            user.kwargs = torch.fx.node.map_arg(user.kwargs, lambda a: value if a is node else a)
        if not node.users:
            gm.graph.erase_node(node)
            folded += 1
    if folded:
        gm.graph.lint()
        gm.recompile()
    return folded


_INT_MAX = 2**62


def drop_whole_slices(gm: GraphModule) -> int:
    """``slice(x, dim, 0, end >= size)`` with step 1 is ``x``: replaced by it (in place); other
    slices get their default start written as ``0``. Returns the number of slices dropped."""
    aten = torch.ops.aten
    dropped = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.slice.Tensor:
            continue
        args = list(node.args) + [None] * (5 - len(node.args))
        x, dim, start, end, step = args[:5]
        dim = 0 if dim is None else dim
        step = node.kwargs.get("step", 1 if step is None else step)
        start = node.kwargs.get("start", start)
        end = node.kwargs.get("end", end)
        src, out = x.meta.get("val"), node.meta.get("val")
        whole = (start in (None, 0) and step == 1 and isinstance(src, torch.Tensor)
                 and isinstance(out, torch.Tensor) and src.shape == out.shape
                 and (end is None or (isinstance(end, int) and (end >= _INT_MAX or (isinstance(src.shape[dim], int)
                                                               and end == src.shape[dim])))))
        if whole:
            node.replace_all_uses_with(x)
            gm.graph.erase_node(node)
            dropped += 1
        elif start is None and "start" not in node.kwargs and len(node.args) >= 3:
            node.args = node.args[:2] + (0,) + node.args[3:]
    if dropped:
        gm.graph.lint()
        gm.recompile()
    return dropped


def unshare_size_arithmetic(gm: GraphModule) -> int:
    """Fold specialised sizes (:func:`fold_static_sizes`) and drop whole-axis slices
    (:func:`drop_whole_slices`), then give every user of a shared size-arithmetic node its own
    copy (in place); returns the number of copies made."""
    fold_static_sizes(gm)
    drop_whole_slices(gm)
    copies = 0
    # users before what they read: the copies of a node share its inputs, which then get a
    # copy each in turn, so no arithmetic stays shared however deep (a padded length's
    # `(s + (8 - s % 8) % 8) // 8` is four nodes, and two blocks sharing its inner ones would
    # own different node lists with one block and with two)
    for node in reversed(list(gm.graph.nodes)):
        if not _is_size_arith(node) or len(node.users) < 2:
            continue
        for user in list(node.users)[1:]:
            with gm.graph.inserting_before(user):
                dup = gm.graph.call_function(node.target, node.args, dict(node.kwargs))
            dup.meta = dict(node.meta)
            user.replace_input_with(node, dup)
            copies += 1
    if copies:
        gm.graph.lint()
        gm.recompile()
    return copies
