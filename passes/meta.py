"""Recompute ``meta["val"]`` on every node after a rewrite.

The placeholders keep the fake values export gave them (symbolic batch and sequence sizes), so
re-running every op under the same FakeTensorMode gives each node its new shape with batch and
sequence still symbolic. Higher-order-op bodies are propagated too.
"""

from __future__ import annotations

import torch
from torch._guards import detect_fake_mode
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg


def _fetch(module, target: str):
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def recompute_meta(gm: GraphModule) -> None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode([n.meta.get("val") for n in placeholders])
    if mode is None:
        raise RuntimeError("placeholders carry no fake values; cannot recompute shapes")
    with mode:
        _propagate(gm, mode, [n.meta.get("val") for n in placeholders])


def _propagate(gm: GraphModule, mode, inputs: list):
    env: dict[Node, object] = {}
    it = iter(inputs)
    result = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = next(it)
            node.meta["val"] = env[node]
        elif node.op == "get_attr":
            obj = _fetch(gm, node.target)
            if isinstance(obj, torch.Tensor):
                fake = mode.from_tensor(obj, static_shapes=True)
                env[node] = fake
                node.meta["val"] = fake
            else:
                env[node] = obj
        elif node.op == "call_module":
            env[node] = None  # input guards: nothing to propagate
        elif node.op == "call_function":
            args = map_arg(node.args, lambda n: env[n])
            kwargs = map_arg(node.kwargs, lambda n: env[n])
            if isinstance(node.target, torch._ops.HigherOrderOperator):
                pos = next(i for i, a in enumerate(args) if isinstance(a, GraphModule))
                sub = args[pos]
                out = _propagate(sub, mode, list(args[pos + 1 :]))
                out = tuple(out) if isinstance(out, (list, tuple)) else out
            else:
                out = node.target(*args, **kwargs)
            env[node] = out
            if out is not None or "val" in node.meta:
                node.meta["val"] = out
        elif node.op == "output":
            result = map_arg(node.args[0], lambda n: env[n])
    return result
