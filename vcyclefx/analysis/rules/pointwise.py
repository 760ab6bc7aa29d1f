"""Elementwise ops: outputs have the (broadcast) axes of their tensor inputs.

Only functional overloads are listed: an in-place (``relu_``, ``add_``) or ``out=`` overload
gets its functional op's rule from the registry, with its output tied to the argument written.
"""

from __future__ import annotations

from vcyclefx.analysis.registry import register_rule
from vcyclefx.analysis.rules._util import aten, broadcast_into, tensor_args

_UNARY = """
relu gelu silu tanh sigmoid exp log log1p expm1 neg abs sqrt rsqrt reciprocal sin cos erf
softplus hardtanh leaky_relu hardswish hardsigmoid mish elu celu selu relu6 square clone
contiguous detach alias lift_fresh_copy _to_copy clamp clamp_min clamp_max clip floor ceil round
trunc sign logical_not bitwise_not isnan isinf nan_to_num fill zeros_like ones_like empty_like
full_like rand_like randn_like dropout feature_dropout alpha_dropout feature_alpha_dropout rrelu
type_as bernoulli exponential uniform normal_ zero sgn frac erfinv atan asin acos sinh cosh asinh
acosh atanh tan log2 log10 exp2 threshold positive logit expand_as to alias_copy detach_copy
""".split()  # normal_ (in place) has no functional overload with its arguments

_BROADCAST = """
add sub rsub mul div pow maximum minimum fmax fmin eq ne lt le gt ge logical_and logical_or
logical_xor bitwise_and bitwise_or bitwise_xor __and__ __or__ __xor__ where masked_fill lerp
addcmul addcdiv fmod remainder atan2 hypot xlogy floor_divide copy
""".split()


def _expand_targets(names: list[str]) -> list:
    """Every overload of the named aten ops that exist in this torch build, less those that
    write into an argument (in-place and out= forms, derived by the registry), except for ops
    that exist only in place."""
    out = []
    for name in names:
        packet = getattr(aten, name, None)
        if packet is not None:
            ops_ = [getattr(packet, o) for o in packet.overloads()]
            if not name.endswith("_"):
                ops_ = [o for o in ops_ if not any(a.alias_info is not None and a.alias_info.is_write
                                                    for a in o._schema.arguments)]
            out.extend(ops_)
    return list(dict.fromkeys(out))


_BROADCAST_T = _expand_targets(_BROADCAST) + [aten.clamp.Tensor, aten.min.other, aten.max.other]
_UNARY_T = [t for t in _expand_targets(_UNARY) if t not in _BROADCAST_T]
_BROADCAST_T = [t for t in _BROADCAST_T if str(t) != "aten.where.default"]


@register_rule(*_UNARY_T)
def _unary(ctx, node):
    """Output axes are the first tensor input's axes (also for tuple-free in-place forms)."""
    ins = tensor_args(node)
    if not ins:
        ctx.out_fresh(node)
        return
    src = ctx.dims(ins[0])
    out = ctx.out_fresh(node)
    if isinstance(out, list) and isinstance(src, list) and [d.size for d in out] == [d.size for d in src]:
        ctx.set_out(node, src)  # same shape, same axes: share the Dim objects
    elif isinstance(out, list):
        broadcast_into(ctx, node, out, ins[:1])


@register_rule(*_BROADCAST_T)
def _broadcast(ctx, node):
    out = ctx.out_fresh(node)
    if isinstance(out, list):
        broadcast_into(ctx, node, out, tensor_args(node))


@register_rule(aten.native_dropout.default)
def _native_dropout(ctx, node):
    src = ctx.arg_dims(node, "input")
    ctx.set_out(node, [src, src])
