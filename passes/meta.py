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


# ---------------------------------------------------------------------------------------------
# fast path used by the width pass: new shapes from the analysis, no op re-execution
# ---------------------------------------------------------------------------------------------
class ShapeUpdater:
    """Gives rewritten nodes new fake values whose shapes are the analysis' new sizes.

    Sizes of unchanged axes keep their SymInt (batch, sequence); a symbolic axis that contains a
    resized space (``batch * heads``) gets a SymInt built from the placeholders' symbols. Fake
    tensors are made contiguous and cached by (shape, dtype, device): the width pass needs
    shapes, not strides, and re-running every op under the fake mode costs seconds on a 124M
    model.
    """

    def __init__(self, gm: GraphModule, new_size, dims_of):
        self.new_size = new_size  # Dim -> int | sympy expr
        self.dims_of = dims_of  # old node -> dims (list / list of lists / Dim)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.mode = detect_fake_mode([n.meta.get("val") for n in placeholders])
        self.symbols: dict = {}
        for n in placeholders:
            v = n.meta.get("val")
            if isinstance(v, torch.Tensor):
                for s in v.shape:
                    if isinstance(s, torch.SymInt) and s.node.expr.is_Symbol:
                        self.symbols[s.node.expr] = s
        self._cache: dict = {}

    def _size(self, old, d):
        if d is None:
            return old
        new = self.new_size(d)
        if isinstance(new, int):
            return new
        if isinstance(old, torch.SymInt) and old.node.expr == new:
            return old
        return self._symint(new)

    def _symint(self, expr):
        import sympy

        if expr.is_Integer:
            return int(expr)
        if expr in self.symbols:
            return self.symbols[expr]
        if isinstance(expr, sympy.Mul):
            out = 1
            for a in expr.args:
                out = out * self._symint(a)
            return out
        if isinstance(expr, sympy.Add):
            out = 0
            for a in expr.args:
                out = out + self._symint(a)
            return out
        from torch.utils._sympy.functions import FloorDiv, Mod, PythonMod

        if isinstance(expr, FloorDiv):  # a sequence padded to whole chunks: (T + pad) // chunk
            return self._symint(expr.args[0]) // self._symint(expr.args[1])
        if isinstance(expr, (Mod, PythonMod, sympy.Mod)):
            return self._symint(expr.args[0]) % self._symint(expr.args[1])
        if isinstance(expr, sympy.Pow) and expr.exp.is_Integer and expr.exp > 0:
            return self._symint(expr.base) ** int(expr.exp)
        raise ValueError(f"cannot build a size for {expr}")

    def _fake(self, like: torch.Tensor, shape: tuple):
        key = (tuple(str(s) for s in shape), like.dtype, str(like.device))
        if key not in self._cache:
            with self.mode:
                self._cache[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return self._cache[key]

    def value(self, old_val, dims):
        if isinstance(old_val, torch.Tensor):
            if not isinstance(dims, list) or len(dims) != old_val.dim():
                return old_val
            shape = tuple(self._size(s, d) for s, d in zip(old_val.shape, dims))
            if all(a is b or (isinstance(a, int) and a == b) for a, b in zip(shape, old_val.shape)):
                return old_val
            return self._fake(old_val, shape)
        if isinstance(old_val, (list, tuple)) and isinstance(dims, list) and len(dims) == len(old_val):
            return type(old_val)(self.value(v, d) for v, d in zip(old_val, dims))
        if isinstance(old_val, torch.SymInt) and dims is not None and not isinstance(dims, list):
            return self._size(old_val, dims)
        if isinstance(old_val, int) and not isinstance(old_val, bool) and dims is not None \
                and not isinstance(dims, list):
            new = self.new_size(dims)
            return new if isinstance(new, int) else old_val
        return old_val

    def update(self, node_map: dict) -> None:
        """Set ``meta["val"]`` of every new node from its old node's value and dims."""
        for old, new in node_map.items():
            if "val" in old.meta:
                new.meta["val"] = self.value(old.meta["val"], self.dims_of(old))
