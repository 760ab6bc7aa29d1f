"""The depth pass: coalesce or de-coalesce the blocks of chains.

Coalescing replaces each group of blocks by one block whose tensors are the group's mean;
de-coalescing replaces each block by its group of blocks, copies of it (``depth_init="copy"``,
the paper) or, after the first, blocks whose last writes into the residual stream are zero
(``depth_init="identity"``), so they compute the identity and the model its old function.

The new graph is built from one template block (the first block of the input chain): nodes
that do not depend on the chain come first, then the new blocks (each a copy of the template
with its own parameters, named ``<container>.<prefix><j>`` so the level's state_dict looks like
a smaller/larger instance of the user's model), then the nodes that read the chain's output.
A shared chain's new blocks are applications ``<module>@<j>`` of the one module: they read the
same tensors, so its weights are kept as they are (the mean of a group of identical tensors).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
from torch.fx import Graph, GraphModule, Node

from vcyclefx.analysis.analyze import Analysis
from vcyclefx.analysis.chains import _relname, chained_input, is_application, module_path, ownership
from vcyclefx.errors import PlanError
from vcyclefx.plan.mapping import ChainMap
from vcyclefx.analysis.registry import get_arg

from passes.common import PassResult, check_graph, fetch_attr, nonpersistent_buffers, rebuild

aten = torch.ops.aten
COALESCE = "coalesce"
DECOALESCE = "decoalesce"


@dataclass(frozen=True)
class DepthPlan:
    direction: str  # COALESCE or DECOALESCE
    chains: tuple[ChainMap, ...]
    depth_init: str | None = None  # overrides each ChainMap's depth_init when de-coalescing


# ---------------------------------------------------------------------------------------------
# identity blocks: which tensors to zero
# ---------------------------------------------------------------------------------------------
_PASS_THROUGH = {
    aten.dropout.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
    aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.view.default,
    aten.reshape.default, aten._unsafe_view.default, aten.transpose.int, aten.permute.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.flatten.using_ints, aten.unflatten.int,
    aten.t.default, aten.numpy_T.default, aten.expand.default,
}
_NONNEG = {aten.relu.default, aten.relu_.default, aten.sigmoid.default, aten.exp.default,
           aten.abs.default, aten.softmax.int, aten._softmax.default, aten.relu6.default}
_NONNEG_IF_INPUT = {aten.max_pool2d.default, aten.max_pool1d.default, aten.max_pool3d.default,
                    aten.adaptive_avg_pool2d.default, aten.avg_pool2d.default} | _PASS_THROUGH
_ADD = {aten.add.Tensor, aten.add_.Tensor}
_AFFINE = {aten.linear.default: ("weight", "bias"), aten.addmm.default: ("mat2", "self"),
           aten.conv1d.default: ("weight", "bias"), aten.conv2d.default: ("weight", "bias"),
           aten.conv3d.default: ("weight", "bias"), aten.convolution.default: ("weight", "bias"),
           aten.batch_norm.default: ("weight", "bias"), aten.layer_norm.default: ("weight", "bias"),
           aten.group_norm.default: ("weight", "bias"), aten.rms_norm.default: ("weight",),
           aten.mm.default: ("mat2",), aten.matmul.default: ("other",)}


def _nonneg(n) -> bool:
    if not isinstance(n, Node) or n.op != "call_function":
        return False
    if n.target in _NONNEG:
        return True
    if n.target in _NONNEG_IF_INPUT:
        return _nonneg(n.args[0])
    return False


# linear ops that map a zero input to zero output (crops, shifts, zero padding, indexing)
_ZERO_PRESERVING = _PASS_THROUGH | {
    aten.slice.Tensor, aten.roll.default, aten.narrow.default, aten.select.int,
    aten.constant_pad_nd.default, aten.index.Tensor, aten.expand.default, aten.to.device,
    aten.sum.dim_IntList, aten.mean.dim,  # e.g. the sum of a token's top-k expert outputs
}
# grouped (per-expert) matmuls: the argument holding the weights
_GROUPED = {"aten::_grouped_mm": "mat2", "transformers::grouped_mm_fallback": "weight"}


def _grouped_weight(node: Node):
    schema = getattr(node.target, "_schema", None)
    arg = _GROUPED.get(schema.name) if schema is not None else None
    return get_arg(node, arg, None) if arg else None


_MUL = {aten.mul.Tensor, aten.mul.Scalar}
_SCALE = _MUL | {aten.div.Tensor, aten.div.Scalar}


def _constant(x, block: str) -> bool:
    """A number, or a tensor that is no parameter of the block (a lifted constant)."""
    if not isinstance(x, Node):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and x != 0
    return x.op == "get_attr" and _param_of(x, block) is None


def _param_of(x, block: str) -> str | None:
    """Relative name of the block tensor ``x`` is (through views, casts, unsqueezes)."""
    while isinstance(x, Node) and x.op == "call_function" and x.target in _PASS_THROUGH:
        x = x.args[0]
    if isinstance(x, Node) and x.op == "get_attr":
        return _relname(x.target, block)
    return None


def _zero_branch(b: Node, block: str, where: str, within: frozenset = frozenset()) -> list[str]:
    """Tensors to zero so that the residual branch ``b`` is exactly zero (``within``: the
    block's nodes; a search that leaves them fails)."""
    node = b
    while isinstance(node, Node) and node.op == "call_function" and node.target in _ZERO_PRESERVING:
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
    if node.target in _SCALE:  # a constant residual scale (c * branch, branch / c): zero the branch
        branch = [a for a in node.args[:2] if not _constant(a, block)]
        if len(branch) == 1 and (node.target in _MUL or branch[0] is node.args[0]):
            return _zero_branch(branch[0], block, where, within)
        if node.target in _MUL and len(branch) == 2:  # gate * branch (routing weights): zero a factor
            for factor in branch:
                try:
                    return _zero_branch(factor, block, where, within)
                except PlanError:
                    continue
    if node.target in _ADD:
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


def identity_zero_set(nodes: list[Node], block: str, chained) -> list[str]:
    """Relative names of the tensors whose zeroing makes ``block`` the identity on its chained
    values; raises PlanError (naming the node) when the block is not residual (post-norm...)."""
    zero: list[str] = []
    for link in chained:
        x, cur = chained_input(nodes, link), nodes[link[2]]
        memo: dict = {}
        where = f"depth_init='identity' on block {block}"
        while cur is not x:
            if not isinstance(cur, Node) or cur.op != "call_function":
                raise PlanError(f"{where}: the block output does not come from its input")
            if cur.target in _ADD and len(cur.all_input_nodes) == 2:
                a, b = cur.args[0], cur.args[1]
                path, branch = (a, b) if _on_skip(a, x, memo) else (b, a)
                if not _on_skip(path, x, memo):
                    raise PlanError(f"{where}: node {cur.name} adds two values that do not carry "
                                    "the block input through (a normalisation after the residual "
                                    "sum: post-norm block?); use depth_init='copy'")
                zero.extend(_zero_branch(branch, block, where, frozenset(nodes)))
                cur = path
            elif cur.target in _PASS_THROUGH:
                cur = cur.args[0]
            elif cur.target in (aten.relu.default, aten.relu_.default) and _nonneg(x):
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
        if n.target in _PASS_THROUGH:
            memo[n] = _on_skip(n.args[0], x, memo)
        elif n.target in _ADD:
            memo[n] = any(_on_skip(a, x, memo) for a in n.args[:2])
        elif n.target in (aten.relu.default, aten.relu_.default) and _nonneg(x):
            memo[n] = _on_skip(n.args[0], x, memo)
    return memo[n]


# ---------------------------------------------------------------------------------------------
# graph construction
# ---------------------------------------------------------------------------------------------
def _retarget_stack(meta: dict, old: str, new: str) -> dict:
    stack = meta.get("nn_module_stack")
    if not stack:
        return meta
    pat = re.compile(re.escape(old) + r"(?=\.|$)")
    out = {}
    for k, (path, typ) in stack.items():
        out[pat.sub(new, k, count=1)] = (pat.sub(new, path, count=1) if path == old or
                                         path.startswith(old + ".") else path, typ)
    meta = dict(meta)
    meta["nn_module_stack"] = out
    return meta


def _retarget_application(meta: dict, path: str, j: int) -> dict:
    """Stack keys of ``path`` and the modules inside it numbered as call ``j`` (``@j``, none for
    the first call), the way torch.export numbers repeated calls."""
    stack = meta.get("nn_module_stack")
    if not stack:
        return meta
    out = {}
    for k, (p, typ) in stack.items():
        if p == path or p.startswith(path + "."):
            k = re.sub(r"@\d+$", "", k) + (f"@{j}" if j else "")
        out[k] = (p, typ)
    meta = dict(meta)
    meta["nn_module_stack"] = out
    return meta


def _blocks(gm: GraphModule, paths: list[str]) -> list[list[Node]]:
    owned, _ = ownership(gm, applications=is_application(paths[0]))
    out = []
    for p in paths:
        if p not in owned:
            raise PlanError(f"block {p} is not in this model; the mapping was made for another model")
        out.append(owned[p])
    return out


def _rebuild_chain(graph: Graph, cm: ChainMap, src: list[str], dst: list[str], env: dict,
                   template: list[Node], src_params: set[str],
                   unused: list[Node] = ()) -> dict[Node, Node]:
    """Emit the ``dst`` blocks into ``graph``; returns template node -> node of the last block.
    ``unused``: the template block's tensors that no op reads (a dummy norm weight), given to
    every new block too, so that each block has the tensors of the user's block."""
    feeds = {chained_input(template, link): link[2] for link in cm_chained(cm)}
    block0 = src[0]
    prev: dict[Node, Node] | None = None
    for j, name in enumerate(dst):
        local: dict[Node, Node] = {}

        def arg(n: Node) -> Node:
            if n in local:
                return local[n]
            if n.op == "get_attr" and n.target in src_params and _relname(n.target, block0) is not None:
                new_target = f"{module_path(name)}.{_relname(n.target, block0)}"
                g = graph.get_attr(new_target)
                g.meta = dict(n.meta)
                local[n] = g
                return g
            if prev is not None and n in feeds:
                return prev[template[feeds[n]]]
            return env[n]

        for t in template:
            new = graph.node_copy(t, arg)
            new.meta = (_retarget_application(dict(t.meta), module_path(name), j)
                        if is_application(name) else _retarget_stack(dict(t.meta), block0, name))
            local[t] = new
        for n in unused:
            arg(n)
        prev = local
    assert prev is not None
    return prev


def cm_chained(cm: ChainMap) -> list[tuple[int, int, int]]:
    return [tuple(x) for x in cm.chained]


def _new_tensors(gm: GraphModule, cm: ChainMap, src: list[str], dst: list[str], direction: str,
                 depth_init: str, rel_names: list[str]) -> dict[str, torch.Tensor]:
    params = dict(gm.named_parameters(remove_duplicate=False))
    out: dict[str, torch.Tensor] = {}
    if is_application(src[0]):
        return out  # applications of one module: the mean of identical tensors is the tensor
    if direction == COALESCE:
        groups = cm.groups  # small block g <- large blocks groups[g]
        for g, members in enumerate(groups):
            for rel in rel_names:
                ts = [fetch_attr(gm, f"{src[i]}.{rel}").detach() for i in members]
                if ts[0].dtype.is_floating_point:
                    t = torch.stack(ts).sum(0) / len(ts) if len(ts) > 1 else ts[0].clone()
                else:
                    t = ts[0].clone()
                out[f"{dst[g]}.{rel}"] = _like(t, f"{src[members[0]]}.{rel}", params)
        return out
    zero = set(cm.zero_on_identity) if depth_init == "identity" else set()
    if depth_init == "identity" and not zero:
        raise PlanError(f"depth_init='identity' on chain {cm.container}: its blocks are not "
                        "residual (or the mapping predates identity support), so no tensor can be "
                        "zeroed to make a new block the identity; use depth_init='copy'")
    for g, members in enumerate(cm.groups):
        for k, i in enumerate(sorted(members)):
            for rel in rel_names:
                t = fetch_attr(gm, f"{src[g]}.{rel}").detach().clone()
                if k > 0 and rel in zero:
                    t = torch.zeros_like(t)
                out[f"{dst[i]}.{rel}"] = _like(t, f"{src[g]}.{rel}", params)
    return out


def _like(t: torch.Tensor, old_name: str, params: dict) -> torch.Tensor:
    if old_name in params:
        return torch.nn.Parameter(t, requires_grad=params[old_name].requires_grad)
    return t


def depth_pass(gm: GraphModule, analysis: Analysis, plan: DepthPlan) -> PassResult:
    cur = gm
    for cm in plan.chains:
        cur = _one_chain(cur, cm, plan)
    return PassResult(cur, list(plan.chains))


def _one_chain(gm: GraphModule, cm: ChainMap, plan: DepthPlan) -> GraphModule:
    if plan.direction == COALESCE:
        src, dst = cm.large_blocks, cm.small_blocks
    else:
        src, dst = cm.small_blocks, cm.large_blocks
    depth_init = plan.depth_init or cm.depth_init
    blocks = _blocks(gm, src)
    template = blocks[0]
    chained = cm_chained(cm)
    if not chained:
        raise PlanError(f"chain {cm.container}: the mapping has no chained values")
    for k in range(1, len(blocks)):
        for link in chained:
            if len(blocks[k]) != len(template) or chained_input(blocks[k], link) is not blocks[k - 1][link[2]]:
                raise PlanError(f"chain {cm.container}: block {src[k]} does not read block "
                                f"{src[k - 1]}'s output where the mapping says")
    all_block = {n for b in blocks for n in b}
    last_pos = {n: i for i, n in enumerate(blocks[-1])}
    state = {k for k, _ in gm.named_parameters(remove_duplicate=False)}
    state |= {k for k, _ in gm.named_buffers(remove_duplicate=False)}
    # parameters and buffers of the blocks are re-made per new block; lifted constants are
    # shared by all of them (export numbers them per block, their values are the template's)
    src_params = {n.target for n in gm.graph.nodes if n.op == "get_attr" and n.target in state
                  and any(_relname(n.target, b) is not None for b in src)}
    # Before the new blocks go the nodes that come before the chain and whatever the blocks read;
    # every other node keeps its place after them (so other chains keep their node order).
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    first = min(order[n] for n in all_block)
    needed: set[Node] = set()
    stack = [a for n in all_block for a in n.all_input_nodes if a not in all_block]
    while stack:
        a = stack.pop()
        if a in needed:
            continue
        needed.add(a)
        stack.extend(x for x in a.all_input_nodes if x not in all_block)
    depends: set[Node] = set()
    for n in gm.graph.nodes:
        if n not in all_block and any(a in all_block or a in depends for a in n.all_input_nodes):
            depends.add(n)
            for a in n.all_input_nodes:
                if a in all_block and a not in last_pos:
                    raise PlanError(f"chain {cm.container}: node {n.name} outside the chain reads "
                                    f"{a.name} of an inner block; depth changes need the chain's "
                                    "blocks to be read only by the next block")
    bad = needed & depends
    if bad:
        raise PlanError(f"chain {cm.container}: node {next(iter(bad)).name} is both read by the "
                        "blocks and computed from them")

    def skip(n: Node) -> bool:
        return n in all_block or n.target in src_params or n.op == "output"

    graph = Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    env: dict[Node, Node] = {}
    output = next(n for n in gm.graph.nodes if n.op == "output")
    early = [n for n in gm.graph.nodes if not skip(n) and (order[n] < first or n in needed)]
    for n in early:
        env[n] = graph.node_copy(n, lambda a: env[a])
    unused = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target in src_params
              and not n.users and _relname(n.target, src[0]) is not None]
    last = _rebuild_chain(graph, cm, src, dst, env, template, src_params, unused)
    for n, pos in last_pos.items():
        env[n] = last[template[pos]]
    for n in gm.graph.nodes:
        if not skip(n) and n not in env:
            env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(torch.fx.node.map_arg(output.args[0], lambda a: env[a]))
    graph.lint()
    rel_names = sorted({_relname(t, src[0]) for t in src_params if _relname(t, src[0])})
    tensors = _new_tensors(gm, cm, src, dst, plan.direction, depth_init, rel_names)
    nonpersistent = set()
    for name in nonpersistent_buffers(gm):
        rel = _relname(name, src[0])
        if rel is not None and is_application(src[0]):
            nonpersistent.add(name)
        elif rel is not None:
            nonpersistent.update(f"{d}.{rel}" for d in dst)
        elif not any(_relname(name, b) for b in src):
            nonpersistent.add(name)
    old_buffers = {n for n, _ in gm.named_buffers(remove_duplicate=False)}
    buffers = set() if is_application(src[0]) else {
        f"{d}.{rel}" for rel in rel_names if f"{src[0]}.{rel}" in old_buffers for d in dst}
    new = rebuild(gm, graph, tensors, nonpersistent=nonpersistent, buffers=buffers)
    check_graph(new, what="depth pass", source=gm)
    return new
