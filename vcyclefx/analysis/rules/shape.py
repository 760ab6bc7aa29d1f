"""Layout ops: views, reshapes, permutations, expansion, concatenation, splitting, slicing."""

from __future__ import annotations

from torch.fx import Node

from vcyclefx.analysis.dims import CAT, PROD, Dim, is_static
from vcyclefx.fx.args import Edit, replace_args, retarget
from vcyclefx.analysis.registry import op_of, register_rule
from vcyclefx.analysis.rules._util import aten, family, norm_dim, shape_entries_rewrite

_INT_MAX = 2**62


# -- reshape family -----------------------------------------------------------------------------
def _shape_arg(node) -> str:
    return "shape" if op_of(node) is aten.reshape.default else "size"


def _reshape(ctx, node):
    src = ctx.dims(node.args[0])
    out = ctx.out_fresh(node)
    ctx.match_products(src, out, node, "reshape")
    for i, e in enumerate(ctx.arg(node, _shape_arg(node)) or ()):
        if isinstance(e, Node) and isinstance(ctx.dims(e), Dim):
            ctx.unify(ctx.dims(e), out[i], node)


def _rewrite_reshape(rw, node):
    return shape_entries_rewrite(_shape_arg(node))(rw, node)


register_rule(
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.view_copy.default,
    rewrite=_rewrite_reshape,
)(_reshape)


def _rewrite_reshape_alias(rw, node) -> Edit | None:
    """``_reshape_alias(x, size, stride)`` is the view ``reshape`` makes where it can: with new
    sizes the strides are stale, so the node becomes the ``reshape`` it stands for."""
    edit = shape_entries_rewrite("size")(rw, node)
    if edit is None:
        return None
    return Edit(target=aten.reshape.default, named=(("shape", dict(edit.named)["size"]),), nargs=1)


register_rule(aten._reshape_alias, aten._reshape_alias_copy, rewrite=_rewrite_reshape_alias)(_reshape)


@register_rule(aten.reshape_as, aten.view_as)
def _reshape_as(ctx, node):
    """``x.reshape_as(other)``: ``x`` reshaped to ``other``'s axes (no literal size to rewrite)."""
    src, other = ctx.dims(node.args[0]), ctx.arg_dims(node, "other")
    out = ctx.out_fresh(node)
    ctx.match_products(src, out, node, "reshape")
    ctx.unify_all(other, out, node)


@register_rule(aten.view.dtype, aten.view_copy.dtype)
def _view_dtype(ctx, node):
    """The same bytes read as another dtype: the axes are the same where the item sizes are;
    else the last axis counts other things (bytes of a different width) and is pinned."""
    src = ctx.dims(node.args[0])
    out = ctx.out_fresh(node)
    if [d.size for d in src] == [d.size for d in out]:
        ctx.set_out(node, src)
        return
    ctx.unify_all(src[:-1], out[:-1], node)
    for d in (src[-1], out[-1]):
        ctx.pin(d, f"reinterpreted as another dtype at {ctx.where(node)}")


@register_rule(aten.flatten.using_ints, aten.squeeze, aten.unsqueeze, aten.squeeze_copy,
               aten.unsqueeze_copy, aten.ravel)
def _flatten_like(ctx, node):
    src = ctx.dims(node.args[0])
    out = ctx.out_fresh(node)
    ctx.match_products(src, out, node, "reshape")


def _unflatten_axes(rw, node):
    out = rw.dims(node)
    dim = norm_dim(rw.arg(node, "dim"), len(out) - len(rw.arg(node, "sizes")) + 1)
    return out[dim : dim + len(rw.arg(node, "sizes"))]


@register_rule(aten.unflatten.int, rewrite=shape_entries_rewrite("sizes", _unflatten_axes))
def _unflatten(ctx, node):
    _flatten_like(ctx, node)


@register_rule(aten.permute.default, aten.permute_copy.default)
def _permute(ctx, node):
    src = ctx.dims(node.args[0])
    order = norm_dims_ordered(ctx.arg(node, "dims"), len(src))
    ctx.set_out(node, [src[i] for i in order])


def norm_dims_ordered(dims, ndim):
    return [norm_dim(d, ndim) for d in dims]


@register_rule(aten.transpose.int, aten.transpose_copy.int, aten.swapaxes.default,
               aten.swapdims.default)
def _transpose(ctx, node):
    src = list(ctx.dims(node.args[0]))
    a = norm_dim(node.args[1], len(src))
    b = norm_dim(node.args[2], len(src))
    src[a], src[b] = src[b], src[a]
    ctx.set_out(node, src)


@register_rule(aten.t.default, aten.t_copy.default, aten.numpy_T.default)
def _t(ctx, node):
    src = ctx.dims(node.args[0])
    ctx.set_out(node, list(reversed(src)))


@register_rule(aten.movedim, aten.moveaxis)
def _movedim(ctx, node):
    src = list(ctx.dims(node.args[0]))
    n = len(src)
    source, dest = ctx.arg(node, "source"), ctx.arg(node, "destination")
    source = [source] if isinstance(source, int) else list(source)
    dest = [dest] if isinstance(dest, int) else list(dest)
    moved = dict(zip((norm_dim(d, n) for d in dest), (norm_dim(s, n) for s in source)))
    rest = iter(i for i in range(n) if i not in moved.values())
    ctx.set_out(node, [src[moved[i]] if i in moved else src[next(rest)] for i in range(n)])


@register_rule(aten.as_strided, aten.as_strided_copy)
def _as_strided(ctx, node):
    """Elements read at literal strides: no axis of the input or output can change length."""
    for d in list(ctx.dims(node.args[0])) + list(ctx.out_fresh(node)):
        ctx.pin(d, f"read by as_strided at {ctx.where(node)} (literal strides)")


@register_rule(aten.diagonal, aten.diagonal_copy)
def _diagonal(ctx, node):
    """The diagonal of axes ``dim1``/``dim2`` becomes the last axis: both are indexed."""
    src = ctx.dims(node.args[0])
    n = len(src)
    d1, d2 = norm_dim(ctx.arg(node, "dim1", 0), n), norm_dim(ctx.arg(node, "dim2", 1), n)
    out = ctx.out_fresh(node)
    for axis in (d1, d2):
        ctx.index_axis(node, node.args[0], axis, "a diagonal taken")
    ctx.pin(out[-1], f"diagonal at {ctx.where(node)}")
    ctx.unify_all([d for i, d in enumerate(src) if i not in (d1, d2)], out[:-1], node)


# -- expansion ------------------------------------------------------------------------------------
@register_rule(aten.expand.default, aten.expand_copy.default, aten.broadcast_to.default,
               rewrite=shape_entries_rewrite("size"))
def _expand(ctx, node):
    src = ctx.dims(node.args[0])
    out = ctx.out_fresh(node)
    sizes = ctx.arg(node, "size")
    off = len(out) - len(src)
    for i, o in enumerate(out):
        j = i - off
        e = sizes[i] if isinstance(sizes, (list, tuple)) and i < len(sizes) else None
        if j >= 0 and src[j].size != 1:
            ctx.unify(src[j], o, node)
            out[i] = src[j]
        elif o.size != 1:
            if isinstance(e, Node):
                ctx.unify(ctx.dims(e), o, node)
            elif is_static(o.size):  # a batch/sequence-sized new axis replicates no features
                ctx.replica(o, node)


def _symbolic_count(count) -> bool:
    """A repeat count is symbolic when it is a SymInt node (a literal count copies features)."""
    return not isinstance(count, int)


@register_rule(aten.repeat.default)
def _repeat(ctx, node):
    src = ctx.dims(node.args[0])
    out = ctx.out_fresh(node)
    reps = ctx.arg(node, "repeats")
    off = len(out) - len(src)
    rep_dims = []
    for i, o in enumerate(out):
        j = i - off
        r = reps[i]
        symbolic = _symbolic_count(r)
        if j < 0:
            if isinstance(r, Node) and isinstance(ctx.dims(r), Dim):
                ctx.unify(ctx.dims(r), o, node)
            elif not symbolic:
                ctx.replica(o, node)
            rep_dims.append(None if symbolic else o)
            continue
        if isinstance(r, int) and r == 1:
            ctx.unify(src[j], o, node)
            rep_dims.append(None)
            continue
        if symbolic:  # a symbolic repeat count: positions, not features
            ctx.pin(src[j], f"repeated a symbolic number of times at {ctx.where(node)}")
            ctx.pin(o, f"repeated a symbolic number of times at {ctx.where(node)}")
            rep_dims.append(None)
            continue
        rd = ctx.table.new(r)
        ctx.refine(o, PROD, [rd, src[j]], node)  # tiling: out index = r * n + i
        ctx.replica(rd, node)
        rep_dims.append(rd)
    ctx.record(node, repeat_dims=rep_dims)


# -- concatenation and splitting --------------------------------------------------------------------
_STACKS = {"hstack": 1, "column_stack": 1, "vstack": 0, "row_stack": 0, "dstack": 2}


@register_rule(aten.cat, aten.concat, aten.concatenate, aten.hstack, aten.vstack, aten.row_stack,
               aten.dstack, aten.column_stack)
def _cat(ctx, node):
    """Concatenation along ``dim``; ``hstack``/``vstack``/``dstack``/``column_stack`` along
    their fixed axis (axis 0 of 1-D inputs for ``hstack``), where their inputs have the
    output's rank; inputs they first make 1-, 2- or 3-D are pinned."""
    tensors = [t for t in ctx.arg(node, "tensors") if isinstance(t, Node)]
    out = ctx.out_fresh(node)
    fam = family(node)
    if fam in _STACKS:
        if any(len(ctx.dims(t)) != len(out) for t in tensors):
            for d in [d for t in tensors for d in ctx.dims(t)] + list(out):
                ctx.pin(d, f"{fam} of inputs of another rank at {ctx.where(node)}")
            return
        dim = 0 if len(out) == 1 else _STACKS[fam]
    else:
        dim = norm_dim(ctx.arg(node, "dim", 0), len(out))
    parts = []
    for t in tensors:
        d = ctx.dims(t)
        if len(d) != len(out) or d[dim].size == 0:
            continue  # legacy empty tensors
        for k, (a, b) in enumerate(zip(d, out)):
            if k != dim:
                ctx.unify(a, b, node)
        parts.append(d[dim])
    if len(parts) == 1:
        ctx.unify(parts[0], out[dim], node)
    elif parts:
        if not all(isinstance(p.size, int) for p in parts):
            # concatenating along a symbolic axis (e.g. cls token + patches): the pieces are
            # positions of a sequence, not features
            for p in parts + [out[dim]]:
                ctx.pin(p, f"concatenated along a symbolic axis at {ctx.where(node)}")
        else:
            ctx.refine(out[dim], CAT, parts, node)


@register_rule(aten.stack.default)
def _stack(ctx, node):
    tensors = [t for t in ctx.arg(node, "tensors") if isinstance(t, Node)]
    out = ctx.out_fresh(node)
    dim = norm_dim(ctx.arg(node, "dim", 0), len(out))
    for t in tensors:
        rest = out[:dim] + out[dim + 1 :]
        ctx.unify_all(ctx.dims(t), rest, node)
    ctx.pin(out[dim], f"stack index at {ctx.where(node)}")


def _split_dim(ctx, node, ndim: int) -> int:
    """The axis a split cuts: ``dim``, or the fixed axis of ``hsplit``/``vsplit``/``dsplit``."""
    fixed = {"hsplit": 0 if ndim == 1 else 1, "vsplit": 0, "dsplit": 2}.get(family(node))
    return fixed if fixed is not None else norm_dim(ctx.arg(node, "dim", 0), ndim)


def _split_common(ctx, node):
    """Every way of cutting one axis into consecutive pieces (sizes, a piece size, a count of
    pieces, split points, a tensor of split points): the pieces are read from the outputs, so
    the axis is their concatenation whatever the arguments were."""
    src = ctx.dims(node.args[0])
    outs = ctx.out_fresh(node)
    dim = _split_dim(ctx, node, len(src))
    for o in outs:
        for k, (a, b) in enumerate(zip(src, o)):
            if k != dim:
                ctx.unify(a, b, node)
    parts = [o[dim] for o in outs if o[dim].size != 0]
    if len(parts) == 1:
        ctx.unify(parts[0], src[dim], node)
    elif all(isinstance(p.size, int) for p in parts):
        ctx.refine(src[dim], CAT, parts, node)
    else:
        for p in parts + [src[dim]]:
            ctx.pin(p, f"split along a symbolic axis at {ctx.where(node)}")
    points = node.args[1] if len(node.args) > 1 else None
    if isinstance(points, Node) and isinstance(ctx.dims(points), list):  # split points as values
        for d in ctx.dims(points):
            ctx.pin(d, f"split points held in a tensor at {ctx.where(node)} (the rewrite cuts "
                       "by sizes instead)")
    ctx.record(node, split_parts=[o[dim] for o in outs], split_dim=dim)


def _pieces(kind: str, n: int, arg: int) -> list[int]:
    """The piece sizes torch makes of an axis of length ``n``: ``"size"`` (``split``: pieces of
    ``arg``, the last shorter), ``"chunks"`` (``chunk``: ``arg`` pieces of ceil(n / arg), fewer
    if they run out) or ``"sections"`` (``tensor_split``: ``arg`` pieces, the first n % arg
    one longer)."""
    if kind == "sections":
        q, r = divmod(n, arg)
        return [q + 1] * r + [q] * (arg - r)
    size = arg if kind == "size" else -(-n // arg)
    if size <= 0:
        return [n]
    return [size] * (n // size) + ([n % size] if n % size else [])


_BY_COUNT = {"chunk": "chunks", "unsafe_chunk": "chunks", "hsplit": "sections",
             "vsplit": "sections", "dsplit": "sections", "tensor_split": "sections"}


def _rewrite_split(rw, node) -> Edit | None:
    """Keep the op where its own arguments can say the new pieces (a piece size, a count that
    still cuts them, sizes, split points), else cut by explicit sizes (``split_with_sizes``)."""
    parts = rw.record(node, "split_parts")
    new = [rw.new_size(p) for p in parts]
    if new == [p.size for p in parts]:
        return None
    if not all(isinstance(n, int) for n in new):
        return None
    fam, arg1 = family(node), node.target._schema.arguments[1]
    count = arg1.type.kind() == "IntType" or str(arg1.type) == "SymInt"  # a number, not a list
    if fam in _BY_COUNT and count:
        if _pieces(_BY_COUNT[fam], sum(new), rw.arg(node, arg1.name)) == new:
            return None  # the same count cuts the new axis into the new pieces
    elif fam in ("split", "unsafe_split", "split_copy") and count:
        if _pieces("size", sum(new), new[0]) == new:
            return replace_args(**{arg1.name: new[0]})
    elif fam in ("tensor_split", "hsplit", "vsplit", "dsplit") and str(arg1.type) != "Tensor":
        points = [sum(new[: i + 1]) for i in range(len(new) - 1)]  # split points
        return replace_args(**{arg1.name: points})
    elif str(arg1.type) != "Tensor":  # split_with_sizes, split.sizes, ...: a list of sizes
        return replace_args(**{arg1.name: new})
    return Edit(target=aten.split_with_sizes.default, nargs=1,
                named=(("split_sizes", new), ("dim", rw.record(node, "split_dim"))))


register_rule(aten.split, aten.split_with_sizes, aten.split_copy, aten.split_with_sizes_copy,
              aten.unsafe_split, aten.unsafe_split_with_sizes, aten.chunk, aten.unsafe_chunk,
              aten.tensor_split, aten.hsplit, aten.vsplit, aten.dsplit,
              rewrite=_rewrite_split)(_split_common)


@register_rule(aten.unbind.int, aten.unbind_copy.int)
def _unbind(ctx, node):
    src = ctx.dims(node.args[0])
    dim = norm_dim(ctx.arg(node, "dim", 0), len(src))
    rest = src[:dim] + src[dim + 1 :]
    n = src[dim].size
    ctx.index_axis(node, node.args[0], dim, "unbound (each position is a different tensor)")
    ctx.set_out(node, [list(rest) for _ in range(n)])


@register_rule(aten.select.int, aten.select_copy.int)
def _select(ctx, node):
    src = ctx.dims(node.args[0])
    dim = norm_dim(ctx.arg(node, "dim"), len(src))
    ctx.index_axis(node, node.args[0], dim, "indexed by select")
    ctx.set_out(node, src[:dim] + src[dim + 1 :])


def _slice_like(ctx, node, start, out: list | None = None):
    """``out`` (the output's axes unless given: ``slice_scatter``'s ``src``) is the range
    ``start``.. of ``node.args[0]``'s axis ``dim``; a start that is not a literal (None)
    indexes the axis."""
    src = ctx.dims(node.args[0])
    out = ctx.out_fresh(node) if out is None else out
    dim = norm_dim(ctx.arg(node, "dim", 0), len(src))
    for k, (a, b) in enumerate(zip(src, out)):
        if k != dim:
            ctx.unify(a, b, node)
    n, m = src[dim].size, out[dim].size
    if m == n and (start in (0, None)):
        ctx.unify(src[dim], out[dim], node)
        out[dim] = src[dim]
        return
    if not (isinstance(n, int) and isinstance(m, int) and isinstance(start, int) and m > 0):
        ctx.index_axis(node, node.args[0], dim, "sliced by a symbolic or strided range")
        ctx.pin(out[dim], f"slice of a symbolic range at {ctx.where(node)}")
        return
    start = max(0, min(start + n if start < 0 else start, n))
    sizes = [s for s in (start, m, n - start - m) if s > 0]
    parts = ctx.refine(src[dim], CAT, [ctx.table.new(s) for s in sizes], node)
    if parts is None:  # the axis is structured another way (e.g. cropping a padded window grid)
        ctx.index_axis(node, node.args[0], dim, "sliced across its structure")
        ctx.pin(out[dim], f"slice across the structure of its axis at {ctx.where(node)}")
        return
    mid = parts[1] if start > 0 else parts[0]
    ctx.unify(mid, out[dim], node)
    ctx.record(node, slice_pre=parts[0] if start > 0 else None, slice_mid=mid)


def _rewrite_slice(rw, node) -> Edit | None:
    mid = rw.record(node, "slice_mid")
    if mid is None:
        return None
    pre = rw.record(node, "slice_pre")
    start = rw.new_size(pre) if pre is not None else 0
    end = start + rw.new_size(mid)
    old_end = rw.arg(node, "end")
    out = {}
    if pre is not None and start != rw.arg(node, "start"):
        out["start"] = start
    if isinstance(old_end, int) and old_end < _INT_MAX and old_end != end:
        out["end"] = end
    return replace_args(**out) if out else None


@register_rule(aten.slice.Tensor, aten.slice_copy.Tensor, rewrite=_rewrite_slice)
def _slice(ctx, node):
    step = ctx.arg(node, "step", 1)
    if step != 1:
        src = ctx.dims(node.args[0])
        dim = norm_dim(ctx.arg(node, "dim", 0), len(src))
        out = ctx.out_fresh(node)
        for k, (a, b) in enumerate(zip(src, out)):
            if k != dim:
                ctx.unify(a, b, node)
        if out[dim].size != src[dim].size:
            ctx.index_axis(node, node.args[0], dim, "sliced with a step")
            ctx.pin(out[dim], f"strided slice at {ctx.where(node)}")
        else:
            ctx.unify(src[dim], out[dim], node)
        return
    _slice_like(ctx, node, ctx.arg(node, "start") or 0)


def _rewrite_narrow(rw, node) -> Edit | None:
    mid = rw.record(node, "slice_mid")
    if mid is None:
        return None
    pre = rw.record(node, "slice_pre")
    return replace_args(start=rw.new_size(pre) if pre is not None else 0, length=rw.new_size(mid))


@register_rule(aten.narrow, aten.narrow_copy, rewrite=_rewrite_narrow)
def _narrow(ctx, node):
    """``narrow`` by a literal start is a slice; by a tensor start (``narrow.Tensor``) the
    start is a value: the axis is indexed."""
    start = ctx.arg(node, "start")
    _slice_like(ctx, node, None if isinstance(start, Node) else start)


@register_rule(aten.slice_scatter, rewrite=_rewrite_slice)
def _slice_scatter(ctx, node):
    """``self`` with ``self[start:end:step]`` along ``dim`` replaced by ``src``: like the slice
    of ``self`` that ``src`` replaces (so its literal bounds are rewritten the same way)."""
    base = ctx.dims(node.args[0])
    if ctx.arg(node, "step", 1) != 1:
        dim = norm_dim(ctx.arg(node, "dim", 0), len(base))
        ctx.index_axis(node, node.args[0], dim, "written with a step by slice_scatter")
        src = ctx.arg_dims(node, "src")
        ctx.pin(src[dim], f"strided slice_scatter at {ctx.where(node)}")
        ctx.unify_all([d for i, d in enumerate(base) if i != dim],
                      [d for i, d in enumerate(src) if i != dim], node)
    else:
        _slice_like(ctx, node, ctx.arg(node, "start") or 0, out=list(ctx.arg_dims(node, "src")))
    ctx.set_out(node, base)


@register_rule(aten.select_scatter)
def _select_scatter(ctx, node):
    base = ctx.dims(node.args[0])
    dim = norm_dim(ctx.arg(node, "dim"), len(base))
    ctx.index_axis(node, node.args[0], dim, "written at one position by select_scatter")
    ctx.unify_all(base[:dim] + base[dim + 1 :], ctx.arg_dims(node, "src"), node)  # src: the row
    ctx.set_out(node, base)


@register_rule(aten.repeat_interleave.self_int)
def _repeat_interleave(ctx, node):
    """Each element repeated ``repeats`` times in place: out index = i * r + j."""
    src = ctx.dims(node.args[0])
    out = ctx.out_fresh(node)
    dim = ctx.arg(node, "dim", None)
    reps = ctx.arg(node, "repeats")
    if dim is not None:
        dim = norm_dim(dim, len(src))
    if dim is None or _symbolic_count(reps):
        for d in list(src) + list(out):
            ctx.pin(d, f"repeat_interleave at {ctx.where(node)}")
        return
    for k, (a, b) in enumerate(zip(src, out)):
        if k != dim:
            ctx.unify(a, b, node)
            out[k] = a
    if reps == 1:
        ctx.unify(src[dim], out[dim], node)
        return
    rep = ctx.table.new(reps)
    if ctx.refine(out[dim], PROD, [src[dim], rep], node) is not None:
        ctx.replica(rep, node)
