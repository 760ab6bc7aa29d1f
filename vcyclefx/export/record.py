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

    def key(self) -> tuple:
        """The value it names: ``("leaf", name)`` or ``(op, position)``."""
        return ("leaf", self.a) if self.kind == "leaf" else (self.a, self.b)


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
        self.shapes: dict = {("leaf", name): tuple(t.shape) for t, name in leaves.items()}
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
        flat, spec = pytree.tree_flatten((args, kwargs))
        flat = [self._ref(x, deps) for x in flat]
        index = len(self.ops)
        # flattened once here: the replay fills the references in and unflattens, per op
        self.ops.append((func, flat, spec, frozenset(deps),
                         tuple(i for i, x in enumerate(flat) if isinstance(x, _Ref))))
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
            self.shapes[(index, pos)] = tuple(o.shape)
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
            flat, refs = self.ops[i][1], self.ops[i][4]
            for x in (flat[j] for j in refs):
                if x.kind == "leaf" and x.a not in names:
                    names.append(x.a)
        return names

    def value(self, t: torch.Tensor, load) -> torch.Tensor:
        """The real value of output ``t``: its ops replayed on the checkpoint tensors
        ``load(names) -> {name: tensor}`` gives. Each checkpoint tensor is read when the first op
        that uses it runs, and each intermediate (and each checkpoint tensor) is dropped after
        its last read, so a group holds only what its running ops read: a depth group of two
        blocks holds one block's tensor at a time, not both. A final ``clone`` of an
        intermediate that owns its memory is skipped (the same values, one copy less of the
        largest tensors, the embeddings)."""
        ref = self.source(t)
        order = self._closure(t)
        last: dict = {}  # ("leaf", name) or (op, position) -> the last op that reads it
        for i in order:
            flat, refs = self.ops[i][1], self.ops[i][4]
            for j in refs:
                x = flat[j]
                last[x.key()] = i
        result = ref.key()
        last.pop(result, None)  # the result is kept
        env: dict = {}
        if ref.kind == "leaf":
            env[result] = load([ref.a])[ref.a]
        for i in order:
            func, flat, spec, _, refs = self.ops[i]
            flat = list(flat)
            for j in refs:
                x = flat[j]
                key = x.key()
                if x.kind == "leaf" and key not in env:  # a checkpoint tensor's first read
                    env[key] = load([x.a])[x.a]
                flat[j] = env[key]
            if func is _CLONE and (i, 0) == result and refs == (0,) and len(flat) == 1 and \
                    self._dies_here(self.ops[i][1][0], i, last) and _owns_memory(flat[0]):
                out = flat[0]
            else:
                args, kwargs = pytree.tree_unflatten(flat, spec)
                out = func(*args, **kwargs)
            del flat
            for j in refs:
                x = self.ops[i][1][j]
                key = x.key()
                if last.get(key) == i:
                    env.pop(key, None)
            for pos, o in enumerate(pytree.tree_leaves(out)):
                if (i, pos) in last or (i, pos) == result:
                    env[(i, pos)] = o
            del out
        return env[result]

    def tiling(self, t: torch.Tensor) -> dict | None:
        """How output ``t`` is made a block of its rows at a time, or None where it cannot be.

        It can where every op of its DAG computes row ``i`` of its output from one row of each
        tensor it reads: elementwise ops (``_TILE_OPS``) and ``cat`` / ``slice`` along a dimension
        other than the first read row ``i``; a ``slice`` along the first dimension (step 1) reads
        row ``start + i``, as the width map that pairs the rows of a matrix (its two halves)
        does; an in-place op writes the rows it reads (its target made by an op that allocates).
        Returns {op: the row offsets at which it runs}: for a block of rows ``b:e`` of ``t``, op
        ``i`` runs once per offset ``o``, on rows ``b + o:e + o`` of its output's rows (of its
        target's, for an in-place op). Elementwise ops compute each element alone, so a block's
        values are the whole replay's, bit for bit."""
        ref = self.source(t)
        if ref.kind == "leaf" or t.dim() == 0:
            return None
        order = self._closure(t)
        need: dict = {(ref.a, ref.b): {0}}  # value -> the offsets its readers read it at
        ran: dict = {}
        for i in reversed(order):
            func, flat, spec, _, refs = self.ops[i]
            rule = _TILE_OPS.get(func)
            if rule is None or any(isinstance(x, torch.Tensor) and x.dim() > 0 for x in flat):
                return None  # an op that mixes rows, or a constant tensor (an index)
            args, kwargs = pytree.tree_unflatten(list(flat), spec)
            if func in _IN_PLACE:
                target = flat[0]
                if not isinstance(target, _Ref) or target.kind != "out" or \
                        self.ops[target.a][0] not in _ALLOCATES:
                    return None  # a write through a view, or to a checkpoint tensor
                offsets = need.get((target.a, target.b), set())
                rows = self.shapes[(target.a, target.b)]
            else:
                offsets = set()
                for pos in range(_outputs(self, i)):
                    offsets |= need.get((i, pos), set())
                rows = self.shapes.get((i, 0))
            if not offsets:
                continue  # written only for rows no block reads
            ran[i] = set(offsets)
            if rows is None or len(rows) == 0:
                return None
            shift = self._shift(i)
            if shift is None:
                return None  # a slice of the rows with a step, or from a negative start
            if not (func is _SLICE and _dim_of(args, kwargs) == 0) and rule is not True and \
                    not rule(args, kwargs):
                return None
            for j in refs:
                x = flat[j]
                key = x.key()
                shape = self._shape_of(x)
                if func is not _SLICE and (len(shape) != len(rows) or shape[0] != rows[0]):
                    return None  # broadcast along the rows, or rows of another length
                need.setdefault(key, set()).update(o + shift for o in offsets)
        return ran

    def _shape_of(self, x: _Ref) -> tuple:
        return self.shapes[x.key()]

    def _shift(self, i: int) -> int | None:
        """The rows op ``i`` of a tiled replay reads its input at, relative to its output's:
        a slice's start along the first dimension, else 0 (None: a slice that cannot)."""
        func, flat, spec = self.ops[i][:3]
        if func is not _SLICE:
            return 0
        args, kwargs = pytree.tree_unflatten(list(flat), spec)
        if _dim_of(args, kwargs) != 0:
            return 0
        start, step = _slice_start(args, kwargs, self._shape_of(flat[0])[0])
        return start if step == 1 else None

    def leaf_offsets(self, ran: dict) -> dict[str, set]:
        """{checkpoint tensor: the row offsets a tiled replay (:meth:`tiling`) reads it at}."""
        out: dict[str, set] = {}
        for i, offsets in ran.items():
            flat, refs, shift = self.ops[i][1], self.ops[i][4], self._shift(i)
            for x in (flat[j] for j in refs):
                if x.kind == "leaf":
                    out.setdefault(x.a, set()).update(o + shift for o in offsets)
        return out

    def tiles_of(self, t: torch.Tensor, ran: dict, read_rows, step: int):
        """Output ``t`` (:meth:`tiling` gave ``ran``) made and yielded ``step`` rows at a time:
        ``read_rows(name, begin, end)`` gives those rows of checkpoint tensor ``name``. A block
        holds its own rows of each value its DAG reads (once per offset), never a whole input
        or the whole output."""
        ref = self.source(t)
        result = ((ref.a, ref.b), 0)
        plan, last = [], {}  # per op: (op, offset, [(flat position, key, offset)]); last reads
        for i in sorted(ran):
            func, flat, spec, _, refs = self.ops[i]
            args, kwargs = pytree.tree_unflatten(list(flat), spec)
            rows_only = func is _SLICE and _dim_of(args, kwargs) == 0
            shift = self._shift(i)
            for o in sorted(ran[i]):
                reads = []
                for j in refs:
                    x = flat[j]
                    key = x.key()
                    reads.append((j, key, o + shift))
                    last[key, o + shift] = len(plan)
                plan.append((i, o, reads, rows_only))
        n = t.shape[0]
        for begin in range(0, n, step):
            end = min(n, begin + step)
            env: dict = {}
            for k, (i, o, reads, rows_only) in enumerate(plan):
                func, flat, spec, _, _ = self.ops[i]
                flat = list(flat)
                for j, key, oo in reads:
                    if key[0] == "leaf" and (key, oo) not in env:  # read when first used
                        env[key, oo] = read_rows(key[1], begin + oo, end + oo)
                    flat[j] = env[key, oo]
                if rows_only:  # the window read is already these rows
                    out = flat[0]
                else:
                    args, kwargs = pytree.tree_unflatten(flat, spec)
                    out = func(*args, **kwargs)
                del flat
                for _, key, oo in reads:
                    if last.get((key, oo)) == k and (key, oo) != result:
                        env.pop((key, oo), None)
                if func not in _IN_PLACE:
                    for pos, value in enumerate(pytree.tree_leaves(out)):
                        if ((i, pos), o) in last or ((i, pos), o) == result:
                            env[(i, pos), o] = value
                del out
            part = env.pop(result)
            if tuple(part.shape) != (end - begin, *t.shape[1:]):
                raise CheckpointError(f"rows {begin}:{end} of a {list(t.shape)} tensor replayed "
                                      f"as {list(part.shape)} (a bug in vcyclefx)")
            yield part

    @staticmethod
    def _dies_here(x: _Ref, i: int, last: dict) -> bool:
        """``x`` is an intermediate (not a checkpoint tensor, which may be a read-only mapping)
        that no op after ``i`` reads."""
        return x.kind == "out" and last.get((x.a, x.b)) == i


_CLONE = torch.ops.aten.clone.default


def _dim_not_first(pos: int, default: int = 0):
    """An op whose dimension argument (at ``pos``, or ``dim=``) is a positive one other than
    the first (a negative one is refused: the rank is not known here)."""
    def rule(args, kwargs) -> bool:
        dim = kwargs.get("dim", args[pos] if len(args) > pos else default)
        return isinstance(dim, int) and dim > 0
    return rule


def _tile_table() -> dict:
    aten = torch.ops.aten
    table = {op: True for op in (
        aten.detach.default, aten.alias.default, aten.clone.default, aten._to_copy.default,
        aten.lerp.Scalar, aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor,
        aten.neg.default, aten.add_.Tensor, aten.sub_.Tensor, aten.mul_.Tensor, aten.div_.Tensor,
        aten.copy_.default, aten.zeros_like.default)}
    table[aten.slice.Tensor] = _dim_not_first(1)  # along the first: see Recorder.tiling
    table[aten.cat.default] = _dim_not_first(1)
    return table


_TILE_OPS = _tile_table()
_SLICE = torch.ops.aten.slice.Tensor
_IN_PLACE = {torch.ops.aten.add_.Tensor, torch.ops.aten.sub_.Tensor, torch.ops.aten.mul_.Tensor,
             torch.ops.aten.div_.Tensor, torch.ops.aten.copy_.default}
# ops whose output is new memory (not a view): an in-place op's target in a tiled replay
_ALLOCATES = {torch.ops.aten.clone.default, torch.ops.aten._to_copy.default,
              torch.ops.aten.lerp.Scalar, torch.ops.aten.add.Tensor, torch.ops.aten.sub.Tensor,
              torch.ops.aten.mul.Tensor, torch.ops.aten.div.Tensor, torch.ops.aten.neg.default,
              torch.ops.aten.cat.default, torch.ops.aten.zeros_like.default}


def _dim_of(args, kwargs) -> int | None:
    return kwargs.get("dim", args[1] if len(args) > 1 else 0)


def _slice_start(args, kwargs, size: int) -> tuple[int | None, int]:
    """(start, step) of an ``aten.slice`` along the first dimension of a tensor of ``size``
    rows; start None where it is negative or not an int."""
    start = kwargs.get("start", args[2] if len(args) > 2 else 0)
    step = kwargs.get("step", args[4] if len(args) > 4 else 1)
    start = 0 if start is None else start
    if not isinstance(start, int) or start < 0 or start > size:
        return None, step
    return start, step


def _outputs(recorder, i: int) -> int:
    """How many outputs op ``i`` made (recorded positions)."""
    n = 0
    while (i, n) in recorder.shapes:
        n += 1
    return max(n, 1)


def _owns_memory(x) -> bool:
    """A contiguous tensor that is all of its storage (a replayed intermediate, not a view of a
    larger one): its clone would copy the same bytes."""
    return isinstance(x, torch.Tensor) and x.is_contiguous() and \
        x.untyped_storage().nbytes() == x.numel() * x.element_size() and x.storage_offset() == 0
