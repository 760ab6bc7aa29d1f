"""Identity blocks: which tensors of a residual block to zero so that it computes the identity.

A residual block adds branches to the value it reads (``x + attn(..) + mlp(..)``); zeroing the
last parameterised write of every branch (a projection's weight and bias, a layer scale, the
experts' last projection) makes each branch exactly zero, so the block returns ``x``. The depth
pass uses the set for ``depth_init="identity"``; a block whose output does not carry its input
through (a norm after the residual sum: post-norm) has no such set and the search says where.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from vcyclefx.analysis.chains import chained_input
from vcyclefx.analysis.ownership import relname
from vcyclefx.fx.args import get_arg
from vcyclefx.errors import PlanError

from vcyclefx.fx.ops import ADD, KEEPS_NONNEGATIVE, LINEAR, MUL, NONNEGATIVE, RELU, REARRANGING, SCALE

aten = torch.ops.aten

_AFFINE = {aten.linear.default: ("weight", "bias"), aten.addmm.default: ("mat2", "self"),
           aten.conv1d.default: ("weight", "bias"), aten.conv2d.default: ("weight", "bias"),
           aten.conv3d.default: ("weight", "bias"), aten.convolution.default: ("weight", "bias"),
           aten.batch_norm.default: ("weight", "bias"), aten.layer_norm.default: ("weight", "bias"),
           aten.group_norm.default: ("weight", "bias"), aten.rms_norm.default: ("weight",),
           aten.mm.default: ("mat2",), aten.matmul.default: ("other",)}


def _nonneg(n) -> bool:
    if not isinstance(n, Node) or n.op != "call_function":
        return False
    if n.target in NONNEGATIVE:
        return True
    if n.target in KEEPS_NONNEGATIVE:
        return _nonneg(n.args[0])
    return False


# grouped (per-expert) matmuls: the argument holding the weights
_GROUPED = {"aten::_grouped_mm": "mat2", "transformers::grouped_mm_fallback": "weight"}


def _grouped_weight(node: Node):
    schema = getattr(node.target, "_schema", None)
    arg = _GROUPED.get(schema.name) if schema is not None else None
    return get_arg(node, arg, None) if arg else None


def _constant(x, block: str) -> bool:
    """A number, or a tensor that is no parameter of the block (a lifted constant)."""
    if not isinstance(x, Node):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and x != 0
    return x.op == "get_attr" and _param_of(x, block) is None


def _param_of(x, block: str | tuple[str, ...]) -> str | None:
    """Relative name of the block tensor ``x`` is (through views, casts, unsqueezes); for a
    period of blocks (a tuple of paths), its full name when it is a tensor of one of them."""
    while isinstance(x, Node) and x.op == "call_function" and x.target in REARRANGING:
        x = x.args[0]
    if isinstance(x, Node) and x.op == "get_attr":
        if isinstance(block, tuple):
            return x.target if any(relname(x.target, b) is not None for b in block) else None
        return relname(x.target, block)
    return None


def _zero_branch(b: Node, block: str, where: str, within: frozenset = frozenset()) -> list[str]:
    """Tensors to zero so that the residual branch ``b`` is exactly zero (``within``: the
    block's nodes; a search that leaves them fails)."""
    node = b
    while isinstance(node, Node) and node.op == "call_function" and node.target in LINEAR:
        node = node.args[0]
    if not isinstance(node, Node) or node.op != "call_function" or (within and node not in within):
        raise PlanError(f"{where}: cannot find the last parameterised op writing into the residual")
    grouped = _grouped_weight(node)
    if grouped is not None and (r := _param_of(grouped, block)) is not None:
        return [r]  # the experts' last projection: every expert writes zero
    if node.target in _AFFINE:
        names = [r for arg in _AFFINE[node.target]
                 if (r := _param_of(get_arg(node, arg, None), block)) is not None]
        if names:
            return names
    if node.target is aten.mul.Tensor:  # a layer scale (gamma * x): zero gamma
        params = [r for a in node.args[:2] if (r := _param_of(a, block)) is not None]
        if params:
            return params[:1]
    if node.target in SCALE:  # a constant residual scale (c * branch, branch / c): zero the branch
        branch = [a for a in node.args[:2] if not _constant(a, block)]
        if len(branch) == 1 and (node.target in MUL or branch[0] is node.args[0]):
            return _zero_branch(branch[0], block, where, within)
        if node.target in MUL and len(branch) == 2:  # gate * branch (routing weights): zero a factor
            for factor in branch:
                try:
                    return _zero_branch(factor, block, where, within)
                except PlanError:
                    continue
    if node.target in ADD:
        a, c = node.args[0], node.args[1]
        params = [r for x in (a, c) if (r := _param_of(x, block)) is not None]
        others = [x for x in (a, c) if isinstance(x, Node) and _param_of(x, block) is None]
        if len(params) == 1 and len(others) == 1:  # branch + bias
            return params + _zero_branch(others[0], block, where, within)
        if not params and len(others) == 2:  # parallel branches (GPT-NeoX, Phi): zero both
            return (_zero_branch(others[0], block, where, within)
                    + _zero_branch(others[1], block, where, within))
    raise PlanError(
        f"{where}: the residual branch ends in {node.target} at node {node.name}, which vcyclefx "
        "cannot zero; use depth_init='copy'"
    )


def identity_zero_set(nodes: list[Node], block: str | tuple[str, ...], chained) -> list[str]:
    """Relative names of the tensors whose zeroing makes ``block`` the identity on its chained
    values; raises PlanError (naming the node) when the block is not residual (post-norm...).
    ``block`` may be a period of blocks (a tuple of their paths, ``nodes`` all of theirs): the
    names are then full tensor names."""
    zero: list[str] = []
    for link in chained:
        x, cur = chained_input(nodes, link), nodes[link[2]]
        memo: dict = {}
        where = (f"depth_init='identity' on block {block}" if isinstance(block, str) else
                 f"depth_init='identity' on the period of blocks {', '.join(block)}")
        while cur is not x:
            if not isinstance(cur, Node) or cur.op != "call_function":
                raise PlanError(f"{where}: the block output does not come from its input")
            if cur.target in ADD and len(cur.all_input_nodes) == 2:
                a, b = cur.args[0], cur.args[1]
                path, branch = (a, b) if _on_skip(a, x, memo) else (b, a)
                if not _on_skip(path, x, memo):
                    raise PlanError(f"{where}: node {cur.name} adds two values that do not carry "
                                    "the block input through (a normalisation after the residual "
                                    "sum: post-norm block?); use depth_init='copy'")
                zero.extend(_zero_branch(branch, block, where, frozenset(nodes)))
                cur = path
            elif cur.target in REARRANGING:
                cur = cur.args[0]
            elif cur.target in RELU and _nonneg(x):
                cur = cur.args[0]  # relu(x + 0) = x because x >= 0 (it came out of a relu)
            else:
                raise PlanError(
                    f"{where}: the block output passes through {cur.target} at node {cur.name}, "
                    "so zeroing its residual branches does not give the identity (post-norm "
                    "block?); use depth_init='copy'"
                )
    return sorted(set(zero))


def _on_skip(n, x: Node, memo: dict) -> bool:
    """``n`` carries ``x`` through unchanged apart from added branches (the skip connection)."""
    if n is x:
        return True
    if not isinstance(n, Node) or n.op != "call_function":
        return False
    if n not in memo:
        memo[n] = False
        if n.target in REARRANGING:
            memo[n] = _on_skip(n.args[0], x, memo)
        elif n.target in ADD:
            memo[n] = any(_on_skip(a, x, memo) for a in n.args[:2])
        elif n.target in RELU and _nonneg(x):
            memo[n] = _on_skip(n.args[0], x, memo)
    return memo[n]
