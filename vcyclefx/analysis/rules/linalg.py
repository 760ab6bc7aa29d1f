"""Contractions: linear, matmul family, einsum, convolutions, attention."""

from __future__ import annotations

from torch.fx import Node

from vcyclefx.analysis.dims import PROD
from vcyclefx.fx.args import replace_args
from vcyclefx.analysis.registry import op_of, register_rule
from vcyclefx.analysis.rules._util import aten, broadcast_into, family


@register_rule(aten.linear.default)
def _linear(ctx, node):
    x = ctx.arg(node, "input")
    w = ctx.arg(node, "weight")
    b = ctx.arg(node, "bias")
    xd, wd = ctx.dims(x), ctx.dims(w)
    ctx.unify(xd[-1], wd[-1], node)
    out = list(xd[:-1]) + ([wd[0]] if len(wd) == 2 else [])
    ctx.set_out(node, out)
    if isinstance(b, Node) and len(wd) == 2:
        ctx.unify(ctx.dims(b)[-1], wd[0], node)
    ctx.contract(node, [(w, len(wd) - 1), (x, len(xd) - 1)])


def _mm_like(ctx, node, a, b):
    ad, bd = ctx.dims(a), ctx.dims(b)
    ctx.unify(ad[-1], bd[-2], node)
    batch_a, batch_b = ad[:-2], bd[:-2]
    out = ctx.out_fresh(node)
    n = len(out)
    # batch axes broadcast
    for dims in (batch_a, batch_b):
        off = (n - 2) - len(dims)
        for j, d in enumerate(dims):
            if d.size != 1 and out[off + j].size == d.size:
                ctx.unify(d, out[off + j], node)
    ctx.unify(ad[-2], out[-2], node)
    ctx.unify(bd[-1], out[-1], node)
    ctx.contract(node, [(b, len(bd) - 2), (a, len(ad) - 1)])
    return out


@register_rule(aten.mm, aten.bmm)  # also their out_dtype= overloads (mm.dtype)
def _mm(ctx, node):
    _mm_like(ctx, node, ctx.arg(node, "self"), ctx.arg(node, "mat2"))


@register_rule(aten.addmm, aten.baddbmm)
def _addmm(ctx, node):
    a = ctx.arg(node, "mat1") if family(node) == "addmm" else ctx.arg(node, "batch1")
    b = ctx.arg(node, "mat2") if family(node) == "addmm" else ctx.arg(node, "batch2")
    out = _mm_like(ctx, node, a, b)
    broadcast_into(ctx, node, out, [ctx.arg(node, "self")])


@register_rule(aten.matmul.default)
def _matmul(ctx, node):
    a, b = ctx.arg(node, "self"), ctx.arg(node, "other")
    ad, bd = ctx.dims(a), ctx.dims(b)
    if len(ad) >= 2 and len(bd) >= 2:
        _mm_like(ctx, node, a, b)
        return
    out = ctx.out_fresh(node)
    if len(ad) == 1 and len(bd) == 1:
        ctx.unify(ad[0], bd[0], node)
        ctx.contract(node, [(b, 0), (a, 0)])
    elif len(ad) == 1:  # (k) @ (..., k, n)
        ctx.unify(ad[0], bd[-2], node)
        ctx.unify(bd[-1], out[-1], node)
        ctx.contract(node, [(b, len(bd) - 2), (a, 0)])
    else:  # (..., m, k) @ (k)
        ctx.unify(ad[-1], bd[0], node)
        ctx.unify(ad[-2], out[-1], node)
        ctx.contract(node, [(b, 0), (a, len(ad) - 1)])


@register_rule(aten.einsum.default)
def _einsum(ctx, node):
    eq = ctx.arg(node, "equation").replace(" ", "")
    operands = ctx.arg(node, "tensors")
    lhs, _, rhs = eq.partition("->")
    terms = lhs.split(",")
    if "..." in eq:
        raise ValueError("einsum with '...' is not supported yet")
    letters: dict[str, list[tuple[Node, int]]] = {}
    for term, op in zip(terms, operands):
        for ax, ch in enumerate(term):
            letters.setdefault(ch, []).append((op, ax))
    out = ctx.out_fresh(node)
    for ch, uses in letters.items():
        first = ctx.dims(uses[0][0])[uses[0][1]]
        for op, ax in uses[1:]:
            d = ctx.dims(op)[ax]
            if d.size != 1 and first.size != 1:
                ctx.unify(first, d, node)
        if ch in rhs:
            ctx.unify(first, out[rhs.index(ch)], node)
        elif len(uses) > 1:
            params = sorted(uses, key=lambda u: u[0] not in ctx.prov)
            ctx.contract(node, params)
        else:
            ctx.pin(first, f"summed by einsum at {ctx.where(node)}")


# -- convolutions ------------------------------------------------------------------------------------
_CONV = [aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default,
         aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding]
_CONV_T = [aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input]


def _conv_rewrite(rw, node):
    g = rw.record(node, "groups_dim")
    if g is None:
        return None
    n = rw.new_size(g)
    return replace_args(groups=n) if n != rw.arg(node, "groups") else None


@register_rule(*_CONV, *_CONV_T, rewrite=_conv_rewrite)
def _conv(ctx, node):
    x, w, b = ctx.arg(node, "input"), ctx.arg(node, "weight"), ctx.arg(node, "bias")
    transposed = op_of(node) in _CONV_T or (
        op_of(node) is aten.convolution.default and ctx.arg(node, "transposed")
    )
    groups = ctx.arg(node, "groups", 1)
    xd, wd = ctx.dims(x), ctx.dims(w)
    out = ctx.out_fresh(node)
    batched = len(xd) == len(wd)
    ch = 1 if batched else 0
    if batched:
        ctx.unify(xd[0], out[0], node)
    # weight: (out, in/g, *k) normally, (in, out/g, *k) transposed
    w_in, w_out = (0, 1) if transposed else (1, 0)
    c_in, c_out = xd[ch], out[ch]
    for k in wd[2:]:
        ctx.pin(k, f"convolution kernel window at {ctx.where(node)}")
    for s in out[ch + 1 :]:
        ctx.pin(s, f"convolution output position at {ctx.where(node)}")
    if b is not None:
        ctx.unify(ctx.dims(b)[0], c_out, node)
    if groups == 1:
        ctx.unify(c_in, wd[w_in], node)
        ctx.unify(c_out, wd[w_out], node)
        ctx.contract(node, [(w, w_in), (x, ch)])
        return
    g = ctx.table.new(groups)
    in_per, out_per = c_in.size // groups, c_out.size // groups
    # channels are group-major: (g, per-group)
    in_parts = ctx.refine(c_in, PROD, [g, ctx.table.new(in_per)], node) if in_per > 1 else None
    if in_per > 1 and in_parts is None:
        ctx.pin(c_in, f"grouped convolution over a structured axis at {ctx.where(node)}")
        return
    if in_parts is None:
        ctx.unify(c_in, g, node)
    if transposed:
        w_in_dim = wd[0]  # (in, out/g)
        ctx.unify(w_in_dim, c_in, node)
        if out_per > 1:
            ctx.refine(c_out, PROD, [g, wd[1]], node)
        else:
            ctx.unify(c_out, g, node)
    else:
        # weight rows are the output channels; its in axis holds one group's inputs
        ctx.unify(wd[0], c_out, node)
        if out_per > 1:
            ctx.refine(c_out, PROD, [g, ctx.table.new(out_per)], node)
        else:
            ctx.unify(c_out, g, node)
        if in_per > 1:
            ctx.unify(wd[1], in_parts[1], node)
            ctx.contract(node, [(w, 1), (x, ch)])
    ctx.record(node, groups_dim=g)


# -- attention ------------------------------------------------------------------------------------------
@register_rule(aten.scaled_dot_product_attention.default)
def _sdpa(ctx, node):
    q, k, v = ctx.arg(node, "query"), ctx.arg(node, "key"), ctx.arg(node, "value")
    qd, kd, vd = ctx.dims(q), ctx.dims(k), ctx.dims(v)
    out = ctx.out_fresh(node)
    n = len(out)
    # leading batch axes broadcast
    for dims in (qd, kd, vd):
        off = n - len(dims)
        for j, d in enumerate(dims[:-3]):
            if d.size != 1 and out[off + j].size == d.size:
                ctx.unify(d, out[off + j], node)
    hq, hk, hv = qd[-3], kd[-3], vd[-3]
    ctx.unify(hk, hv, node)
    if hq.size == hk.size:
        ctx.unify(hq, hk, node)
    elif hk.size != 1:
        rep = ctx.table.new(hq.size // hk.size)
        ctx.refine(hq, PROD, [hk, rep], node)  # enable_gqa: query heads grouped by kv head
        ctx.replica(rep, node)
    ctx.unify(out[-3], hq, node)
    ctx.unify(qd[-2], out[-2], node)  # query positions
    ctx.unify(kd[-2], vd[-2], node)  # key positions
    ctx.pin(kd[-2], f"attended over (softmax over key positions) at {ctx.where(node)}")
    # head_dim: contracted by q·kᵀ and it sets the attention scale (1/sqrt(head_dim) unless
    # `scale=` is given), so it is pinned whatever q and k come from. It is pinned here, not
    # through ctx.contract: a query made from a parameter (a learned pooling query) would make
    # the contraction "parameter against activation" and give the projection rows that make q
    # a consumer role on head_dim (split instead of copied), next to their producer role on the
    # heads. Value heads are kept as wide as query/key heads (flash kernels need Ev == E).
    ctx.unify(qd[-1], kd[-1], node)
    ctx.unify(vd[-1], qd[-1], node)
    ctx.unify(out[-1], vd[-1], node)
    ctx.pin(qd[-1], f"head_dim: contracted by q·kᵀ, sets the attention scale at {ctx.where(node)}")
    mask = ctx.arg(node, "attn_mask")
    if isinstance(mask, Node):
        md = ctx.dims(mask)
        full = list(out[:-1]) + [kd[-2]]
        off = len(full) - len(md)
        for j, d in enumerate(md):
            if d.size != 1 and full[off + j].size == d.size:
                ctx.unify(d, full[off + j], node)
