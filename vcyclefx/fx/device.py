"""Device literals of a captured graph follow the module's device.

Export records the device of factory ops and casts as literal arguments (``arange(T,
device=cpu)``, ``_assert_tensor_metadata(x, device=cpu)``), so a level captured on the CPU and
moved with ``.to("cuda")`` would still make CPU tensors. After every ``.to()/.cuda()/.cpu()``
a level rewrites those literals to the device its weights are now on.
"""

from __future__ import annotations

import contextlib
import operator

import torch
from torch.fx import GraphModule

from vcyclefx.fx.args import get_arg, set_arg


def _device_args(target) -> list[str]:
    schema = getattr(target, "_schema", None)
    if schema is None:
        return []
    return [a.name for a in schema.arguments if "Device" in str(a.type)]


def _literals(gm: GraphModule):
    """(graph module, node, argument name, device) of every device literal of ``gm`` and of its
    higher-order-op bodies."""
    for g in gm.modules():
        if not isinstance(g, GraphModule):
            continue
        for node in g.graph.nodes:
            if node.op != "call_function":
                continue
            for name in _device_args(node.target):
                value = get_arg(node, name, None)
                if value is not None:
                    yield g, node, name, value


def _set_literals(changes) -> None:
    """Set each ``(graph module, node, argument name, device)``, then recompile what changed."""
    touched = {}
    for g, node, name, value in changes:
        set_arg(node, name, value)
        touched[id(g)] = g
    for g in touched.values():
        g.recompile()


def move_device_literals_(gm: GraphModule, device: torch.device) -> bool:
    """Rewrite every device literal of ``gm`` (and its higher-order-op bodies) to ``device``;
    returns whether anything changed. In place: it is what ``level.to(...)`` calls."""
    moves = [(g, node, name, device) for g, node, name, value in _literals(gm)
             if torch.device(value) != device]
    _set_literals(moves)
    return bool(moves)


def literals_for_meta_weights(gm: GraphModule) -> None:
    """``gm`` (traced on the CPU, its weights now meta tensors beside real rotary tables,
    constants and inputs) with the device literals a trace with meta weights gives: every op
    that makes or moves a tensor makes it on the meta device (where it meets the weights), and
    each check of a tensor's device (``_assert_tensor_metadata``) names the device that tensor
    is on: the CPU for one computed from real tensors alone, else meta. In place."""
    assert_op = torch.ops.aten._assert_tensor_metadata.default
    meta = torch.device("meta")
    real: set = set()  # nodes whose value is a real (CPU) tensor or computed from real ones
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            real.add(node)
        elif node.op == "get_attr":
            try:
                value = operator.attrgetter(node.target)(gm)
            except AttributeError:
                value = None
            if not (isinstance(value, torch.Tensor) and value.is_meta):
                real.add(node)
        elif node.op == "call_function":
            names = _device_args(node.target)
            if node.target is assert_op:
                device = torch.device("cpu") if node.args[0] in real else meta
                for name in names:
                    if get_arg(node, name, None) is not None:
                        set_arg(node, name, device)
                continue
            moved = False
            for name in names:
                if get_arg(node, name, None) is not None:
                    set_arg(node, name, meta)
                    moved = True
            if not moved and all(a in real for a in node.all_input_nodes):
                real.add(node)
    gm.recompile()


@contextlib.contextmanager
def literals_on(gm: GraphModule, device: torch.device):
    """``gm``'s device literals (and its higher-order-op bodies') on ``device`` inside the
    block, each put back as it was on exit."""
    before = [x for x in _literals(gm) if torch.device(x[3]) != device]
    _set_literals((g, node, name, device) for g, node, name, _ in before)
    try:
        yield
    finally:
        _set_literals(before)


def module_device(gm: torch.nn.Module) -> torch.device | None:
    for t in list(gm.parameters()) + list(gm.buffers()):
        return t.device
    return None


@contextlib.contextmanager
def meta_as_fake_cpu(module: torch.nn.Module):
    """``module``'s meta parameters and buffers replaced by fake CPU tensors of the same shapes,
    dtypes and strides (no memory) inside the block, for tracing a model or level whose weights
    are meta tensors (the streaming command line's): it then takes the branches it takes on a
    CPU (transformers routes a mixture of experts by ``device.type``: ``histc`` of float32 on a
    CPU, of int32 elsewhere, which a CPU cannot run) and gets a CPU trace's strides and device
    literals, consistent with its real CPU tensors (rotary tables). Yields ``restore(gm)``,
    which puts the original tensors back into a module traced from it (ties kept);
    ``module`` gets them back on exit."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes: dict[int, torch.Tensor] = {}  # id(original) -> its fake
    originals: dict[int, torch.Tensor] = {}  # id(fake data) -> original
    slots = []
    for mod in module.modules():
        for table in (mod._parameters, mod._buffers):
            for leaf, t in table.items():
                if t is None or not t.is_meta:
                    continue
                if id(t) not in fakes:
                    with mode:
                        fake = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype,
                                                   device="cpu")
                    if isinstance(t, torch.nn.Parameter):
                        fake = torch.nn.Parameter(fake, t.requires_grad)
                    fakes[id(t)] = fake
                    originals[_storage(fake)] = t
                slots.append((table, leaf, t))
                table[leaf] = fakes[id(t)]

    def restore(gm: torch.nn.Module) -> None:
        for mod in gm.modules():
            for table, param in ((mod._parameters, True), (mod._buffers, False)):
                for leaf, t in table.items():
                    original = originals.get(_storage(t)) if t is not None else None
                    if original is None:
                        continue
                    if param and not isinstance(original, torch.nn.Parameter):
                        original = torch.nn.Parameter(original, requires_grad=False)
                    table[leaf] = original

    try:
        yield restore
    finally:
        for table, leaf, t in slots:
            table[leaf] = t


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata
