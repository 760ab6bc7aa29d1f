"""Normalisation of a freshly captured graph.

export shares symbolic-size arithmetic between unrelated uses (``mul(batch, 4)`` computed once
and used by the views of every attention layer). Each use is a different size once layers are
resized independently, so every such node gets its own copy per user.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

_SIZE_OPS = {operator.mul, operator.add, operator.sub, operator.floordiv, operator.mod}


def _is_size_arith(n: Node) -> bool:
    return (n.op == "call_function" and n.target in _SIZE_OPS
            and isinstance(n.meta.get("val"), (torch.SymInt, int)))


def unshare_size_arithmetic(gm: GraphModule) -> int:
    """Give every user of a shared size-arithmetic node its own copy (in place); returns the
    number of copies made."""
    copies = 0
    for node in list(gm.graph.nodes):
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
