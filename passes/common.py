"""What every pass shares: the result type, graph copying, module rebuilding, checks.

A pass has one shape: ``pass_(gm, plan) -> PassResult``; it never changes ``gm``. New modules
are built by :func:`rebuild` from a rewritten graph and a dictionary of new tensors, so the
result has the same module hierarchy, parameter names, tied aliases and non-persistent buffers
as the input, and owns copies of every tensor the pass did not replace.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Iterable

from torch.fx import Graph, GraphModule, Node

from vcyclefx.errors import PassCheckError
from vcyclefx.level import build_level, level_info, shared_tensors
from vcyclefx.level import fetch_attr, nonpersistent_buffers  # noqa: F401 - the passes' names

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


def rebuild(
    old: GraphModule,
    graph: Graph,
    new_attrs: dict[str, Any] | None = None,
    nonpersistent: Iterable[str] | None = None,
    buffers: Iterable[str] | None = None,
) -> GraphModule:
    """The pass's new Level: ``graph`` with the tensors in ``new_attrs`` and copies of every
    other tensor of ``old`` (a pass's output never shares storage with its input)."""
    return build_level(old, graph, level_info(old), new_attrs=new_attrs,
                       nonpersistent=nonpersistent, buffers=buffers, training=old.training)


def check_graph(gm: GraphModule, *, what: str, source: GraphModule | None = None) -> None:
    """Postcondition of every pass: the graph lints, every value node has ``meta['val']``, and
    no tensor of the result shares storage with the pass's input ``source``."""
    gm.graph.lint()
    missing = [
        n.format_node() for n in gm.graph.nodes
        if n.op in ("call_function", "placeholder") and "val" not in n.meta and n.users
    ]
    if missing:
        raise PassCheckError(f"{what}: nodes without meta['val']: {missing[:5]}")
    if source is not None:
        shared = shared_tensors(gm, source)
        if shared:
            raise PassCheckError(f"{what}: the result shares tensor {shared[0]} with its input "
                                 f"({len(shared)} shared); a pass must copy what it keeps")
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s produced:\n%s", what, gm.graph)
