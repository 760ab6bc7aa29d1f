"""Weight re-parametrisations: ``aten._weight_norm`` and ``aten._weight_norm_interface``.

``torch.nn.utils.parametrizations.weight_norm`` computes ``w = g * v / ||v||`` with the norm
over every axis of ``v`` except ``dim`` (all axes for ``dim=-1``); ``g`` has ``v``'s shape with
size 1 everywhere but ``dim``. The output's axes are ``v``'s, and ``g``'s ``dim`` axis is the
output's ``dim`` axis, so ``v`` and ``g`` take the roles of ``w`` through its uses. Resizing an
axis inside the norm changes ``||v||``; the width pass compensates it (passes/weight_norm.py),
from the axes recorded here.
"""

from __future__ import annotations

from vcyclefx.analysis.registry import register_rule
from vcyclefx.analysis.rules._util import aten, family, norm_dim


@register_rule(aten._weight_norm, aten._weight_norm_interface)
def _weight_norm(ctx, node):
    v, g = ctx.arg(node, "v"), ctx.arg(node, "g")
    vd, gd = ctx.dims(v), ctx.dims(g)
    dim = ctx.arg(node, "dim", 0)
    keep = None if dim == -1 else norm_dim(dim, len(vd))  # -1: one norm over the whole of v
    if keep is not None and len(gd) == len(vd):
        ctx.unify(gd[keep], vd[keep], node)
    elif keep is not None and len(gd) == 1:
        ctx.unify(gd[0], vd[keep], node)
    ctx.record(node, weight_norm=[i for i in range(len(vd)) if i != keep])
    pair = family(node) == "_weight_norm_interface"  # (w, norms); norms has g's shape
    ctx.set_out(node, [list(vd), list(gd)] if pair else list(vd))
