"""A *level*: a GraphModule made by vcyclefx that remembers how it was made.

Level modules are ordinary ``torch.fx.GraphModule`` objects whose ``meta["vcyclefx"]`` holds a
:class:`LevelInfo` (the example inputs used to capture, the front-end, the original class). Their
``train()``/``eval()`` switch the graph's baked-in dropout/BatchNorm mode (``passes.mode``).
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field, replace

import torch
from torch.fx import GraphModule

from passes.device import module_device, move_device_literals_
from passes.mode import switch_mode_

from .errors import LevelError

KEY = "vcyclefx"


@dataclass(frozen=True)
class LevelInfo:
    example_inputs: tuple  # example positional inputs (CPU tensors) the graph was captured with
    frontend: str  # "export" or "fx"
    source_class: str | None  # "module.QualName" of the user's original class
    dynamic_dims: tuple = ()  # (input index, dim) pairs captured as symbolic
    notes: tuple = field(default_factory=tuple)  # capture remarks shown by inspect

    def with_inputs(self, example_inputs: tuple) -> "LevelInfo":
        return replace(self, example_inputs=example_inputs)


def _level_train(self: GraphModule, mode: bool = True) -> GraphModule:
    if not isinstance(mode, bool):
        raise ValueError("training mode is expected to be boolean")
    return switch_mode_(self, mode)


def _level_eval(self: GraphModule) -> GraphModule:
    return switch_mode_(self, False)


def _level_apply(self: GraphModule, fn, *args, **kwargs):
    """nn.Module._apply, then device literals in the graph follow the weights' device."""
    out = GraphModule._apply(self, fn, *args, **kwargs)
    device = module_device(self)
    if device is not None:
        move_device_literals_(self, device)
    return out


def make_level(gm: GraphModule, info: LevelInfo, training: bool | None = None) -> GraphModule:
    """Attach ``info`` and the train/eval/device behaviour to ``gm`` (in place) and return it."""
    gm.meta[KEY] = info
    gm.train = types.MethodType(_level_train, gm)
    gm.eval = types.MethodType(_level_eval, gm)
    gm._apply = types.MethodType(_level_apply, gm)
    gm._deepcopy_hooks = [_reinstall]  # copy.deepcopy(level) is a level too
    if training is not None:
        switch_mode_(gm, training)
    return gm


def clone_level(gm: GraphModule) -> GraphModule:
    """A deep copy of a level (tensors copied, ties kept) that behaves like a level."""
    import copy

    info = level_info(gm)
    out = copy.deepcopy(gm)
    return make_level(out, info, training=gm.training) if info is not None else out


def _reinstall(copy_of_level: GraphModule) -> None:
    info = level_info(copy_of_level)
    if info is not None:
        make_level(copy_of_level, info)


def level_info(gm) -> LevelInfo | None:
    meta = getattr(gm, "meta", None)
    return meta.get(KEY) if isinstance(meta, dict) else None


def is_level(obj) -> bool:
    return isinstance(obj, GraphModule) and level_info(obj) is not None


def as_level(model, example_inputs=None, **capture_kwargs) -> GraphModule:
    """``model`` as a level: captured if it is an ``nn.Module``, as is if vcyclefx made it."""
    if is_level(model):
        return model
    if isinstance(model, GraphModule) and example_inputs is None:
        raise LevelError(
            "this GraphModule was not made by vcyclefx, so it does not remember its inputs: "
            "pass example_inputs=(...) to capture it"
        )
    if not isinstance(model, torch.nn.Module):
        raise LevelError(
            f"expected an nn.Module or a GraphModule made by vcyclefx, got {type(model).__name__}"
        )
    if example_inputs is None:
        raise LevelError(
            f"{type(model).__name__} is not captured yet: pass example_inputs=(tensor, ...), "
            "a tuple of example tensors for its forward()"
        )
    from .capture import capture

    return capture(model, example_inputs, **capture_kwargs)
