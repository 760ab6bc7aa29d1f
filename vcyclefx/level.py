"""A *level*: a GraphModule made by vcyclefx that owns its weights and remembers how it was made.

:class:`Level` is a ``torch.fx.GraphModule`` subclass. ``level.info`` (also kept in
``meta["vcyclefx"]``) is a :class:`LevelInfo`: the example inputs it was captured with, the
front-end, the original class. Its behaviour is stated as methods, not patched onto instances:

- ``train()``/``eval()`` switch the graph's baked-in dropout/BatchNorm mode (``vcyclefx.fx.mode``);
- ``.to()/.cuda()/.cpu()`` (``_apply``) rewrite the device literals export baked into the graph;
- ``copy.deepcopy`` gives a level with its own tensors, in the same mode;
- pickling (``torch.save``, multiprocessing) stores the level as its level directory would (the
  graph lifted into an ``ExportedProgram``, the weights as safetensors) and rebuilds it on load,
  so the unpickled level has the same names, ties, mode and shape metadata and can be rewritten
  again (:mod:`vcyclefx.export.leveldir` plugs the format in as ``Level.pickler``).

A level never shares a tensor with the module it was made from: :func:`build_level` copies
every tensor it does not receive new (ties between names are kept: one copy per tensor object).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn
from torch.fx import Graph, GraphModule

from vcyclefx.fx.device import module_device, move_device_literals_
from vcyclefx.fx.mode import switch_mode_
from vcyclefx.errors import LevelError


KEY = "vcyclefx"


@dataclass(frozen=True)
class LevelInfo:
    example_inputs: tuple  # example positional inputs (CPU tensors) the graph was captured with
    frontend: str  # "export" or "fx"
    source_class: str | None  # "module.QualName" of the user's original class
    dynamic_dims: tuple = ()  # (input index, dim) pairs captured as symbolic
    notes: tuple = field(default_factory=tuple)  # capture remarks shown by inspect
    recipe: Any = None  # vcyclefx.capture.recipe.Recipe: how the original model is built (to_module)
    input_names: tuple = ()  # forward() parameter name of each example input ("" if unnamed)

    def as_call(self, inputs=None) -> tuple[tuple, dict]:
        """(args, kwargs) that call the *original* model with ``inputs`` (default: the example
        inputs): every input by its forward() name where all have one, else positionally."""
        inputs = tuple(self.example_inputs if inputs is None else inputs)
        names = self.input_names
        if len(names) != len(inputs) or not all(names):
            return inputs, {}
        return (), dict(zip(names, inputs))


class Level(GraphModule):
    """A GraphModule made by vcyclefx (see the module docstring)."""

    @property
    def info(self) -> LevelInfo:
        return self.meta[KEY]

    def train(self, mode: bool = True) -> "Level":
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        return switch_mode_(self, mode)

    def eval(self) -> "Level":
        return switch_mode_(self, False)

    def _apply(self, fn, *args, **kwargs):
        """nn.Module._apply, then device literals in the graph follow the weights' device."""
        out = super()._apply(fn, *args, **kwargs)
        device = module_device(self)
        if device is not None:
            move_device_literals_(self, device)
        return out

    def __deepcopy__(self, memo: dict) -> "Level":
        res = super().__deepcopy__(memo)
        switch_mode_(res, self.training)
        return res

    # How a level pickles: (to_bytes, from_bytes), set by vcyclefx.export.leveldir when it is
    # imported (``import vcyclefx`` does). The level-directory format builds Levels, so this
    # module does not import it; it plugs itself in here.
    pickler = None

    def __reduce__(self):
        if Level.pickler is None:
            raise LevelError("pickling a level needs vcyclefx.export.leveldir: import vcyclefx "
                             "before pickling or unpickling levels")
        to_bytes, from_bytes = Level.pickler
        return (from_bytes, (to_bytes(self),))


# ---------------------------------------------------------------------------------------------
# building levels
# ---------------------------------------------------------------------------------------------
def fetch_attr(module: nn.Module, target: str):
    """The attribute ``target`` ("a.b.c") of ``module``."""
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def owner_of(module: nn.Module, target: str) -> tuple[nn.Module, str]:
    """The module holding attribute ``target`` and the attribute's own name."""
    path, _, leaf = target.rpartition(".")
    return (fetch_attr(module, path) if path else module), leaf


def put_state(module: nn.Module, name: str, t: torch.Tensor) -> None:
    """Put ``t`` in state-dict entry ``name`` of ``module``, in place: a parameter's slot takes a
    Parameter (a plain ``t`` wrapped, not trainable), a buffer's slot takes ``t``."""
    owner, leaf = owner_of(module, name)
    if leaf in owner._parameters:
        owner._parameters[leaf] = t if isinstance(t, nn.Parameter) else \
            nn.Parameter(t, requires_grad=False)
    else:
        owner._buffers[leaf] = t


def nonpersistent_buffers(gm: nn.Module) -> set[str]:
    names = set()
    for mod_name, mod in gm.named_modules():
        for b in getattr(mod, "_non_persistent_buffers_set", ()):
            names.add(f"{mod_name}.{b}" if mod_name else b)
    return names


def _own(obj, copies: dict[int, Any]):
    """A copy of tensor ``obj`` (one per tensor object, so ties stay ties)."""
    if not isinstance(obj, torch.Tensor):
        return obj
    if id(obj) not in copies:
        data = obj.detach().clone()
        copies[id(obj)] = (nn.Parameter(data, requires_grad=obj.requires_grad)
                           if isinstance(obj, nn.Parameter) else data)
    return copies[id(obj)]


def build_level(
    old: nn.Module,
    graph: Graph,
    info: LevelInfo | None,
    *,
    new_attrs: dict[str, Any] | None = None,
    nonpersistent: Iterable[str] | None = None,
    buffers: Iterable[str] | None = None,
    training: bool | None = None,
    own: bool = True,
) -> Level:
    """A Level running ``graph`` whose attributes come from ``new_attrs`` where given and from
    ``old`` otherwise (copied when ``own``, so the level shares no tensor with ``old``).

    Parameters stay parameters; tensors that were buffers in ``old`` (or are named in
    ``buffers``) are buffers, non-persistent ones stay so; other tensors (lifted constants) stay
    plain attributes. Submodules that ``graph`` calls (higher-order-op bodies) are deep-copied.
    """
    new_attrs = new_attrs or {}
    is_buffer = {n for n, _ in old.named_buffers(remove_duplicate=False)} | set(buffers or ())
    old_storages = _storages(old) if own else set()
    copies: dict[int, Any] = {}
    root = nn.Module()
    for node in graph.nodes:
        if node.op not in ("get_attr", "call_module"):
            continue
        target = node.target
        obj = new_attrs[target] if target in new_attrs else fetch_attr(old, target)
        if own and isinstance(obj, torch.Tensor) and (
                target not in new_attrs or _storage(obj) in old_storages):
            obj = _own(obj, copies)
        elif own and isinstance(obj, nn.Module) and target not in new_attrs:
            obj = copies.setdefault(id(obj), copy.deepcopy(obj))
        _assign(root, target, obj, buffer=target in is_buffer)
    level = Level(root, graph, class_name=type(old).__name__)
    level.meta = dict(getattr(old, "meta", {}))
    for name, t in list(level.named_buffers(remove_duplicate=False)):
        if name not in is_buffer:  # GraphModule makes every tensor a buffer; constants are not
            owner, leaf = owner_of(level, name)
            del owner._buffers[leaf]
            object.__setattr__(owner, leaf, t)
    nonpersistent = set(nonpersistent_buffers(old) if nonpersistent is None else nonpersistent)
    for name, _ in list(level.named_buffers()):
        if name in nonpersistent:
            owner, leaf = owner_of(level, name)
            owner._non_persistent_buffers_set.add(leaf)
    if info is not None:
        level.meta[KEY] = info
    mode = getattr(old, "training", True) if training is None else training
    switch_mode_(level, bool(mode))
    return level


def _assign(root: nn.Module, target: str, obj: Any, buffer: bool) -> None:
    *path, leaf = target.split(".")
    mod = root
    for part in path:
        if not hasattr(mod, part):
            mod.add_module(part, nn.Module())
        mod = getattr(mod, part)
    if isinstance(obj, torch.Tensor) and not isinstance(obj, nn.Parameter) and buffer:
        mod.register_buffer(leaf, obj)
    else:
        setattr(mod, leaf, obj)


def _storage(t: torch.Tensor):
    if t.device.type == "meta":
        return None
    return (t.device, t.untyped_storage().data_ptr())


def _storages(module: nn.Module) -> set:
    out = set()
    for t in tensors_of(module):
        s = _storage(t)
        if s is not None and t.untyped_storage().nbytes() > 0:
            out.add(s)
    return out


def tensors_of(module: nn.Module) -> list[torch.Tensor]:
    """Every tensor a module holds: parameters, buffers and plain tensor attributes."""
    out, seen = [], set()
    for mod in module.modules():
        for value in list(mod._parameters.values()) + list(mod._buffers.values()) + [
                v for v in vars(mod).values() if isinstance(v, torch.Tensor)]:
            if isinstance(value, torch.Tensor) and id(value) not in seen:
                seen.add(id(value))
                out.append(value)
    return out


def shared_tensors(a: nn.Module, b: nn.Module) -> list[str]:
    """Names of ``a``'s tensors that share storage with a tensor of ``b`` (empty: ``a`` owns
    its weights)."""
    theirs = _storages(b)
    names = {id(t): n for n, t in a.state_dict(keep_vars=True).items()}
    return [names.get(id(t), "<constant>") for t in tensors_of(a)
            if (s := _storage(t)) is not None and t.untyped_storage().nbytes() > 0 and s in theirs]


def make_level(gm: GraphModule, info: LevelInfo, training: bool | None = None) -> Level:
    """``gm`` as a Level with ``info``. A Level is updated in place; any other GraphModule
    (``ExportedProgram.module()``) is rebuilt as a Level that takes over its tensors (no copy:
    the caller hands ``gm`` over), without the forward hooks export installs."""
    if isinstance(gm, Level):
        gm.meta[KEY] = info
        if training is not None:
            switch_mode_(gm, training)
        return gm
    return build_level(gm, gm.graph, info, training=training, own=False)


def own_level(gm: GraphModule, info: LevelInfo, training: bool | None = None,
              copy: bool = True) -> Level:
    """``gm`` (an ``ExportedProgram.module()`` of a user's model) as a Level holding copies of
    its tensors (the model's own tensors when not ``copy``), without the forward hooks export
    installs."""
    return build_level(gm, gm.graph, info, training=training, own=copy)


def clone_level(gm: GraphModule) -> GraphModule:
    """A deep copy of a level (tensors copied, ties kept, same mode)."""
    return copy.deepcopy(gm)


def level_info(gm) -> LevelInfo | None:
    meta = getattr(gm, "meta", None)
    return meta.get(KEY) if isinstance(meta, dict) else None


def is_level(obj) -> bool:
    return isinstance(obj, GraphModule) and level_info(obj) is not None
