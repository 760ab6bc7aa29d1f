"""Mixture-of-experts routing: data-dependent counts and per-expert (grouped) matmuls.

A mixture-of-experts layer routes each token to the top-k of E experts, sorts the (token,
expert) pairs by expert, counts them per expert (``histc``/``bincount``) and runs each expert's
FFN on its rows with one grouped matmul over the experts' weights stored as one 3-D tensor
``(E, in, out)``. What this means for the method:

- the hidden size and each expert's FFN width are spaces like any FFN's: the 3-D weights are
  producers on their output axis and consumers on their contracted axis, so every expert's
  FFN is coalesced and de-coalesced exactly like a dense one;
- the experts axis of the weights is addressed by the counts (which rows go to which expert):
  it is indexed, not a feature axis, and tied to the counts' axis;
- the number of experts stays as it is: the router's top-k picks k experts *by value*, and
  duplicating or merging experts changes which ones it picks, so neither direction keeps the
  function (the experts space is pinned with that reason, from the ``topk`` rule).

Counts have data-dependent values: the axes they count over are pinned ("counted"), and so is
the axis of counts (bin edges and ``minlength`` are values, not sizes the rewrite could change).
Where the counted values are positions along an axis -- the indices a ``topk``/``argmax``/
``sort`` returned, through reshapes, casts and sorting -- and the bins are exactly those
positions (``bins = n, min = 0, max = n - 1``), the counts' axis *is* that axis: so the router's
rows, the counts and the experts axis of the 3-D weights are one space, the experts.
"""

from __future__ import annotations

import operator

from torch.fx import Node

from vcyclefx.fx.ops import COPIES, VIEWS

from vcyclefx.analysis.registry import op_of, register_rule
from vcyclefx.analysis.rules._util import aten, family, norm_dim

# ops that keep the values of their input (so indices stay indices into the same axis)
_SAME_VALUES = VIEWS | COPIES | {aten.flatten.using_ints, aten.to.device, aten.detach.default}
_INDICES = {aten.topk.default: 1, aten.sort.default: 1, aten.max.dim: 1, aten.min.dim: 1}


def indexed_axis(ctx, x) -> object | None:
    """The axis whose positions the values of ``x`` are (indices a ``topk``/``sort``/``max``
    returned, or ``argmax``), followed back through value-keeping ops and sorting; else None."""
    for _ in range(64):  # a chain of value-keeping ops, bounded
        if not isinstance(x, Node) or x.op != "call_function":
            return None
        t = op_of(x)
        if t in _SAME_VALUES:
            x = x.args[0]
        elif t is operator.getitem and isinstance(x.args[0], Node):
            src, k = x.args[0], x.args[1]
            st = op_of(src) if src.op == "call_function" else None
            if st is aten.sort.default and k == 0:  # sorted values: the same set of values
                x = src.args[0]
            elif _INDICES.get(st) == k:
                return _positions_axis(ctx, src)
            else:
                return None
        elif t in (aten.argmax.default, aten.argmin.default) and ctx.arg(x, "dim") is not None:
            return _positions_axis(ctx, x)
        else:
            return None
    return None


def _positions_axis(ctx, node: Node):
    src = ctx.dims(node.args[0])
    return src[norm_dim(ctx.arg(node, "dim", -1), len(src))]


@register_rule(aten.histc.default, aten.bincount.default)
def _counts(ctx, node):
    """``histc(x, bins)`` -> (bins,), ``bincount(x, minlength)`` -> (max(x)+1 or more,): counts
    of values; the counted axes and the bins are pinned (bin edges and ``minlength`` are values,
    not sizes the rewrite could change)."""
    src = ctx.dims(node.args[0])
    for d in src:
        ctx.pin(d, f"counted by {node.target} at {ctx.where(node)} (data-dependent counts)")
    out = ctx.out_fresh(node)
    ctx.pin(out[0], f"count bins of {node.target} at {ctx.where(node)} (bins are value ranges)")
    axis = indexed_axis(ctx, node.args[0])
    if axis is not None and op_of(node) is aten.histc.default and isinstance(axis.size, int):
        n = axis.size
        if (ctx.arg(node, "bins") == n and float(ctx.arg(node, "min")) == 0
                and float(ctx.arg(node, "max")) == n - 1):
            ctx.unify(out[0], axis, node)  # one bin per position of that axis


@register_rule(aten.nonzero.default, aten.argwhere.default, aten.where.default,
               aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor)
def _nonzero(ctx, node):
    """Outputs whose length depends on values: (number of non-zeros, ndim) positions
    (``nonzero``; ``where(cond)``: one tensor per axis), or elements repeated by counts held
    in a tensor (``repeat_interleave``): every axis searched or repeated is pinned."""
    src = ctx.dims(node.args[0])
    dim = ctx.arg(node, "dim", None) if family(node) == "repeat_interleave" else None
    out = ctx.out_fresh(node)
    outs = out if out and isinstance(out[0], list) else [out]
    if dim is not None:  # x.repeat_interleave(counts, dim): only that axis changes length
        dim = norm_dim(dim, len(src))
        for i, (a, b) in enumerate(zip(src, outs[0])):
            if i != dim:
                ctx.unify(a, b, node)
        src, outs = [src[dim]], [[outs[0][dim]]]
    for d in src:
        ctx.pin(d, f"searched by {node.target} at {ctx.where(node)} (data-dependent positions)")
    for d in (d for o in outs for d in o):
        ctx.pin(d, f"positions found by {node.target} at {ctx.where(node)}")


def _grouped(ctx, node, a: Node, b: Node, offs):
    """``a`` (rows, k) @ ``b`` (groups, k, n) with ``offs`` (groups,) the end row of each group:
    row r is multiplied by the matrix of the group it falls in."""
    ad, bd = ctx.dims(a), ctx.dims(b)
    if len(ad) == 3 and len(bd) == 3 and offs is None:  # batched: like bmm
        out = ctx.out_fresh(node)
        ctx.unify(ad[0], bd[0], node)
        ctx.unify(ad[0], out[0], node)
        ctx.unify(ad[1], out[1], node)
        ctx.unify(bd[2], out[2], node)
        ctx.unify(ad[2], bd[1], node)
        ctx.contract(node, [(b, 1), (a, 2)])
        return
    if not (len(ad) == 2 and len(bd) == 3 and isinstance(offs, Node)):
        raise ValueError(f"grouped matmul of ranks {len(ad)} x {len(bd)} "
                         f"{'with' if offs is not None else 'without'} offsets is not supported")
    ctx.unify(ad[-1], bd[1], node)
    ctx.set_out(node, [ad[0], bd[2]])
    ctx.unify(ctx.dims(offs)[0], bd[0], node)
    ctx.index_axis(node, b, 0, "groups (experts) addressed by the offsets")
    ctx.contract(node, [(b, 1), (a, 1)])


@register_rule(aten._grouped_mm.default)
def _grouped_mm(ctx, node):
    if ctx.arg(node, "bias") is not None:
        raise ValueError("grouped matmul with a bias is not supported")
    _grouped(ctx, node, ctx.arg(node, "self"), ctx.arg(node, "mat2"), ctx.arg(node, "offs"))


@register_rule("transformers::grouped_mm_fallback")
def _grouped_mm_fallback(ctx, node):
    """transformers' grouped matmul (the per-expert loop it runs where ``_grouped_mm`` cannot)."""
    _grouped(ctx, node, ctx.arg(node, "input"), ctx.arg(node, "weight"), ctx.arg(node, "offs"))
