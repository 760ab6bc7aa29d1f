"""Which graph nodes each module owns, read from ``meta["nn_module_stack"]``.

A module path (``transformer.h.0``) owns the tensor ops recorded under it, in graph order; a
module run several times (one block applied in a loop, shared weights) can instead be seen as
its applications ``<path>@<k>``, each owning the nodes of one run. Chains are found among the
children of one container, and the depth pass rebuilds blocks from what they own.
"""

from __future__ import annotations

import re

import torch
from torch.fx import GraphModule, Node

_CALL_INDEX = re.compile(r"@(\d+)$")


def application_name(path: str, k: int) -> str:
    """The name of the ``k``-th application of the module at ``path`` (``k`` from 0)."""
    return f"{path}@{k}"


def is_application(block: str) -> bool:
    return "@" in block


def module_path(block: str) -> str:
    """The module path of a block (of an application: the module it applies)."""
    return block.split("@", 1)[0]


def _stack_paths(node: Node, applications: bool = False) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for key, v in stack.items():
        if not (isinstance(v, tuple) and v[0]):
            continue
        if applications:
            m = _CALL_INDEX.search(str(key))
            out.append(application_name(v[0], int(m.group(1)) if m else 0))
        else:
            out.append(v[0])
    return out


def _container(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _is_size_value(n: Node) -> bool:
    v = n.meta.get("val")
    return isinstance(v, (torch.SymInt, int)) and not isinstance(v, bool)


def ownership(gm: GraphModule, applications: bool = False
              ) -> tuple[dict[str, list[Node]], dict[str, list[str]]]:
    """Nodes each module path owns (in graph order) and each container's children in the
    order they run. Tensor ops are owned through ``nn_module_stack``; symbolic-size arithmetic
    (which export shares and the normaliser copies per use) is owned by a module when all of its
    users are. With ``applications`` the owners are the calls of each module
    (``<path>@<k>``), so a module run several times owns one node list per run."""
    owner_nodes: dict[str, list[Node]] = {}
    children: dict[str, list[str]] = {}
    owners_of: dict[Node, set[str]] = {}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for n in gm.graph.nodes:
        if n.op != "call_function" or _is_size_value(n):
            continue
        paths = _stack_paths(n, applications)
        owners_of[n] = set(paths)
        for p in paths:
            owner_nodes.setdefault(p, []).append(n)
            kids = children.setdefault(_container(p), [])
            if p not in kids:
                kids.append(p)
    for n in reversed(list(gm.graph.nodes)):
        if n.op != "call_function" or not _is_size_value(n) or not n.users:
            continue
        if n.target is torch.ops.aten.sym_size.int and n.args[0] not in owners_of:
            continue  # the size of a value from outside: shared by every block reading it
        common = None
        for u in n.users:
            o = owners_of.get(u, set())
            common = set(o) if common is None else common & o
        if common:
            owners_of[n] = common
            for p in common:
                owner_nodes.setdefault(p, []).append(n)
    for p in owner_nodes:
        owner_nodes[p] = _in_block_order(owner_nodes[p], order)
    return owner_nodes, children


def _in_block_order(nodes: list[Node], order: dict[Node, int]) -> list[Node]:
    """A block's nodes: its tensor ops in graph order, each preceded by the size arithmetic it
    reads that is not listed yet (depth first, in argument order). Export computes a size once
    where it is first needed and the normaliser copies it just before each later user, so the
    same computation sits at different places in different blocks; this order is the same in
    every block whatever the placement."""
    mine = set(nodes)
    out: list[Node] = []
    seen: set[Node] = set()

    def emit_sizes(n: Node) -> None:
        for a in n.all_input_nodes:
            if a in mine and a not in seen and _is_size_value(a):
                seen.add(a)
                emit_sizes(a)
                out.append(a)

    for n in sorted(nodes, key=order.__getitem__):
        if _is_size_value(n):
            continue
        emit_sizes(n)
        seen.add(n)
        out.append(n)
    out += sorted((n for n in nodes if n not in seen), key=order.__getitem__)
    return out


def relname(target: str, block: str) -> str | None:
    """``target``'s name relative to the module of ``block`` (None when it is not inside)."""
    block = module_path(block)
    return target[len(block) + 1 :] if target.startswith(block + ".") else None
