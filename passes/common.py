"""What every pass shares: the result type, graph copying, module rebuilding.

A pass has one shape: ``pass_(gm, plan) -> PassResult``; it never changes ``gm`` (the contract
and the check after every pass are in :mod:`passes.contract`). New modules
are built by :func:`rebuild` from a rewritten graph and a dictionary of new tensors, so the
result has the same module hierarchy, parameter names, tied aliases and non-persistent buffers
as the input, and owns copies of every tensor the pass did not replace.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterable

from torch.fx import Graph, GraphModule, Node

from vcyclefx.level import build_level, level_info


@dataclass
class PassResult:
    module: GraphModule
    mapping: Any  # the part of a vcyclefx.Mapping this pass produced
    # tensor name -> the shape the plan gives it, worked out apart from the tensors themselves
    # (Pass.ensures checks the module against it)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


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
