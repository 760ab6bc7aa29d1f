"""Op sets the passes (and the analysis' index tracing) reason with, each in one place.

The sets name what an op does to the values it passes on, which is all a pass needs to know to
look through it: a scale factor moves through a linear op, a zero stays a zero, a sign stays a
sign. Each set is written once here; the passes combine them instead of keeping copies.
"""

from __future__ import annotations

import torch

aten = torch.ops.aten

# the same values in the same order, a new shape
VIEWS = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default})
# the same values, maybe another dtype or memory format
COPIES = frozenset({
    aten.clone.default, aten.contiguous.default, aten.alias.default, aten._to_copy.default,
    aten.to.dtype, aten.to.dtype_layout,
})
# ops whose output is their first input's values moved, copied, cast, broadcast or dropped out
# (every value out is an input value, or zero, times a non-negative constant): a scale factor,
# a zero and a sign all pass through them
REARRANGING = VIEWS | COPIES | frozenset({
    aten.transpose.int, aten.permute.default, aten.unsqueeze.default, aten.squeeze.dim,
    aten.flatten.using_ints, aten.unflatten.int, aten.t.default, aten.numpy_T.default,
    aten.expand.default, aten.dropout.default,
})
# linear ops of their first input: a zero input gives a zero output, a scale factor commutes
# (crops, shifts, zero padding, indexing, sums: e.g. the sum of a token's top-k expert outputs)
LINEAR = REARRANGING | frozenset({
    aten.slice.Tensor, aten.roll.default, aten.narrow.default, aten.select.int,
    aten.constant_pad_nd.default, aten.index.Tensor, aten.to.device,
    aten.sum.dim_IntList, aten.mean.dim,
})
# ops that read a value only to check it (export's metadata assertions): not a use of the value
CHECKS = frozenset({aten._assert_tensor_metadata.default})


def value_users(node) -> list:
    """The users of ``node`` that use its value (not the assertions export adds after casts)."""
    return [u for u in node.users if not (u.op == "call_function" and u.target in CHECKS)]


# ops whose output is never negative
NONNEGATIVE = frozenset({
    aten.relu.default, aten.relu_.default, aten.sigmoid.default, aten.exp.default,
    aten.abs.default, aten.softmax.int, aten._softmax.default, aten.relu6.default,
})
# ops whose output is non-negative when their first input is (pools, and REARRANGING)
KEEPS_NONNEGATIVE = REARRANGING | frozenset({
    aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default,
    aten.adaptive_avg_pool2d.default, aten.avg_pool2d.default,
})
RELU = frozenset({aten.relu.default, aten.relu_.default})
ADD = frozenset({aten.add.Tensor, aten.add_.Tensor})
MUL = frozenset({aten.mul.Tensor, aten.mul.Scalar})
SCALE = MUL | frozenset({aten.div.Tensor, aten.div.Scalar})
NORMS = frozenset({aten.layer_norm.default, aten.rms_norm.default})
