"""What every pass shares: the result type, graph copying, module rebuilding, checks.

A pass has one shape: ``pass_(gm, plan) -> PassResult``; it never changes ``gm``. New modules
are built by :func:`rebuild` from a rewritten graph and a dictionary of new tensors, so the
result has the same module hierarchy, parameter names, tied aliases and non-persistent buffers
as the input, and shares every tensor the pass did not replace.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node

log = logging.getLogger("vcyclefx.passes")


@dataclass
class PassResult:
    module: GraphModule
    mapping: Any  # the part of a vcyclefx.Mapping this pass produced


def copy_graph(graph: Graph) -> tuple[Graph, dict[Node, Node]]:
    """A copy of ``graph`` (same node names, metadata and code generator) and the node map."""
    new = Graph()
    new._codegen = copy.deepcopy(graph._codegen)
    node_map: dict[Node, Node] = {}
    result = new.graph_copy(graph, node_map, return_output_node=True)
    if result is not None:
        rv, out_node = result
        node_map[out_node] = new.output(rv, type_expr=getattr(out_node, "type", None))
    for old_node, new_node in node_map.items():
        new_node.meta = dict(old_node.meta)
    return new, node_map


def fetch_attr(module: nn.Module, target: str):
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _owner(module: nn.Module, target: str) -> tuple[nn.Module, str]:
    *path, leaf = target.split(".")
    owner = module
    for part in path:
        owner = getattr(owner, part)
    return owner, leaf


def nonpersistent_buffers(gm: nn.Module) -> set[str]:
    names = set()
    for mod_name, mod in gm.named_modules():
        for b in getattr(mod, "_non_persistent_buffers_set", ()):
            names.add(f"{mod_name}.{b}" if mod_name else b)
    return names


def rebuild(
    old: GraphModule,
    graph: Graph,
    new_attrs: dict[str, Any] | None = None,
    nonpersistent: Iterable[str] | None = None,
    buffers: Iterable[str] | None = None,
) -> GraphModule:
    """A GraphModule running ``graph`` whose attributes come from ``new_attrs`` where given and
    from ``old`` otherwise. Parameters stay parameters; tensors that were buffers in ``old`` (or
    are named in ``buffers``) are buffers; other tensors (lifted constants) stay plain
    attributes."""
    new_attrs = new_attrs or {}
    is_buffer = {n for n, _ in old.named_buffers(remove_duplicate=False)} | set(buffers or ())
    root = nn.Module()
    for node in graph.nodes:
        if node.op not in ("get_attr", "call_module"):
            continue
        target = node.target
        if target in new_attrs:
            obj = new_attrs[target]
        else:
            obj = fetch_attr(old, target)
        _assign(root, target, obj, buffer=target in is_buffer)
    gm = GraphModule(root, graph, class_name=type(old).__name__)
    gm.meta = dict(getattr(old, "meta", {}))
    for name, t in list(gm.named_buffers(remove_duplicate=False)):
        if name not in is_buffer:  # GraphModule makes every tensor a buffer; constants are not
            owner, leaf = _owner(gm, name)
            del owner._buffers[leaf]
            object.__setattr__(owner, leaf, t)
    nonpersistent = set(nonpersistent_buffers(old) if nonpersistent is None else nonpersistent)
    for name, _ in list(gm.named_buffers()):
        if name in nonpersistent:
            owner, leaf = _owner(gm, name)
            owner._non_persistent_buffers_set.add(leaf)
    return gm


def _assign(root: nn.Module, target: str, obj: Any, buffer: bool) -> None:
    *path, leaf = target.split(".")
    mod = root
    for part in path:
        if not hasattr(mod, part):
            mod.add_module(part, nn.Module())
        mod = getattr(mod, part)
    if isinstance(obj, torch.Tensor) and not isinstance(obj, nn.Parameter) and buffer:
        mod.register_buffer(leaf, obj)
    else:
        setattr(mod, leaf, obj)


def check_graph(gm: GraphModule, *, what: str) -> None:
    """Postcondition of every pass: the graph lints and every value node has ``meta['val']``."""
    gm.graph.lint()
    missing = [
        n.format_node() for n in gm.graph.nodes
        if n.op in ("call_function", "placeholder") and "val" not in n.meta and n.users
    ]
    if missing:
        raise AssertionError(f"{what}: nodes without meta['val']: {missing[:5]}")
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s produced:\n%s", what, gm.graph)
