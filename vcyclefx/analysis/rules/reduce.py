"""Reductions and normalisations.

Duplicating the units of a space (de-coalescing) keeps a *mean* over it, a biased variance and
so LayerNorm/RMSNorm/GroupNorm statistics, and a max; it changes a *sum*, a softmax, an unbiased
variance, a norm or an arg-max index. Ops of the first kind flag the space as normalised (only
equal group sizes are exact); ops of the second kind pin it.
"""

from __future__ import annotations

from torch.fx import Node

from vcyclefx.analysis.dims import PROD
from vcyclefx.fx.args import arg_index, replace_args
from vcyclefx.analysis.registry import op_of, register_rule
from vcyclefx.analysis.rules._util import aten, family, norm_dim, norm_dims, overload, shape_entries_rewrite


def _reduce(ctx, node, dims_arg="dim", keepdim_arg="keepdim", mode="mean"):
    src = ctx.dims(node.args[0])
    n = len(src)
    dims = norm_dims(ctx.arg(node, dims_arg, None) if dims_arg else None, n) if n else []
    if dims_arg and ctx.arg(node, dims_arg, None) in ([], ()):
        dims = list(range(n))
    keep = bool(ctx.arg(node, keepdim_arg, False)) if keepdim_arg else False
    for d in dims:
        if mode == "mean":
            ctx.normalized(src[d], node)
        elif mode == "pin":
            ctx.pin(src[d], f"{_opname(node)} over it at {ctx.where(node)} (not invariant to duplicating units)")
    out = ctx.out_fresh(node)
    kept = [src[i] if i not in dims else None for i in range(n)]
    if not keep:
        kept = [d for d in kept if d is not None]
    if isinstance(out, list) and out and isinstance(out[0], list):  # (values, indices)
        for o in out:
            _share(ctx, node, o, kept)
        ctx.set_out(node, [[k if k is not None else o[i] for i, k in enumerate(kept)] for o in out])
    elif isinstance(out, list):
        _share(ctx, node, out, kept)
        ctx.set_out(node, [k if k is not None else out[i] for i, k in enumerate(kept)])


def _share(ctx, node, out, kept):
    for o, k in zip(out, kept):
        if k is not None:
            ctx.unify(o, k, node)


def _opname(node: Node) -> str:
    return str(op_of(node)).split(".")[1] if str(op_of(node)).startswith("aten.") else str(op_of(node))


@register_rule(aten.mean.dim, aten.mean.default, aten.nanmean.default)
def _mean(ctx, node):
    _reduce(ctx, node, "dim" if op_of(node) is not aten.mean.default else None,
            "keepdim" if op_of(node) is not aten.mean.default else None)


def _dims_arg(node) -> str | None:
    """``"dim"`` where the overload takes the axes to reduce, None where it reduces them all."""
    return "dim" if arg_index(op_of(node), "dim") is not None else None


@register_rule(aten.sum.dim_IntList, aten.sum.default, aten.nansum.default, aten.prod.dim_int,
               aten.prod.default, aten.logsumexp.default, aten.norm, aten.linalg_vector_norm,
               aten.count_nonzero)
def _sum(ctx, node):
    _reduce(ctx, node, _dims_arg(node), "keepdim", mode="pin")


@register_rule(aten.amax.default, aten.amin.default, aten.max.default, aten.min.default,
               aten.any.dim, aten.any.dims, aten.any.default, aten.all.dim, aten.all.dims,
               aten.all.default)
def _max(ctx, node):
    _reduce(ctx, node, _dims_arg(node), "keepdim", mode="none")


@register_rule(aten.argmax.default, aten.argmin.default, aten.max.dim, aten.min.dim,
               aten.topk.default, aten.sort.default, aten.sort.stable, aten.cumsum.default,
               aten.cumprod.default, aten.cummax.default, aten.logcumsumexp.default)
def _index_valued(ctx, node):
    """Ops whose result depends on positions along ``dim``: the axis is pinned."""
    src = ctx.dims(node.args[0])
    dim = ctx.arg(node, "dim", None)
    dims = norm_dims(dim, len(src)) if dim is not None else list(range(len(src)))
    why = ("selects units by value: duplicating or merging units changes which are picked"
           if op_of(node) is aten.topk.default else "position-dependent")
    for d in dims:
        ctx.pin(src[d], f"{_opname(node)} along it at {ctx.where(node)} ({why})")
    if op_of(node) in (aten.cumsum.default, aten.cumprod.default, aten.logcumsumexp.default):
        ctx.set_out(node, src)
        return
    if family(node) in ("topk", "sort", "cummax"):
        out = ctx.out_fresh(node)
        for o in out:
            for i, (a, b) in enumerate(zip(o, src)):
                if i not in dims:
                    ctx.unify(a, b, node)
        return
    _reduce(ctx, node, "dim" if dim is not None else None, "keepdim", mode="none")


def _var(ctx, node):
    corr = ctx.arg(node, "correction", None)
    unbiased = ctx.arg(node, "unbiased", None) if corr is None else None
    biased = (corr is not None and float(corr) == 0.0) or unbiased is False
    if overload(node) == "correction" and corr is None:
        biased = False  # correction=None means the default, 1
    _reduce(ctx, node, "dim", "keepdim", mode="mean" if biased else "pin")


register_rule(aten.var, aten.std, aten.var_mean, aten.std_mean)(_var)


@register_rule(aten._softmax.default, aten.softmax.int, aten._log_softmax.default,
               aten.log_softmax.int, aten._safe_softmax.default)
def _softmax(ctx, node):
    src = ctx.dims(node.args[0])
    d = norm_dim(ctx.arg(node, "dim"), len(src))
    ctx.pin(src[d], f"softmax over it at {ctx.where(node)} (not invariant to duplicating units)")
    ctx.set_out(node, src)


# -- normalisation layers ------------------------------------------------------------------------
def _ln_axes(rw, node):
    src = rw.dims(node.args[0])
    k = len(rw.arg(node, "normalized_shape"))
    return src[len(src) - k :]


def _layer_norm_like(ctx, node, has_bias=True):
    src = ctx.dims(ctx.arg(node, "input"))
    k = len(ctx.arg(node, "normalized_shape"))
    axes = src[len(src) - k :]
    for d in axes:
        ctx.normalized(d, node)
    for name in ("weight", "bias") if has_bias else ("weight",):
        p = ctx.arg(node, name, None)
        if isinstance(p, Node):
            ctx.unify_all(ctx.dims(p), axes, node)
    return src, axes


@register_rule(aten.layer_norm.default, rewrite=shape_entries_rewrite("normalized_shape", _ln_axes))
def _layer_norm(ctx, node):
    src, _ = _layer_norm_like(ctx, node)
    ctx.set_out(node, src)


@register_rule(aten.native_layer_norm.default,
               rewrite=shape_entries_rewrite("normalized_shape", _ln_axes))
def _native_layer_norm(ctx, node):
    src, axes = _layer_norm_like(ctx, node)
    out = ctx.out_fresh(node)
    stats = [src[i] if i < len(src) - len(axes) else out[1][i] for i in range(len(src))]
    ctx.set_out(node, [src, stats, stats])


@register_rule(aten.rms_norm.default, rewrite=shape_entries_rewrite("normalized_shape", _ln_axes))
def _rms_norm(ctx, node):
    src, _ = _layer_norm_like(ctx, node, has_bias=False)
    ctx.set_out(node, src)


def _group_norm_rewrite(rw, node):
    g = rw.record(node, "groups_dim")
    if g is None:
        return None
    n = rw.new_size(g)
    return replace_args(num_groups=n) if n != rw.arg(node, "num_groups") else None


@register_rule(aten.group_norm.default, rewrite=_group_norm_rewrite)
def _group_norm(ctx, node):
    src = ctx.dims(ctx.arg(node, "input"))
    groups = ctx.arg(node, "num_groups")
    c = src[1]
    for name in ("weight", "bias"):
        p = ctx.arg(node, name, None)
        if isinstance(p, Node):
            ctx.unify(ctx.dims(p)[0], c, node)
    per = c.size // groups
    if groups > 1 and per > 1:
        parts = ctx.refine(c, PROD, [ctx.table.new(groups), ctx.table.new(per)], node)
        if parts is None:
            ctx.pin(c, f"group norm over a structured axis at {ctx.where(node)}")
        else:
            ctx.normalized(parts[1], node)
            ctx.record(node, groups_dim=parts[0])
    elif groups == 1:
        ctx.normalized(c, node)
    else:
        ctx.record(node, groups_dim=c)
    for s in src[2:]:
        ctx.normalized(s, node)
    ctx.set_out(node, src)


def _bn_params(ctx, node, names):
    src = ctx.dims(ctx.arg(node, "input"))
    c = src[1] if len(src) > 1 else src[0]
    for name in names:
        p = ctx.arg(node, name, None)
        if isinstance(p, Node):
            ctx.unify(ctx.dims(p)[0], c, node)
    return src, c


@register_rule(aten.batch_norm.default, aten.instance_norm.default)
def _batch_norm(ctx, node):
    src, _ = _bn_params(ctx, node, ("weight", "bias", "running_mean", "running_var"))
    _pin_statistics_axes(ctx, node, src)
    ctx.set_out(node, src)


def _pin_statistics_axes(ctx, node, src) -> None:
    """The axes a batch/instance norm takes its statistics over (all but the channel axis 1;
    batch and positions for activations) are pinned. Resizing one would not be undone exactly:
    a split consumer (each part ``v/k``) is normalised back to ``v``'s scale, and the eps inside
    the root does not scale with it; that is weight standardisation (timm's ``StdConv2d`` /
    ``ScaledStdConv2d``: ``F.batch_norm(w.reshape(1, out, -1), None, None, training=True)``,
    normalising each output channel over its input channels)."""
    for i, d in enumerate(src):
        if i != 1 and d is not None:
            ctx.pin(d, f"normalised over (batch/instance-norm statistics; weight standardisation "
                       f"when the input is a weight) at {ctx.where(node)}")


@register_rule(aten._native_batch_norm_legit_functional.default,
               aten._native_batch_norm_legit_no_training.default,
               aten._native_batch_norm_legit.default, aten.native_batch_norm.default,
               aten._native_batch_norm_legit.no_stats)
def _native_batch_norm(ctx, node):
    src, c = _bn_params(ctx, node, ("weight", "bias", "running_mean", "running_var"))
    out = ctx.out_fresh(node)
    res = [src]
    for o in out[1:]:
        if isinstance(o, list) and len(o) == 1:
            ctx.unify(o[0], c, node)
            res.append([c])
        else:
            res.append(o)
    ctx.set_out(node, res)


# -- pooling -----------------------------------------------------------------------------------
_POOL = [aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default,
         aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default,
         aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default,
         aten.adaptive_avg_pool3d.default, aten.adaptive_max_pool2d.default,
         aten.max_pool2d_with_indices.default, aten._adaptive_avg_pool2d.default,
         aten.upsample_nearest1d, aten.upsample_nearest2d, aten.upsample_bilinear2d]


@register_rule(*_POOL)  # every overload of the upsampling families (.vec and the sized one)
def _pool(ctx, node):
    """Spatial pooling/resampling: batch and channel axes pass through; positions are new."""
    src = ctx.dims(node.args[0])
    out = ctx.out_fresh(node)
    outs = out if isinstance(out[0], list) else [out]
    lead = len(src) - _spatial_rank(node)
    for o in outs:
        for i in range(lead):
            ctx.unify(src[i], o[i], node)
            o[i] = src[i]
        for s in o[lead:]:
            ctx.pin(s, f"pooled positions at {ctx.where(node)}")
    for s in src[lead:]:
        ctx.pin(s, f"pooled positions at {ctx.where(node)}")
    ctx.set_out(node, outs if isinstance(out[0], list) else outs[0])


def _spatial_rank(node: Node) -> int:
    name = str(op_of(node))
    return 1 if "1d" in name else 3 if "3d" in name else 2
