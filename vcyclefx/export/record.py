"""Transforms on the meta device, replayed one output tensor at a time.

A level whose weights are meta tensors (captured from a model built on the meta device) goes
through the very same ``vf.coalesce`` / ``vf.decoalesce`` as a loaded one: the passes plan,
rewrite the graph and "map" meta tensors, which costs nothing. :class:`Recorder`, a
``TorchDispatchMode`` around that call, writes down every ATen op that touches a meta tensor,
with its arguments (a checkpoint tensor by name, another op's output, or a constant such as an
index tensor). Each weight of the result is then the output of a small DAG of recorded ops over
a few checkpoint tensors (a width map reads one tensor, a depth group the tensors of the blocks
it averages): :meth:`Recorder.value` replays that DAG alone on real tensors read from the
checkpoint, in the order it was recorded, so each output tensor is computed by exactly the ops
that would have computed it in memory (bit-identical results) and nothing else is held.

In-place ops are replayed in place; a read of a tensor depends on every earlier in-place write
to its memory (through it or a view of it), so a replay never sees a value before or after its
time.
"""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from vcyclefx.errors import CheckpointError
from vcyclefx.fx.args import written_args


class _Ref:
    """A recorded tensor argument: ``("leaf", name)``, ``("out", op, position)``."""

    __slots__ = ("kind", "a", "b")

    def __init__(self, kind: str, a, b=None):
        self.kind, self.a, self.b = kind, a, b


_CPU = torch.device("cpu")


def _key(t: torch.Tensor) -> tuple:
    """A meta tensor's identity: its storage, offset, shape, strides and dtype. Tensors with
    equal keys are one value (a tensor and its ``detach()``, or the ``nn.Parameter`` made of it,
    which is a new tensor object over the same storage)."""
    return (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), tuple(t.stride()),
            t.dtype)


def _is_meta(x) -> bool:
    # fake tensors (the passes' shape checks) report the device they stand for, never "meta"
    return isinstance(x, torch.Tensor) and x.is_meta and not hasattr(x, "fake_mode")


class Recorder(TorchDispatchMode):
    """Records the ops on meta tensors (see the module docstring). ``leaves``: the input level's
    meta tensors -> the checkpoint name each is read from."""

    def __init__(self, leaves: dict[torch.Tensor, str]):
        super().__init__()
        self.leaves = {_key(t): name for t, name in leaves.items()}
        self.keep = list(leaves)  # a recorded tensor's identity must not be reused
        self.ops: list[tuple] = []  # (func, args, kwargs, deps)
        self.made: dict[int, tuple[int, int]] = {}  # tensor -> (op, position of its output)
        self.writes: dict[int, list[int]] = {}  # storage -> the in-place ops that wrote it

    def _ref(self, x, deps: set):
        if isinstance(x, torch.device) and x.type == "meta":
            return _CPU
        if not _is_meta(x):
            return x  # a constant (an index tensor, a size), replayed as it is
        key = _key(x)
        deps.update(self.writes.get(key[0], ()))  # the writes to its memory (views included)
        if key in self.made:
            op, pos = self.made[key]
            deps.add(op)
            return _Ref("out", op, pos)
        if key in self.leaves:
            return _Ref("leaf", self.leaves[key])
        raise CheckpointError(f"{torch.Size(x.shape)} {x.dtype} meta tensor read by a transform "
                              "is neither a checkpoint tensor nor made from one (a bug in vcyclefx)")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat_in = pytree.tree_leaves((args, kwargs))
        flat_out = pytree.tree_leaves(out)
        if not any(_is_meta(x) for x in flat_in) and not any(_is_meta(x) for x in flat_out):
            return out
        deps: set[int] = set()
        rargs, rkwargs = pytree.tree_map(lambda x: self._ref(x, deps), (args, kwargs))
        index = len(self.ops)
        self.ops.append((func, rargs, rkwargs, frozenset(deps)))
        schema = getattr(func, "_schema", None)
        for a in written_args(schema) if schema is not None else []:
            t = kwargs.get(a.name, None)
            if t is None:
                pos = [x.name for x in schema.arguments].index(a.name)
                t = args[pos] if pos < len(args) else None
            if _is_meta(t):
                self.writes.setdefault(_key(t)[0], []).append(index)
        for pos, o in enumerate(flat_out):
            if not _is_meta(o):
                continue
            self.keep.append(o)
            if any(o is x for x in flat_in):
                continue  # an in-place op returns its argument: recorded as a write above
            self.made[_key(o)] = (index, pos)
        return out

    # -- replay ---------------------------------------------------------------------------------
    def source(self, t: torch.Tensor) -> _Ref:
        """How the output tensor ``t`` (a meta tensor of the transformed level) is made."""
        key = _key(t)
        if key in self.made:
            return _Ref("out", *self.made[key])
        if key in self.leaves:
            return _Ref("leaf", self.leaves[key])
        raise CheckpointError(f"tensor of shape {list(t.shape)} of the result was not made by the "
                              "recorded transform (a bug in vcyclefx)")

    def _closure(self, t: torch.Tensor) -> list[int]:
        """The recorded ops that make output ``t``'s final value: the one that made it, every
        in-place write to its memory, and what they read, in recorded order."""
        ref = self.source(t)
        stack = ([ref.a] if ref.kind == "out" else []) + list(self.writes.get(_key(t)[0], ()))
        need = set()
        while stack:
            i = stack.pop()
            if i in need:
                continue
            need.add(i)
            stack.extend(self.ops[i][3])
        return sorted(need)

    def leaves_of(self, t: torch.Tensor) -> list[str]:
        """The checkpoint tensors that output ``t`` is made from."""
        ref = self.source(t)
        names = [ref.a] if ref.kind == "leaf" else []
        for i in self._closure(t):
            for x in pytree.tree_leaves(self.ops[i][1:3]):
                if isinstance(x, _Ref) and x.kind == "leaf" and x.a not in names:
                    names.append(x.a)
        return names

    def value(self, t: torch.Tensor, load) -> torch.Tensor:
        """The real value of output ``t``: its ops replayed on the checkpoint tensors
        ``load(names) -> {name: tensor}`` gives."""
        ref = self.source(t)
        leaves = load(self.leaves_of(t))
        env: dict[tuple[int, int], torch.Tensor] = {}

        def real(x):
            if not isinstance(x, _Ref):
                return x
            return leaves[x.a] if x.kind == "leaf" else env[(x.a, x.b)]

        for i in self._closure(t):
            func, args, kwargs, _ = self.ops[i]
            out = func(*pytree.tree_map(real, args), **pytree.tree_map(real, kwargs))
            for pos, o in enumerate(pytree.tree_leaves(out)):
                env[(i, pos)] = o
        return leaves[ref.a] if ref.kind == "leaf" else env[(ref.a, ref.b)]
