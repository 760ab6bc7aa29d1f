"""``meta["val"]`` after a rewrite: written from the analysis, checked by re-execution.

The placeholders keep the fake values export gave them (symbolic batch and sequence sizes), so
re-running every op under the same FakeTensorMode (:func:`fake_run`) gives each node its new
shape with batch and sequence still symbolic; higher-order-op bodies included. That costs
seconds on a 124M model, so the width pass writes the new shapes from the analysis instead
(:class:`ShapeUpdater`) and the check after every pass (passes/contract.py) re-runs the ops in
tests to confirm them.
"""

from __future__ import annotations

import torch
from torch._guards import detect_fake_mode
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from vcyclefx.level import fetch_attr


def placeholder_mode(gm: GraphModule):
    """The FakeTensorMode of ``gm``'s placeholder values (None when they carry none)."""
    return detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"])


def fake_run(gm: GraphModule, mode, inputs: list, visit, run_op=None):
    """Interpret ``gm``'s graph on the fake ``inputs`` (under ``mode``), higher-order-op bodies
    included; ``visit(node, value)`` sees the value of every placeholder, tensor attribute and
    call. ``run_op(node, args, kwargs)`` runs one op (default: ``node.target(*args, **kwargs)``).
    Returns the graph's output value."""
    env: dict[Node, object] = {}
    it = iter(inputs)
    result = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = next(it)
            visit(node, env[node])
        elif node.op == "get_attr":
            obj = fetch_attr(gm, node.target)
            if isinstance(obj, torch.Tensor):
                env[node] = mode.from_tensor(obj, static_shapes=True)
                visit(node, env[node])
            else:
                env[node] = obj
        elif node.op == "call_module":
            env[node] = None  # input guards: nothing to propagate
        elif node.op == "call_function":
            args = map_arg(node.args, lambda n: env[n])
            kwargs = map_arg(node.kwargs, lambda n: env[n])
            if isinstance(node.target, torch._ops.HigherOrderOperator):
                pos = next(i for i, a in enumerate(args) if isinstance(a, GraphModule))
                out = fake_run(args[pos], mode, list(args[pos + 1 :]), visit, run_op)
                out = tuple(out) if isinstance(out, (list, tuple)) else out
            elif run_op is not None:
                out = run_op(node, args, kwargs)
            else:
                out = node.target(*args, **kwargs)
            env[node] = out
            visit(node, out)
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
        self.mode = placeholder_mode(gm)
        self.symbols: dict = {}
        for n in gm.graph.find_nodes(op="placeholder"):
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
        sym = self._symint(new)
        if _hint(sym) is not None and _hint(sym) == _hint(old):
            # the same size at the example inputs: the axis was not resized (resizing changes its
            # static factors), only spelled another way by the analysis (a sequence unified
            # with its length padded to whole chunks): keep the capture's own value
            return old
        return sym

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


def _hint(size) -> int | None:
    """The value of ``size`` at the example inputs' sizes."""
    if isinstance(size, torch.SymInt):
        return size.node.hint
    return size if isinstance(size, int) else None
