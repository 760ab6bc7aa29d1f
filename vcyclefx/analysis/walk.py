"""The walk of the analysis: every node of a graph through its op's rule, in graph order.

Its own module so that rules for higher-order ops (``rules.misc``: a body subgraph analysed with
its inputs bound) and ``analysis`` both import it, and imports run one way (rules -> walk).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule, Node

from vcyclefx.analysis.context import Context
from vcyclefx.analysis.dims import Dim, DimConflict
from vcyclefx.errors import AnalysisError, brief, dump_note
from vcyclefx.level import fetch_attr
from vcyclefx.analysis.registry import rule_for


def walk(ctx: Context, gm: GraphModule, bind: dict[Node, Any] | None = None) -> None:
    """Run every node's rule; ``bind`` gives placeholder dims when walking a subgraph."""
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if bind is not None:
                ctx.out[node], prov = bind[node]
                if prov is not None:
                    ctx.prov[node] = prov
            else:
                dims = ctx.out_fresh(node)
                for i, d in enumerate(dims if isinstance(dims, list) else []):
                    ctx.pin(d, f"model input '{node.name}' dim {i}")
        elif node.op == "get_attr":
            obj = fetch_attr(gm, node.target)
            if isinstance(obj, torch.Tensor):
                dims = ctx.fresh_like(obj) if "val" not in node.meta else ctx.fresh(node)
                ctx.out[node] = dims
                name = node.target if gm is ctx.gm else None
                if name is not None:
                    ctx.prov[node] = {i: {(name, i)} for i in range(obj.dim())}
            else:
                ctx.out[node] = None
        elif node.op == "call_module":
            if node.target == "_guards_fn" or node.target.endswith("_guards_fn"):
                ctx.out[node] = None
                continue
            raise AnalysisError(
                f"{node.format_node()}: call_module nodes are not supported in captured graphs"
            )
        elif node.op == "call_function":
            rule = rule_for(node)
            try:
                rule.analyze(ctx, node)
            except (AnalysisError, DimConflict):
                raise
            except Exception as e:  # noqa: BLE001 - a rule bug is reported with its node
                raise AnalysisError(f"{node.format_node()}: rule failed: {brief(e)} "
                                    f"{dump_note(f'rule for {node.name}', e)}") from e
            if node not in ctx.out:
                ctx.out[node] = None
            ctx._finish_node(node)
        elif node.op == "output":
            if bind is None:
                for k, leaf in enumerate(_flat_nodes(node.args[0])):
                    dims = ctx.out.get(leaf)
                    if isinstance(dims, list):
                        for i, d in enumerate(dims):
                            if isinstance(d, Dim):
                                ctx.pin(d, f"model output {k} dim {i}")
            else:
                ctx.out[node] = [ctx.out.get(a) for a in _flat_nodes(node.args[0])]


def _flat_nodes(x) -> list:
    out: list = []
    torch.fx.node.map_arg(x, lambda n: out.append(n))
    return out
