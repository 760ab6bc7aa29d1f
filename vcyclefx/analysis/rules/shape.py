"""Layout ops: views, reshapes, permutations, expansion, concatenation, splitting, slicing."""

from __future__ import annotations

from torch.fx import Node

from vcyclefx.analysis.dims import CAT, PROD, Dim, is_static
from passes.args import Edit, replace_args, retarget
from vcyclefx.analysis.registry import op_of, register_rule
from vcyclefx.analysis.rules._util import aten, norm_dim, shape_entries_rewrite

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


@register_rule(aten.flatten.using_ints, aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims,
               aten.unsqueeze.default)
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


@register_rule(aten.transpose.int, aten.swapaxes.default, aten.swapdims.default)
def _transpose(ctx, node):
    src = list(ctx.dims(node.args[0]))
    a = norm_dim(node.args[1], len(src))
    b = norm_dim(node.args[2], len(src))
    src[a], src[b] = src[b], src[a]
    ctx.set_out(node, src)


@register_rule(aten.t.default, aten.numpy_T.default)
def _t(ctx, node):
    src = ctx.dims(node.args[0])
    ctx.set_out(node, list(reversed(src)))


@register_rule(aten.movedim.int)
def _movedim(ctx, node):
    src = list(ctx.dims(node.args[0]))
    s = norm_dim(ctx.arg(node, "source"), len(src))
    d = norm_dim(ctx.arg(node, "destination"), len(src))
    x = src.pop(s)
    src.insert(d, x)
    ctx.set_out(node, src)


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
@register_rule(aten.cat.default, aten.concat.default, aten.concatenate.default)
def _cat(ctx, node):
    tensors = [t for t in ctx.arg(node, "tensors") if isinstance(t, Node)]
    out = ctx.out_fresh(node)
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


def _split_common(ctx, node):
    src = ctx.dims(node.args[0])
    outs = ctx.out_fresh(node)
    dim = norm_dim(ctx.arg(node, "dim", 0), len(src))
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
    ctx.record(node, split_parts=[o[dim] for o in outs])


def _rewrite_split(rw, node) -> Edit | None:
    parts = rw.record(node, "split_parts")
    new = [rw.new_size(p) for p in parts]
    old = [p.size for p in parts]
    if new == old:
        return None
    if op_of(node) is aten.chunk.default:  # a count of pieces: stays right while they are equal
        if len(set(new)) == 1:
            return None
        return retarget(aten.split_with_sizes.default, split_sizes=new)
    if op_of(node) in (aten.split.Tensor, aten.split_copy.Tensor):
        if len(set(new[:-1])) > 1 or new[-1] > new[0]:
            return retarget(aten.split_with_sizes.default, split_sizes=new)
        return replace_args(split_size=new[0])
    return replace_args(split_sizes=new)


register_rule(aten.split.Tensor, aten.split_with_sizes.default, aten.split_copy.Tensor,
              aten.split_with_sizes_copy.default, aten.chunk.default, aten.tensor_split.sections,
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


def _slice_like(ctx, node, start):
    src = ctx.dims(node.args[0])
    out = ctx.out_fresh(node)
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


@register_rule(aten.narrow.default, aten.narrow_copy.default, rewrite=_rewrite_narrow)
def _narrow(ctx, node):
    _slice_like(ctx, node, ctx.arg(node, "start"))


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
