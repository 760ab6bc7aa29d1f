"""Chains: runs of structurally identical blocks that feed each other in sequence.

Candidates come from the module structure recorded on every node (``meta["nn_module_stack"]``):
the children of one container (``transformer.h.0``, ``transformer.h.1``, ...), in the order the
graph runs them. A run of consecutive children is a chain when (1) their subgraphs are
isomorphic, node for node, including parameter shapes and relative parameter names (checked with
networkx), and (2) each block reads a value the previous block produced. No model, module or
class name is looked at.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch.fx import GraphModule, Node

from vcyclefx.analysis.dims import sizes_of
from vcyclefx.analysis.ownership import application_name, is_application, module_path, ownership, relname


@dataclass
class Chain:
    container: str  # module path holding the blocks, e.g. "transformer.h"
    blocks: list[str]  # module path of each block, in execution order
    nodes: list[list[Node]] = field(repr=False)  # call_function nodes each block owns
    params: list[dict[str, str]] = field(repr=False)  # per block: relative name -> tensor name
    # (user position, input index, producer position): block k reads, as input number
    # `input index` of its node at `user position`, the node at `producer position` of block k-1
    chained: list[tuple[int, int, int]] = field(repr=False)
    depth_ok: bool = True
    reason: str = ""  # why depth changes are not possible, if so
    period: int = 1  # blocks per repeating unit (``chained`` links units of this many blocks)
    kinds: list[int] = field(default_factory=list, repr=False)  # per block, its kind (same = same signature)

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def shared(self) -> bool:
        """The blocks are applications of one module (the same weights)."""
        return bool(self.blocks) and is_application(self.blocks[0])

    @property
    def params_per_block(self) -> int:
        return len(self.params[0]) if self.params else 0

    @property
    def periods(self) -> int:
        return len(self.blocks) // self.period

    def unit_nodes(self, q: int) -> list[Node]:
        """The nodes of period ``q`` (its blocks' nodes, block after block): what ``chained``
        indexes into."""
        return unit_nodes(self.nodes, self.period, q)

    def name_pattern(self) -> tuple[str, int] | None:
        """(prefix, first index) when block paths are ``<container>.<prefix><int>`` (or the
        applications ``<container>@<int>`` of a shared chain)."""
        if self.shared:
            return f"{self.container}@", 0
        tails = [b[len(self.container) + 1 :] if self.container else b for b in self.blocks]
        m = [re.fullmatch(r"(.*?)(\d+)", t) for t in tails]
        if not all(m) or len({x.group(1) for x in m}) != 1:
            return None
        idx = [int(x.group(2)) for x in m]
        if idx != list(range(idx[0], idx[0] + len(idx))):
            return None
        return m[0].group(1), idx[0]

    def block_name(self, j: int, shift: int = 0) -> str:
        """The name of block ``j`` of a resized chain; ``shift``: blocks added (removed, if
        negative) before the chain in the same container by the resize of an earlier chain."""
        if self.shared:
            return application_name(self.container, j)
        pat = self.name_pattern()
        assert pat is not None
        prefix, first = pat
        base = f"{self.container}." if self.container else ""
        return f"{base}{prefix}{first + shift + j}"


def unit_nodes(nodes: list[list[Node]], period: int, q: int) -> list[Node]:
    """The nodes of the ``q``-th unit of ``period`` blocks, given each block's nodes."""
    return [n for ns in nodes[q * period:(q + 1) * period] for n in ns]


def _tensor_names(gm: GraphModule) -> dict[str, torch.Tensor]:
    out = dict(gm.named_parameters(remove_duplicate=False))
    out.update(gm.named_buffers(remove_duplicate=False))
    return out


def find_chains(gm: GraphModule) -> list[Chain]:
    owner_nodes, children = ownership(gm)
    tensors = _tensor_names(gm)
    chains: list[Chain] = []
    taken: list[str] = []
    for container in sorted(children, key=lambda c: (c.count("."), c) if c else (-1, "")):
        kids = children[container]
        if len(kids) < 2 or any(_inside(container, t) for t in taken):
            continue
        sigs = [_signature(gm, owner_nodes[k], k, tensors) for k in kids]
        graphs: dict[str, nx.DiGraph] = {}
        i = 0
        while i < len(kids):
            chain, end = None, i + 1
            for p, j in _periodic_runs(sigs, i):
                if p == 1:
                    end = j  # a run of one kind that is no chain is skipped as a whole
                chain = _make_chain(gm, container, kids[i:j], owner_nodes, tensors, p, graphs)
                if chain is not None and p > 1 and not chain.depth_ok:
                    chain = None  # kinds that repeat but whose periods do not feed each other
                    # (q_norm, k_proj, k_norm of one attention) are no stack of layers
                if chain is not None:
                    end = j
                    chain.kinds = [sigs[i:j].index(x) for x in sigs[i:j]]
                    break
            if chain is not None:
                _check_numbering(chain, kids)
                chains.append(chain)
                taken.extend(chain.blocks)
            i = end
    chains.extend(_shared_chains(gm, tensors, taken))
    return chains


MAX_PERIOD = 16


def _periodic_runs(sigs: list, i: int) -> list[tuple[int, int]]:
    """(period, end) of the runs starting at ``i`` that repeat a period of blocks at least
    twice (block k of the kind of block k - period), longest first, then smallest period."""
    out = []
    for p in range(1, min(MAX_PERIOD, (len(sigs) - i) // 2) + 1):
        j = i + p
        while j < len(sigs) and sigs[j] == sigs[j - p]:
            j += 1
        end = i + (j - i) // p * p
        if (end - i) // p >= 2:
            out.append((p, end))
    return sorted(out, key=lambda x: (-(x[1] - i), x[0]))


def _shared_chains(gm, tensors, taken: list[str]) -> list[Chain]:
    """Chains of applications of one module (shared weights), outermost modules first; modules
    inside a block of another chain are left to it."""
    owner_nodes, children = ownership(gm, applications=True)
    calls: dict[str, list[str]] = {}
    for kids in children.values():
        for k in kids:
            calls.setdefault(module_path(k), []).append(k)
    out: list[Chain] = []
    for path in sorted(calls, key=lambda p: (p.count("."), p)):
        run = calls[path]
        if len(run) < 2 or not path or any(_inside(path, module_path(t)) or
                                           _inside(module_path(t), path) for t in taken):
            continue
        if run != [application_name(path, k) for k in range(len(run))]:
            continue  # not every call is numbered in order: leave it
        chain = _make_chain(gm, path, run, owner_nodes, tensors)
        if chain is not None:
            out.append(chain)
            taken.append(path)
    return out


def _check_numbering(chain: Chain, siblings: list[str]) -> None:
    """New blocks are numbered on from the chain's first block (numbered siblings after the
    chain are renumbered by the depth pass); blocks without numbers cannot be resized."""
    if chain.name_pattern() is None and chain.depth_ok:
        chain.depth_ok, chain.reason = False, (f"block names {chain.blocks[0]}, {chain.blocks[1]} "
                                               "are not numbered")


def chained_input(nodes: list[Node], link) -> Node:
    """The value a block reads from the previous block, located by a chain link."""
    user, index, _ = link
    return nodes[user].all_input_nodes[index]


def _inside(path: str, block: str) -> bool:
    return path == block or path.startswith(block + ".")


def _signature(gm: GraphModule, nodes: list[Node], block: str, tensors) -> tuple:
    index = {n: i for i, n in enumerate(nodes)}
    shape = _BlockShapes()
    sig = []
    for n in nodes:
        args = []
        for a in n.all_input_nodes:
            if a in index:
                args.append(("int", index[a]))
            elif a.op == "get_attr" and a.target in tensors:
                rel = relname(a.target, block)
                args.append(("param", rel if rel is not None else a.target,
                             tuple(tensors[a.target].shape)))
            elif a.op == "get_attr" and _is_body(gm, a):  # a higher-order op's body
                args.append(("body", _body_signature(gm, a)))
            elif a.op == "get_attr":  # a lifted constant: numbered per block by export
                args.append(("const", shape(a)))
            else:
                args.append(("ext",))
        lits = tuple(shape.text(repr(x)) for x in _literals(n))
        sig.append((str(n.target), tuple(args), lits, shape(n)))
    return tuple(sig)


_UNBACKED = re.compile(r"\bu\d+\b")


_NODE_NAME = re.compile(r"on node '[^']*'")


class _BlockShapes:
    """``_shape_of`` for the nodes of one block, with data-dependent sizes (export's unbacked
    symbols ``u0, u1, ...``, new ones per block) numbered by first appearance in the block, so
    identical blocks have identical shapes; ``text`` does the same to a literal (the messages
    of export's runtime assertions also name the node they check)."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}

    def _rename(self, m: re.Match) -> str:
        return self.names.setdefault(m.group(0), f"u#{len(self.names)}")

    def text(self, s: str) -> str:
        return _UNBACKED.sub(self._rename, _NODE_NAME.sub("on node", s))

    def __call__(self, n: Node):
        s = _shape_of(n)
        return None if s is None else tuple(_UNBACKED.sub(self._rename, x) for x in s)


def _literals(n: Node) -> list:
    out = []
    torch.fx.node.map_aggregate(n.args, lambda x: out.append(x) if not isinstance(x, Node) else None)
    return out


def _shape_of(n: Node):
    sizes = sizes_of(n)
    return tuple(str(s) for s in sizes) if isinstance(sizes, tuple) else None


def _graph(nodes: list[Node], block: str, tensors) -> nx.DiGraph:
    g = nx.DiGraph()
    index = {n: i for i, n in enumerate(nodes)}
    shape = _BlockShapes()
    for n in nodes:
        label = (str(n.target), shape(n))
        g.add_node(index[n], label=label)
    for n in nodes:
        for a in n.all_input_nodes:
            if a in index:
                g.add_edge(index[a], index[n])
            elif a.op == "get_attr" and a.target in tensors and relname(a.target, block) is not None:
                key = ("param", relname(a.target, block))
                if key not in g:
                    t = tensors.get(a.target)
                    g.add_node(key, label=("param", key[1], tuple(t.shape) if t is not None else None))
                g.add_edge(key, index[n])
    return g


def _isomorphic(a: nx.DiGraph, b: nx.DiGraph) -> bool:
    """The blocks' graphs are isomorphic under the map that pairs nodes by their position in
    the block (and tensors by relative name): the one map a depth change uses. Checking it is
    linear; searching for any isomorphism (VF2++) is exponential on blocks made of many
    identical pieces (an unrolled scan: 16 equal time steps took minutes), and finds nothing
    the depth pass could use, since it copies blocks position by position."""
    if a.number_of_nodes() != b.number_of_nodes() or a.number_of_edges() != b.number_of_edges():
        return False
    return nx.utils.graphs_equal(a, b)


def _external_inputs(gm: GraphModule, nodes: list[Node], blocks: list[str]) -> list[Node]:
    """Values a block reads from outside: not its own tensors, nor the bodies of its
    higher-order ops (``wrap_with_set_grad_enabled``'s submodule: export makes one per call,
    and their code is part of the block's signature)."""
    own = set(nodes)
    out: list[Node] = []
    for n in nodes:
        for a in n.all_input_nodes:
            if a in own or a in out:
                continue
            if a.op == "get_attr" and (any(relname(a.target, b) is not None for b in blocks)
                                       or _is_body(gm, a)):
                continue
            out.append(a)
    return out


def _is_body(gm: GraphModule, node: Node) -> bool:
    try:
        return isinstance(gm.get_submodule(node.target), GraphModule)
    except AttributeError:
        return False


def _body_signature(gm: GraphModule, node: Node) -> tuple:
    body = gm.get_submodule(node.target)
    return tuple((n.op, str(n.target) if n.op == "call_function" else "", _shape_of(n))
                 for n in body.graph.nodes)


def _make_chain(gm, container, run, owner_nodes, tensors, period: int = 1,
                graphs: dict | None = None) -> Chain | None:
    """The chain of blocks ``run`` with units of ``period`` blocks, or None when its blocks are
    not isomorphic to those of the first unit or its units do not feed each other."""
    graphs = {} if graphs is None else graphs
    block_nodes = [owner_nodes[b] for b in run]
    for b, ns in zip(run, block_nodes):
        if b not in graphs:
            graphs[b] = _graph(ns, b, tensors)
    for k in range(period, len(run)):
        if not _isomorphic(graphs[run[k % period]], graphs[run[k]]):
            return None
    units = [unit_nodes(block_nodes, period, q) for q in range(len(run) // period)]
    ins = [_external_inputs(gm, u, run[q * period:(q + 1) * period]) for q, u in enumerate(units)]
    if len({len(x) for x in ins}) != 1:
        return None
    chained = _links(ins, units)
    if not chained:
        return None  # blocks that do not feed each other are not a chain
    params = [{r: t for t in tensors if (r := relname(t, b)) is not None} for b in run]
    reason = _read_from_outside(run, block_nodes)
    return Chain(container=container, blocks=list(run), nodes=block_nodes, params=params,
                 chained=chained, depth_ok=not reason, reason=reason, period=period)


def _links(ins: list[list[Node]], block_nodes: list[list[Node]]) -> list[tuple[int, int, int]] | None:
    """The chain links (see ``Chain.chained``) of blocks with external inputs ``ins``: each
    input slot is read from outside by every block alike, or chained (block k+1 reads a node of
    block k, at the same position each time); None when a slot is neither."""
    chained = []
    for slot in range(len(ins[0])):
        if all(x[slot] is ins[0][slot] for x in ins):
            continue  # a value every block reads from outside
        pos = None
        for k in range(len(block_nodes) - 1):
            src = ins[k + 1][slot]
            if src not in block_nodes[k]:
                return None
            p = block_nodes[k].index(src)
            if pos is not None and p != pos:
                return None
            pos = p
        v = ins[0][slot]
        user = next(i for i, n in enumerate(block_nodes[0]) if v in n.all_input_nodes)
        chained.append((user, block_nodes[0][user].all_input_nodes.index(v), pos))
    return chained


def _read_from_outside(run: list[str], block_nodes: list[list[Node]]) -> str:
    """Why depth changes are impossible when a block before the last has a value read outside
    the chain (the last such value), else ""."""
    everything = set(n for ns in block_nodes for n in ns)
    reason = ""
    for k, ns in enumerate(block_nodes[:-1]):
        for n in ns:
            outside = [u for u in n.users if u not in everything]
            if outside:
                reason = f"{n.name} of block {run[k]} is used outside the chain by {outside[0].name}"
    return reason
