"""Indexing, factories, symbolic-size arithmetic, assertions, higher-order ops, losses."""

from __future__ import annotations

import math
import operator

import torch
from torch.fx import Node

from vcyclefx.analysis.dims import Dim
from vcyclefx.fx.args import replace_arg_at
from vcyclefx.analysis.registry import op_of, register_rule
from vcyclefx.analysis.walk import walk
from vcyclefx.analysis.rules._util import (aten, broadcast_into, family, norm_dim, norm_dims, ops,
                                           shape_entries_rewrite)


# -- no value ----------------------------------------------------------------------------------------
@register_rule(*ops("_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size",
                    "sym_constrain_range", "_assert_async.msg", "_assert_async",
                    "_functional_assert_async.msg", "_print"))
def _no_value(ctx, node):
    ctx.set_out(node, None)


# -- tuples and symbolic sizes ------------------------------------------------------------------
@register_rule(operator.getitem)
def _getitem(ctx, node):
    src = ctx.dims(node.args[0])
    idx = node.args[1]
    if isinstance(src, list) and isinstance(idx, int) and idx < len(src):
        ctx.set_out(node, src[idx])
    else:
        ctx.out_fresh(node)


@register_rule(aten.sym_size.int)
def _sym_size(ctx, node):
    src = ctx.dims(node.args[0])
    ctx.set_out(node, src[norm_dim(node.args[1], len(src))])


def _sym_mul_rewrite(rw, node):
    """The literal factor is whatever the product's new size leaves after the other factors."""
    out_dim = rw.dims(node)
    lit = [i for i, a in enumerate(node.args) if isinstance(a, int) and not isinstance(a, bool)]
    if not isinstance(out_dim, Dim) or len(lit) != 1:
        return None
    total = rw.new_size(out_dim)
    others = 1
    for a in node.args:
        if isinstance(a, Node):
            d = rw.dims(a)
            if not isinstance(d, Dim):
                return None
            others = others * rw.new_size(d)
    new = _exact_div(total, others)
    old = node.args[lit[0]]
    return replace_arg_at(lit[0], new) if new is not None and new != old else None


def _exact_div(a, b):
    import sympy

    r = sympy.sympify(a) / sympy.sympify(b)
    return int(r) if r.is_Integer else None


@register_rule(operator.mul, rewrite=_sym_mul_rewrite)
def _sym_mul(ctx, node):
    """SymInt product (e.g. batch * heads in a view). Multiplication has no order, so the
    product is not refined here; its literal factor is recomputed at rewrite time from the
    axis it sizes."""
    ctx.out_fresh(node)


@register_rule(operator.add, operator.sub, operator.floordiv, operator.truediv, operator.mod,
               operator.neg, operator.pow, operator.eq, operator.ne, operator.lt, operator.le,
               operator.gt, operator.ge, operator.and_, operator.or_, torch.sym_float,
               torch.sym_int, torch.sym_max, torch.sym_min, torch.sym_not, torch.sym_sqrt,
               math.ceil, math.floor, math.sqrt, math.trunc, aten.sym_numel.default,
               aten.sym_stride.int, aten.sym_storage_offset.default, aten.item.default,
               aten._local_scalar_dense.default)
def _opaque_scalar(ctx, node):
    ctx.out_fresh(node)


# -- factories ------------------------------------------------------------------------------------
_FACTORIES = ops("zeros", "ones", "empty.memory_format", "full", "rand", "randn", "new_zeros",
                 "new_ones", "new_empty", "new_full", "randint.low", "randint", "rand.generator",
                 "randn.generator", "randint.generator", "randint.low_generator")


@register_rule(*_FACTORIES, rewrite=shape_entries_rewrite("size"))
def _factory(ctx, node):
    """Uniform or random values: axes are fresh and size-free (literal sizes get rewritten)."""
    out = ctx.out_fresh(node)
    size = ctx.arg(node, "size", None)
    if isinstance(size, (list, tuple)):
        for e, d in zip(size, out):
            if isinstance(e, Node) and isinstance(ctx.dims(e), Dim):
                ctx.unify(ctx.dims(e), d, node)


@register_rule(aten.empty_strided.default, aten.new_empty_strided.default)
def _empty_strided(ctx, node):
    _factory(ctx, node)


@register_rule(*ops("scalar_tensor"))
def _scalar_tensor(ctx, node):
    ctx.out_fresh(node)


@register_rule(aten.arange.default, aten.arange.start, aten.arange.start_step, aten.linspace)
def _arange(ctx, node):
    out = ctx.out_fresh(node)
    for a in node.args:
        if isinstance(a, Node) and isinstance(ctx.dims(a), Dim) and len(out) == 1:
            ctx.unify(ctx.dims(a), out[0], node)
    ctx.pin(out[0], f"index values made by {node.target} at {ctx.where(node)}")


# -- indexing ---------------------------------------------------------------------------------------
@register_rule(aten.embedding.default)
def _embedding(ctx, node):
    w, idx = ctx.arg(node, "weight"), ctx.arg(node, "indices")
    wd, id_ = ctx.dims(w), ctx.dims(idx)
    ctx.index_axis(node, w, 0, "rows looked up by embedding")
    ctx.set_out(node, list(id_) + [wd[1]])


@register_rule(aten.index_select.default)
def _index_select(ctx, node):
    src = ctx.dims(node.args[0])
    dim = norm_dim(ctx.arg(node, "dim"), len(src))
    idx = ctx.dims(ctx.arg(node, "index"))
    ctx.index_axis(node, node.args[0], dim, "indexed by index_select")
    ctx.set_out(node, src[:dim] + [idx[0]] + src[dim + 1 :])


@register_rule(aten.gather, aten.take_along_dim)
def _gather(ctx, node):
    """``gather``/``take_along_dim`` along ``dim``: the output has the index's axes (broadcast
    against the input's for ``take_along_dim``); ``take_along_dim`` without ``dim`` reads the
    flattened input, so every input axis is indexed."""
    src = ctx.dims(node.args[0])
    idx = ctx.dims(ctx.arg(node, "indices" if family(node) == "take_along_dim" else "index"))
    dim = ctx.arg(node, "dim")
    if dim is None:
        for axis in range(len(src)):
            ctx.index_axis(node, node.args[0], axis, f"indexed by {family(node)} (flattened)")
        ctx.set_out(node, idx)
        return
    dim = norm_dim(dim, len(src))
    ctx.index_axis(node, node.args[0], dim, f"indexed by {family(node)}")
    out = ctx.out_fresh(node)
    for i, o in enumerate(out):
        for axes in (src, idx):
            if i != dim and axes[i].size == o.size:
                ctx.unify(axes[i], o, node)


@register_rule(aten.index.Tensor, aten._unsafe_index.Tensor)
def _index(ctx, node):
    """Advanced indexing ``x[i0, i1, ...]``: indexed axes are pinned; the index tensors'
    broadcast axes appear where the first indexed axis was (or in front if they are apart)."""
    src = ctx.dims(node.args[0])
    indices = ctx.arg(node, "indices")
    out = ctx.out_fresh(node)
    positions = [i for i, t in enumerate(indices) if t is not None]
    for i in positions:
        ctx.index_axis(node, node.args[0], i, "indexed by advanced indexing")
    idx_nodes = [t for t in indices if isinstance(t, Node)]
    nb = max((len(ctx.dims(t)) for t in idx_nodes), default=0)
    contiguous = positions == list(range(positions[0], positions[-1] + 1)) if positions else True
    start = positions[0] if contiguous and positions else 0
    bdims = out[start : start + nb]
    broadcast_into(ctx, node, bdims, idx_nodes)
    rest = [src[i] for i in range(len(src)) if i not in positions]
    rest_pos = [i for i in range(len(out)) if not (start <= i < start + nb)]
    before = [i for i in range(len(src)) if i not in positions and i < start]
    for k, (o_i, d) in enumerate(zip(rest_pos, rest)):
        ctx.unify(out[o_i], d, node)
        out[o_i] = d
    del before


_SOURCE_WRITES = ("index_add", "index_copy", "index_reduce")  # (self, dim, index, source)
_SCATTERS = ("scatter", "scatter_add", "scatter_reduce")  # (self, dim, index, src | value)


@register_rule(aten.index_put, aten._unsafe_index_put, aten.index_add, aten.index_copy,
               aten.index_reduce, aten.index_fill, aten.scatter, aten.scatter_add,
               aten.scatter_reduce, aten.masked_scatter)
def _index_put(ctx, node):
    """Writes at addressed positions of ``self``: the output has ``self``'s axes and the
    addressed axis is pinned (a masked scatter addresses by a mask that broadcasts to it).
    The values written are tied to ``self`` on every axis they are written along: a
    ``source``/``src``/``values`` axis that meets an axis of ``self`` is that axis (else a
    resized source would be written into an ``self`` of the old size)."""
    src = ctx.dims(node.args[0])
    fam = family(node)
    if fam in ("index_put", "_unsafe_index_put"):
        _index_put_values(ctx, node, src)
    elif fam == "masked_scatter":
        broadcast_into(ctx, node, src, [ctx.arg(node, "mask")])
    else:
        dim = norm_dim(ctx.arg(node, "dim"), len(src))
        ctx.index_axis(node, node.args[0], dim, f"written by {op_of(node)}")
        if fam in _SOURCE_WRITES:
            _source_along(ctx, node, src, dim)
        elif fam in _SCATTERS:
            _scatter_operands(ctx, node, src, dim)
    ctx.set_out(node, src)


def _source_along(ctx, node, src: list, dim: int) -> None:
    """``index_add``/``index_copy``/``index_reduce``: ``source`` has ``self``'s axes except
    along ``dim``, where it has the index's length."""
    sd, idx = ctx.arg_dims(node, "source"), ctx.arg_dims(node, "index")
    if not isinstance(sd, list) or len(sd) != len(src):
        return  # a 0-d source (of a 0-d self) has no axes
    for i, (a, b) in enumerate(zip(sd, src)):
        if i != dim:
            ctx.unify(a, b, node)
    if isinstance(idx, list) and idx:
        ctx.unify(sd[dim], idx[0], node)


def _scatter_operands(ctx, node, src: list, dim: int) -> None:
    """``scatter*``: ``index`` (and ``src``) may be smaller than ``self``: an axis written
    whole is ``self``'s axis, one written in part is pinned (its prefix is addressed)."""
    idx, vals = ctx.arg_dims(node, "index"), ctx.arg_dims(node, "src")
    if not isinstance(idx, list) or len(idx) != len(src):
        return
    for i, d in enumerate(idx):
        pairs = [(d, src[i])] if i != dim else []
        if isinstance(vals, list) and len(vals) == len(idx):
            pairs.append((d, vals[i]))
        for a, b in pairs:
            if a.size == b.size:
                ctx.unify(a, b, node)
            else:
                ctx.pin(a, f"written in part by {op_of(node)} at {ctx.where(node)}")
                ctx.pin(b, f"written in part by {op_of(node)} at {ctx.where(node)}")


def _index_put_values(ctx, node, src: list) -> None:
    """``self[indices] = values``: the indexed axes are pinned; ``values`` broadcasts to the
    indexed result, whose trailing axes are ``self``'s axes after the last indexed one."""
    last = -1
    for i, t in enumerate(ctx.arg(node, "indices")):
        if t is None:
            continue
        v = t.meta.get("val") if isinstance(t, Node) else None
        n = v.dim() if isinstance(v, torch.Tensor) and v.dtype == torch.bool else 1
        for j in range(i, min(i + n, len(src))):  # a boolean mask addresses all its axes
            ctx.index_axis(node, node.args[0], j, "written by index_put")
        last = max(last, i + n - 1)
    trailing = src[last + 1:]
    vals = ctx.arg_dims(node, "values")
    if not trailing or not isinstance(vals, list):
        return
    n = min(len(trailing), len(vals))  # right-aligned; a size-1 axis broadcasts
    for a, b in zip(vals[len(vals) - n:], trailing[len(trailing) - n:]):
        if a.size != 1 and a.size == b.size:
            ctx.unify(a, b, node)


@register_rule(aten.one_hot.default)
def _one_hot(ctx, node):
    src = ctx.dims(node.args[0])
    out = ctx.out_fresh(node)
    ctx.unify_all(src, out[:-1], node)
    ctx.pin(out[-1], f"one-hot classes at {ctx.where(node)}")


# -- position-dependent layout ops --------------------------------------------------------------
@register_rule(aten.roll.default, aten.flip.default, aten.tril.default, aten.triu.default,
               aten.diff.default, aten.constant_pad_nd.default, aten.pad.default,
               aten.reflection_pad2d.default, aten.replication_pad2d.default,
               aten.pixel_shuffle.default, aten.pixel_unshuffle.default)
def _positional(ctx, node):
    """Ops that move, mask or pad by position: the axes they act on are pinned."""
    src = ctx.dims(node.args[0])
    out = ctx.out_fresh(node)
    n = len(src)
    t = op_of(node)
    if t in (aten.tril.default, aten.triu.default):
        acted = [n - 2, n - 1]
    elif t in (aten.roll.default, aten.flip.default):
        acted = norm_dims(ctx.arg(node, "dims"), n)
    elif t is aten.diff.default:
        acted = [norm_dim(ctx.arg(node, "dim", -1), n)]
    elif t in (aten.constant_pad_nd.default, aten.pad.default):
        pad = ctx.arg(node, "pad")
        acted = [n - 1 - i // 2 for i, p in enumerate(pad) if p != 0]
    else:
        acted = list(range(1, n))
    for i in range(n):
        if i in acted or i >= len(out) or out[i].size != src[i].size:
            ctx.pin(src[i], f"{node.target} acts on it by position at {ctx.where(node)}")
            if i < len(out):
                ctx.pin(out[i], f"{node.target} acts on it by position at {ctx.where(node)}")
        else:
            ctx.unify(src[i], out[i], node)
            out[i] = src[i]


# -- losses ------------------------------------------------------------------------------------------
@register_rule(aten.nll_loss_forward.default, aten.nll_loss.default, aten.nll_loss_nd.default,
               aten.cross_entropy_loss.default, aten.nll_loss2d_forward.default)
def _nll(ctx, node):
    src = ctx.dims(node.args[0])
    ctx.pin(src[1 if len(src) > 1 else 0], f"classes indexed by targets at {ctx.where(node)}")
    out = ctx.out_fresh(node)
    del out


@register_rule(aten.mse_loss.default, aten.l1_loss.default, aten.smooth_l1_loss.default,
               aten.binary_cross_entropy_with_logits.default, aten.binary_cross_entropy.default,
               aten.huber_loss.default)
def _pointwise_loss(ctx, node):
    a = ctx.dims(node.args[0])
    b = ctx.dims(node.args[1])
    ctx.unify_all(a, b, node)
    reduction = ctx.arg(node, "reduction", 1)
    for d in a:
        if reduction == 2:  # sum
            ctx.pin(d, f"summed by a loss at {ctx.where(node)}")
        elif reduction == 1:
            ctx.normalized(d, node)
    ctx.out_fresh(node)


# -- higher-order ops: analyse the body with its inputs bound -------------------------------------------
def _hop(sub_arg_index: int):
    def rule(ctx, node):
        sub_node = node.args[sub_arg_index]
        sub = getattr(ctx.gm, sub_node.target)
        operands = node.args[sub_arg_index + 1 :]
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        bind = {}
        for ph, a in zip(placeholders, operands):
            bind[ph] = (ctx.dims(a) if isinstance(a, Node) else ctx.fresh(ph),
                        ctx.prov.get(a) if isinstance(a, Node) else None)
        walk(ctx, sub, bind)
        out_node = next(n for n in sub.graph.nodes if n.op == "output")
        ctx.set_out(node, ctx.out[out_node])

    return rule


register_rule(torch.ops.higher_order.wrap_with_set_grad_enabled)(_hop(1))
register_rule(torch.ops.higher_order.wrap_with_autocast)(_hop(4))
