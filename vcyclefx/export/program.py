"""A level's graph as an ``ExportedProgram`` without exporting it again.

A level is the unlifted form of an ``ExportedProgram`` (``ep.module()``): parameters, buffers and
constant tensors are ``get_attr`` nodes, and every node still carries the ``meta["val"]`` fake
tensor (with the capture's symbolic sizes) that the passes keep up to date. Lifting is the
inverse of what ``ep.module()`` did: each tensor attribute becomes a placeholder in front of the
user inputs, and the graph signature says which is which. This costs milliseconds, where
``torch.export.export`` of the level costs seconds (it traces the graph again).

Lifting covers graphs without in-place updates of their own tensors (a BatchNorm's running
statistics in training mode) and without submodule bodies (``cond``/``while_loop``); for those,
:func:`program_of` re-exports the level, which handles everything ``torch.export`` does.
"""

from __future__ import annotations

import logging

import torch
from torch.export.exported_program import ExportedProgram, ModuleCallEntry, ModuleCallSignature
from torch.export.graph_signature import (
    ExportGraphSignature,
    InputKind,
    InputSpec,
    OutputKind,
    OutputSpec,
    TensorArgument,
)
from torch.fx import Graph, GraphModule

from vcyclefx.capture.frontend import dynamic_shapes_for, export_program
from vcyclefx.level import fetch_attr, level_info, nonpersistent_buffers

log = logging.getLogger("vcyclefx.export.program")


class NotLiftable(Exception):
    """This graph needs a real re-export (the reason is the message)."""


def reexport(level, example_inputs=None) -> ExportedProgram:
    """``torch.export`` of ``level`` (in training mode, so dropout rates are kept), with the
    level's dynamic dims."""
    info = level_info(level)
    args = tuple(example_inputs if example_inputs is not None else info.example_inputs)
    was_training = level.training
    level.train()
    try:
        return export_program(level, args, dynamic_shapes_for(args, info.dynamic_dims if info else ()))
    finally:
        level.train(was_training)


def program_of(level) -> ExportedProgram:
    """The level as an ExportedProgram of its training-mode graph: lifted from the graph where
    that is possible (see the module docstring), else re-exported."""
    was_training = level.training
    level.train()
    try:
        try:
            return lift(level)
        except NotLiftable as e:
            log.info("re-exporting the level: %s", e)
    finally:
        level.train(was_training)
    return reexport(level)


def _fake_mode(gm: GraphModule):
    for n in gm.graph.nodes:
        mode = getattr(n.meta.get("val"), "fake_mode", None)
        if mode is not None:
            return mode
    raise NotLiftable("no fake tensor in the graph's metadata")


def _attr_targets(gm: GraphModule) -> list[str]:
    targets: list[str] = []
    for n in gm.graph.nodes:
        if n.op == "call_module" and not (n.target == "_guards_fn" and not n.users):
            raise NotLiftable(f"node {n.name} calls submodule {n.target}")
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) \
                and n.target._schema.is_mutable:
            raise NotLiftable(f"node {n.name} ({n.target}) updates a tensor in place")
        if n.op == "get_attr" and n.target not in targets:
            targets.append(n.target)
    return targets


# 63 lines: one walk over the graph builds the new graph, the signature's input specs and the
# state together, in export's placeholder order; split, the parts would share five tables.
def lift(level: GraphModule) -> ExportedProgram:
    """The ExportedProgram whose ``module()`` is ``level``'s graph (raises NotLiftable)."""
    mode = _fake_mode(level)
    params = dict(level.named_parameters(remove_duplicate=False))
    buffers = dict(level.named_buffers(remove_duplicate=False))
    nonpersistent = nonpersistent_buffers(level)
    graph = Graph()
    lifted, specs, state, constants = {}, [], {}, {}
    rank = {InputKind.PARAMETER: 0, InputKind.BUFFER: 1, InputKind.CONSTANT_TENSOR: 2}

    def kind_of(target):
        return (InputKind.PARAMETER if target in params else
                InputKind.BUFFER if target in buffers else InputKind.CONSTANT_TENSOR)

    # as export orders them: parameters, buffers, constants, then the user inputs
    for target in sorted(_attr_targets(level), key=lambda t: rank[kind_of(t)]):
        obj = fetch_attr(level, target)
        if not isinstance(obj, torch.Tensor):
            raise NotLiftable(f"get_attr {target} is a {type(obj).__name__}, not a tensor")
        kind = kind_of(target)
        prefix = {InputKind.PARAMETER: "p_", InputKind.BUFFER: "b_"}.get(kind, "c_")
        node = graph.placeholder(prefix + target.replace(".", "_"))
        node.meta["val"] = mode.from_tensor(obj, static_shapes=True)
        lifted[target] = node
        persistent = None
        if kind == InputKind.BUFFER:
            persistent = target not in nonpersistent
        specs.append(InputSpec(kind, TensorArgument(node.name), target=target, persistent=persistent))
        (state if kind == InputKind.PARAMETER or persistent else constants)[target] = obj
    env: dict = {}
    outputs: list = []
    for n in level.graph.nodes:
        if n.op == "placeholder":
            env[n] = graph.placeholder(n.name)
            env[n].meta = dict(n.meta)
            specs.append(InputSpec(InputKind.USER_INPUT, TensorArgument(n.name), target=None))
        elif n.op == "get_attr":
            env[n] = lifted[n.target]
        elif n.op == "output":
            graph.output(torch.fx.node.map_arg(n.args[0], lambda x: env[x]))
            flat = n.args[0] if isinstance(n.args[0], (list, tuple)) else [n.args[0]]
            if not all(isinstance(o, torch.fx.Node) for o in flat):
                raise NotLiftable("an output is not a tensor node")
            outputs = [OutputSpec(OutputKind.USER_OUTPUT, TensorArgument(o.name), target=None)
                       for o in flat]
        elif n.op == "call_function":
            env[n] = graph.node_copy(n, lambda x: env[x])
    info = getattr(level.graph._codegen, "pytree_info", None)
    if info is None:
        raise NotLiftable("the graph has no pytree input/output structure")
    ranges = {}
    for n in level.graph.nodes:
        if n.op == "placeholder":
            for size in getattr(n.meta.get("val"), "shape", ()):
                if isinstance(size, torch.SymInt):
                    env_ = size.node.shape_env
                    ranges.update({s: env_.var_to_range[s] for s in size.node.expr.free_symbols})
    calls = [ModuleCallEntry("", ModuleCallSignature(inputs=[], outputs=[], in_spec=info.in_spec,
                                                     out_spec=info.out_spec))]
    return ExportedProgram(root=GraphModule(torch.nn.Module(), graph), graph=graph,
                           graph_signature=ExportGraphSignature(specs, outputs),
                           state_dict=state, range_constraints=ranges, module_call_graph=calls,
                           constants=constants)
