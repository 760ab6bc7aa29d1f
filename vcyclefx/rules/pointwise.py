"""Elementwise ops: outputs have the (broadcast) axes of their tensor inputs."""

from __future__ import annotations

from ..registry import register_rule
from ._util import aten, broadcast_into, tensor_args

_UNARY = """
relu relu_ gelu gelu_ silu silu_ tanh tanh_ sigmoid sigmoid_ exp exp_ log log1p expm1 neg abs
sqrt rsqrt reciprocal sin cos erf softplus hardtanh hardtanh_ leaky_relu leaky_relu_ hardswish
hardswish_ hardsigmoid hardsigmoid_ mish elu elu_ celu selu relu6 square clone contiguous detach
alias lift_fresh_copy _to_copy clamp clamp_ clamp_min clamp_max floor ceil round trunc sign
logical_not bitwise_not isnan isinf nan_to_num fill fill_ zeros_like ones_like empty_like
full_like rand_like randn_like dropout feature_dropout alpha_dropout feature_alpha_dropout
dropout_ feature_dropout_ alpha_dropout_ feature_alpha_dropout_ rrelu rrelu_ sigmoid_ silu_
type_as bernoulli bernoulli_ exponential_ uniform_ normal_ zero_ sgn frac erfinv atan asin acos
sinh cosh asinh acosh atanh tan log2 log10 exp2 threshold positive logit view_as expand_as to
""".split()

_BROADCAST = """
add add_ sub sub_ rsub mul mul_ div div_ pow pow_ maximum minimum fmax fmin eq ne lt le gt ge
logical_and logical_or logical_xor bitwise_and bitwise_or bitwise_xor __and__ __or__ __xor__
where masked_fill masked_fill_ lerp lerp_ addcmul addcmul_ addcdiv addcdiv_ fmod remainder atan2
hypot xlogy floor_divide copy copy_ masked_scatter
""".split()


def _expand_targets(names: list[str]) -> list:
    """Every overload of the named aten ops that exist in this torch build."""
    out = []
    for name in names:
        packet = getattr(aten, name, None)
        if packet is not None:
            out.extend(getattr(packet, o) for o in packet.overloads())
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
