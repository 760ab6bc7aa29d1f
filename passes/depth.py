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

from vcyclefx.analysis.chains import chained_input
from vcyclefx.analysis.ownership import is_application, module_path, ownership, relname
from vcyclefx.errors import PlanError
from vcyclefx.level import fetch_attr, nonpersistent_buffers
from vcyclefx.plan.choices import COALESCE, DECOALESCE, DEPTH_INITS, DIRECTIONS, one_of
from vcyclefx.plan.mapping import ChainMap

from passes.common import PassResult, rebuild
from passes.renumber import block_index, rename, renumber_stack, renumbering, shifted, state_names
from passes.contract import Pass, lint

__all__ = ["COALESCE", "DECOALESCE", "DepthPass", "DepthPlan", "depth_pass"]


@dataclass(frozen=True)
class DepthPlan:
    direction: str  # COALESCE or DECOALESCE
    chains: tuple[ChainMap, ...]
    depth_init: str | None = None  # overrides each ChainMap's depth_init when de-coalescing


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
                   first_blocks: list[list[Node]], src_params: set[str],
                   unused: list[Node] = ()) -> dict[Node, Node]:
    """Emit the ``dst`` blocks into ``graph``, one period at a time; returns template node ->
    node of the last period. ``first_blocks``: the nodes of each block of the first period.
    ``unused``: the template's tensors that no op reads (a dummy norm weight), given to every
    new block too, so that each block has the tensors of the user's block."""
    template = [n for ns in first_blocks for n in ns]
    position: dict[Node, int] = {}
    for r, ns in enumerate(first_blocks):
        position.update((n, r) for n in ns if n not in position)
    feeds = {chained_input(template, link): link[2] for link in cm_chained(cm)}
    p = cm.period
    first = src[:p]
    prev: dict[Node, Node] | None = None
    for q in range(len(dst) // p):
        local: dict[Node, Node] = {}

        def arg(n: Node) -> Node:
            if n in local:
                return local[n]
            if n.op == "get_attr" and n.target in src_params:
                r = next((r for r, b in enumerate(first) if relname(n.target, b) is not None), None)
                if r is not None:
                    g = graph.get_attr(f"{module_path(dst[q * p + r])}.{relname(n.target, first[r])}")
                    g.meta = dict(n.meta)
                    local[n] = g
                    return g
            if prev is not None and n in feeds:
                return prev[template[feeds[n]]]
            return env[n]

        for t in template:
            new = graph.node_copy(t, arg)
            r = position[t]
            name = dst[q * p + r]
            new.meta = (_retarget_application(dict(t.meta), module_path(name), q)
                        if is_application(name) else _retarget_stack(dict(t.meta), first[r], name))
            local[t] = new
        for n in unused:
            arg(n)
        prev = local
    return prev  # dst is not empty: DepthPass.requires


def cm_chained(cm: ChainMap) -> list[tuple[int, int, int]]:
    return [tuple(x) for x in cm.chained]


def _new_tensors(gm: GraphModule, cm: ChainMap, src: list[str], dst: list[str], direction: str,
                 depth_init: str, rels: list[list[str]]) -> dict[str, torch.Tensor]:
    """The new blocks' tensors; ``rels``: the relative tensor names of the blocks at each
    position of the period (every group holds blocks of one position)."""
    params = dict(gm.named_parameters(remove_duplicate=False))
    out: dict[str, torch.Tensor] = {}
    p = cm.period
    if is_application(src[0]):
        return out  # applications of one module: the mean of identical tensors is the tensor
    if direction == COALESCE:
        groups = cm.groups  # small block g <- large blocks groups[g]
        for g, members in enumerate(groups):
            for rel in rels[g % p]:
                ts = [fetch_attr(gm, f"{src[i]}.{rel}").detach() for i in members]
                if ts[0].dtype.is_floating_point:
                    t = _mean(ts) if len(ts) > 1 else ts[0].clone()
                else:
                    t = ts[0].clone()
                out[f"{dst[g]}.{rel}"] = _like(t, f"{src[members[0]]}.{rel}", params)
        return out
    for g, members in enumerate(cm.groups):
        for k, i in enumerate(sorted(members)):
            zero = set(cm.zero_set(i)) if depth_init == "identity" else set()
            for rel in rels[g % p]:
                t = fetch_attr(gm, f"{src[g]}.{rel}").detach().clone()
                if k > 0 and rel in zero:
                    t = torch.zeros_like(t)
                out[f"{dst[i]}.{rel}"] = _like(t, f"{src[g]}.{rel}", params)
    return out


def _mean(ts: list[torch.Tensor]) -> torch.Tensor:
    """The group's mean, summed in member order into one accumulator and divided;
    bfloat16/float16 blocks are summed and divided in float32 and rounded once (a checkpoint's
    dtype is kept, its arithmetic is not done in it). No stacked copy of the members: the
    streaming replay of a depth group holds its members and one float32 accumulator."""
    low = ts[0].dtype in (torch.bfloat16, torch.float16)
    acc = ts[0].to(torch.float32 if low else ts[0].dtype, copy=True)
    for t in ts[1:]:
        acc.add_(t)  # a low-precision member is widened exactly by the float32 add
    acc.div_(len(ts))
    return acc.to(ts[0].dtype) if low else acc


def _like(t: torch.Tensor, old_name: str, params: dict) -> torch.Tensor:
    if old_name in params:
        return torch.nn.Parameter(t, requires_grad=params[old_name].requires_grad)
    return t


# ---------------------------------------------------------------------------------------------
# the pass
# ---------------------------------------------------------------------------------------------
class DepthPass(Pass):
    """Change the number of blocks of the chains of a DepthPlan; the result's mapping is the
    list of chain maps applied."""

    name = "depth pass"

    def requires(self, gm: GraphModule, plan: DepthPlan) -> None:
        if plan.direction not in DIRECTIONS:
            raise PlanError(f"depth direction must be {one_of(DIRECTIONS)}")
        if plan.depth_init is not None and plan.depth_init not in DEPTH_INITS:
            raise PlanError(f"depth_init={plan.depth_init!r} must be {one_of(DEPTH_INITS)}")
        for cm in plan.chains:
            src, dst = _ends(cm, plan.direction)
            if not cm.chained:
                raise PlanError(f"chain {cm.container}: the mapping has no chained values")
            if not src or not dst:
                raise PlanError(f"chain {cm.container}: the mapping has no blocks on one side")
            identity = (plan.depth_init or cm.depth_init) == "identity"
            if plan.direction == DECOALESCE and identity and is_application(src[0]):
                raise PlanError(
                    f"depth_init='identity' on chain {cm.container}: its blocks are applications "
                    "of one module with shared weights, so zeroing the last write of a new "
                    "application would zero it in every application; use depth_init='copy'")
            if plan.direction == DECOALESCE and identity and not cm.zero_set(0):
                raise PlanError(
                    f"depth_init='identity' on chain {cm.container}: its blocks are not residual "
                    "(or the mapping predates identity support), so no tensor can be zeroed to "
                    "make a new block the identity; use depth_init='copy'")

    def call(self, gm: GraphModule, plan: DepthPlan) -> PassResult:
        cur, shapes = gm, {}
        # chains of one container in the order of their blocks: each one renumbers the blocks
        # after it, so a later chain's input names are shifted by what the earlier ones added
        shift: dict[str, int] = {}
        for cm in sorted(plan.chains, key=lambda c: (c.container, block_index(_ends(c, plan.direction)[0][0]))):
            d = shift.get(cm.container, 0)
            cur = _one_chain(cur, cm, plan, shapes, d)
            src, dst = _ends(cm, plan.direction)
            shift[cm.container] = d + len(dst) - len(src)
        return PassResult(cur, list(plan.chains), shapes=shapes)


def depth_pass(gm: GraphModule, plan: DepthPlan) -> PassResult:
    return DepthPass()(gm, plan)


def _ends(cm: ChainMap, direction: str) -> tuple[list[str], list[str]]:
    """The chain's blocks in the pass's input and in its output."""
    if direction == COALESCE:
        return cm.large_blocks, cm.small_blocks
    return cm.small_blocks, cm.large_blocks


def _one_chain(gm: GraphModule, cm: ChainMap, plan: DepthPlan, shapes: dict, d: int = 0) -> GraphModule:
    """``gm`` with the blocks of one chain replaced; adds the new blocks' tensor shapes to
    ``shapes``. ``d``: blocks added before the chain in its container by earlier chains (the
    mapping names the input blocks as they were before any of them). The numbered siblings
    after the chain are renumbered by the blocks it adds or removes."""
    src, dst = _ends(cm, plan.direction)
    src = [shifted(b, d) for b in src]
    p = cm.period
    blocks = _blocks(gm, src)
    units = [[n for ns in blocks[q * p:(q + 1) * p] for n in ns] for q in range(len(src) // p)]
    _check_links(cm, src[::p], units)
    state = state_names(gm)
    # parameters and buffers of the blocks are re-made per new block; lifted constants are
    # shared by all of them (export numbers them per block, their values are the template's)
    src_params = {n.target for n in gm.graph.nodes if n.op == "get_attr" and n.target in state
                  and any(relname(n.target, b) is not None for b in src)}
    renames = renumbering(gm, src, len(dst) - len(src))
    graph = _chain_graph(gm, cm, src, dst, blocks, src_params, renames)
    lint(graph, what=f"depth pass (chain {cm.container})")
    # relative tensor names of the blocks at each position of the period
    rels = [sorted({r for t in src_params if (r := relname(t, b))}) for b in src[:p]]
    depth_init = plan.depth_init or cm.depth_init
    tensors = _new_tensors(gm, cm, src, dst, plan.direction, depth_init, rels)
    tensors.update({rename(t, renames): fetch_attr(gm, t) for t in state if rename(t, renames) != t})
    if not is_application(src[0]):  # each new block has the tensors of the block it comes from
        made_from = ({g: members[0] for g, members in enumerate(cm.groups)}
                     if plan.direction == COALESCE else
                     {i: g for g, members in enumerate(cm.groups) for i in members})
        shapes.update({f"{dst_b}.{rel}": tuple(fetch_attr(gm, f"{src[made_from[i]]}.{rel}").shape)
                       for i, dst_b in enumerate(dst) for rel in rels[i % p]})
    nonpersistent, buffers = _state_kinds(gm, src, dst, rels, renames)
    return rebuild(gm, graph, tensors, nonpersistent=nonpersistent, buffers=buffers)


def _check_links(cm: ChainMap, src: list[str], blocks: list[list[Node]]) -> None:
    """Each block reads the previous block's output where the mapping says; and, also where
    the chain has a single block, each link of the first block is a value from outside the
    block, shaped like the block's value that will replace it in the next block."""
    template = blocks[0]
    mine = set(template)
    for link in cm_chained(cm):
        try:
            x, out = chained_input(template, link), template[link[2]]
        except IndexError:
            raise PlanError(f"chain {cm.container}: the mapping's link {tuple(link)} points past "
                            f"block {src[0]}'s {len(template)} nodes; the mapping was made for "
                            "another graph of this model") from None
        vx, vo = x.meta.get("val"), out.meta.get("val")
        if x in mine or (isinstance(vx, torch.Tensor) != isinstance(vo, torch.Tensor)) or (
                isinstance(vx, torch.Tensor) and vx.dim() != vo.dim()):
            raise PlanError(f"chain {cm.container}: the mapping's link {tuple(link)} does not "
                            f"locate block {src[0]}'s input from the previous block (it points at "
                            f"{x.name}); the mapping was made for another graph of this model")
    for k in range(1, len(blocks)):
        for link in cm_chained(cm):
            if len(blocks[k]) != len(template) or chained_input(blocks[k], link) is not blocks[k - 1][link[2]]:
                raise PlanError(f"chain {cm.container}: block {src[k]} does not read block "
                                f"{src[k - 1]}'s output where the mapping says")


def _placement(gm: GraphModule, cm: ChainMap, all_block: set[Node], last_pos: dict) -> set[Node]:
    """The nodes outside the chain that its blocks read (they go before the new blocks); raises
    PlanError when the chain is read other than through its last block, or a value is both read
    by the blocks and computed from them."""
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
    return needed


def _chain_graph(gm: GraphModule, cm: ChainMap, src: list[str], dst: list[str],
                 blocks: list[list[Node]], src_params: set[str],
                 renames: dict[str, str] | None = None) -> Graph:
    """The new graph: before the new blocks go the nodes that come before the chain and
    whatever the blocks read; every other node keeps its place after them (so other chains
    keep their node order). ``renames``: module paths of later siblings to renumber."""
    renames = renames or {}
    p = cm.period
    all_block = {n for b in blocks for n in b}
    last_unit = [n for ns in blocks[-p:] for n in ns]
    last_pos = {n: i for i, n in enumerate(last_unit)}
    template = [n for ns in blocks[:p] for n in ns]
    needed = _placement(gm, cm, all_block, last_pos)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    first = min(order[n] for n in all_block)

    def skip(n: Node) -> bool:
        return n in all_block or n.target in src_params or n.op == "output"

    graph = Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    env: dict[Node, Node] = {}

    def copy_node(n: Node) -> Node:
        new = graph.node_copy(n, lambda a: env[a])
        if renames:
            if new.op == "get_attr":
                new.target = rename(new.target, renames)
            new.meta = renumber_stack(new.meta, renames)
        return new

    output = next(n for n in gm.graph.nodes if n.op == "output")
    early = [n for n in gm.graph.nodes if not skip(n) and (order[n] < first or n in needed)]
    for n in early:
        env[n] = copy_node(n)
    unused = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target in src_params
              and not n.users and any(relname(n.target, b) is not None for b in src[:p])]
    last = _rebuild_chain(graph, cm, src, dst, env, blocks[:p], src_params, unused)
    for n, pos in last_pos.items():
        env[n] = last[template[pos]]
    for n in gm.graph.nodes:
        if not skip(n) and n not in env:
            env[n] = copy_node(n)
    graph.output(torch.fx.node.map_arg(output.args[0], lambda a: env[a]))
    return graph


def _state_kinds(gm: GraphModule, src: list[str], dst: list[str], rels: list[list[str]],
                 renames: dict[str, str] | None = None):
    """The new level's non-persistent buffers and the new blocks' buffers (not parameters);
    ``renames``: module paths of later siblings renumbered."""
    renames = renames or {}
    p = len(rels)
    nonpersistent = set()
    for name in nonpersistent_buffers(gm):
        rel = relname(name, src[0])
        if rel is not None and is_application(src[0]):
            nonpersistent.add(name)
        elif any(relname(name, b) for b in src):
            for r, b in enumerate(src[:p]):
                if (rel := relname(name, b)) is not None:
                    nonpersistent.update(f"{d}.{rel}" for d in dst[r::p])
        else:
            nonpersistent.add(rename(name, renames))
    old_buffers = {n for n, _ in gm.named_buffers(remove_duplicate=False)}
    if is_application(src[0]):
        return nonpersistent, set()
    buffers = {f"{d}.{rel}" for r in range(p) for rel in rels[r]
               if f"{src[r]}.{rel}" in old_buffers for d in dst[r::p]}
    buffers |= {rename(b, renames) for b in old_buffers}
    return nonpersistent, buffers
