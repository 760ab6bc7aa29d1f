"""Capture: an ``nn.Module`` -> a level GraphModule in ATen IR with shapes on every node.

Front-ends:

- ``"export"`` (default): ``torch.export.export(strict=False)``; the batch dimension of every
  input, and the sequence dimension of token/feature-sequence inputs, are marked ``Dim.AUTO`` so
  they stay symbolic wherever the model allows (export specialises them where it does not).
- ``"fx"``: ``torch.fx.symbolic_trace`` first (with optional ``concrete_args`` to remove Python
  control flow), then the traced module goes through the same export normalisation, so both
  front-ends give one internal form: the unlifted ``ExportedProgram.module()`` GraphModule with
  ``get_attr`` parameters named as in the user's model and ``meta["val"]`` on every node.

The model is captured in training mode (so dropout probabilities are recorded) and the level is
then switched to the mode the model was in.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
import warnings

import torch
from torch.export import Dim

from vcyclefx.fx.normalize import unshare_size_arithmetic

from torch.fx import GraphModule

from vcyclefx.capture.diagnose import (export_error, held_torch_logs, is_data_dependent,
                                       user_line)
from vcyclefx.errors import CaptureError, brief

from vcyclefx.errors import LevelError
from vcyclefx.level import LevelInfo, is_level, own_level
from vcyclefx.capture.recipe import recipe_of

log = logging.getLogger("vcyclefx.capture.frontend")

FRONTENDS = ("export", "fx")


def _check_inputs(model, example_inputs, example_kwargs=None) -> tuple[tuple, dict]:
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"capture expects an nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, dict):  # keyword inputs only
        example_inputs, example_kwargs = (), {**example_inputs, **(example_kwargs or {})}
    kwargs = dict(example_kwargs or {})
    for k, v in kwargs.items():
        if not isinstance(v, torch.Tensor):
            raise CaptureError(f"example_kwargs[{k!r}] is a {type(v).__name__}; only tensors are "
                               "supported as keyword example inputs")
    if not isinstance(example_inputs, (tuple, list)):
        raise CaptureError(
            "example_inputs must be a tuple of tensors for the model's forward(), "
            f"got {type(example_inputs).__name__}"
        )
    for i, x in enumerate(example_inputs):
        if not isinstance(x, torch.Tensor):
            raise CaptureError(
                f"example_inputs[{i}] is a {type(x).__name__}; only tensors are supported as "
                "positional example inputs (bind other arguments with functools.partial or a "
                "wrapper module)"
            )
    bad = [n for n, p in model.named_parameters() if not p.dtype.is_floating_point]
    if bad:
        raise CaptureError(
            f"parameter {bad[0]!r} has dtype {dict(model.named_parameters())[bad[0]].dtype}: "
            "vcyclefx maps float weights only (dequantize the model first)"
        )
    # views are exported with guards on their base tensor ("input_ids._base.size()[1] !=
    # input_ids.size()[1]" for a slice of a (B, T+1) batch), which fail on any other input:
    # capture with plain copies
    def plain(x):
        return x.detach().clone() if x._base is not None else x

    return tuple(plain(x) for x in example_inputs), {k: plain(v) for k, v in kwargs.items()}


def _input_names(model, args: tuple, kwargs: dict) -> tuple:
    """The forward() parameter name of every input, positional ones first ("" where a
    ``*args`` parameter takes it)."""
    try:
        bound = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
    except (TypeError, ValueError) as e:
        if kwargs:
            raise CaptureError(f"the example inputs do not fit {type(model).__name__}.forward: "
                               f"{brief(e)}") from e
        return ()
    names = []
    for name, value in bound.items():
        if isinstance(value, tuple) and name not in kwargs:  # *args
            names += [""] * len(value)
        elif isinstance(value, dict) and name not in kwargs:  # **kwargs
            names += list(value)
        else:
            names.append(name)
    return tuple(names)


def _batch_and_sequence(x: torch.Tensor) -> list[int]:
    """Dims to keep symbolic: the batch (dim 0) always; the sequence (dim 1) of token inputs
    (integer, rank 2) and of feature sequences (rank 3). Image sizes stay as captured."""
    if x.dim() == 0:
        return []
    if x.dim() in (2, 3) and (x.dim() == 3 or not x.dtype.is_floating_point):
        return [0, 1]
    return [0]


def _auto_dims(example_inputs: tuple, kwargs: dict | None = None):
    args = tuple({d: Dim.AUTO for d in _batch_and_sequence(x)} for x in example_inputs)
    if not kwargs:
        return args
    return args, {k: {d: Dim.AUTO for d in _batch_and_sequence(x)} for k, x in kwargs.items()}


@contextlib.contextmanager
def quick_fx():
    """FX settings that make ``torch.export`` faster without changing the graph it makes: no
    Python stack trace recorded per node (15-30% of an export; nothing here reads them), and the
    GraphModules export builds on the way compiled to Python lazily (about ten for GPT-2; only
    the last one is used). Both are torch internals, guarded: where a torch version lacks one,
    export is just slower. The previous settings are restored on exit."""
    with contextlib.ExitStack() as stack:
        config = getattr(torch.fx, "config", None)
        if hasattr(config, "do_not_emit_stack_traces"):
            stack.callback(setattr, config, "do_not_emit_stack_traces",
                           config.do_not_emit_stack_traces)
            config.do_not_emit_stack_traces = True
        try:
            from torch.fx._lazy_graph_module import _use_lazy_graph_module
        except ImportError:
            pass
        else:
            stack.enter_context(_use_lazy_graph_module(True))
        yield


def export_program(module, args, dynamic_shapes=None, kwargs: dict | None = None):
    """``torch.export.export(strict=False)`` as every capture and re-export here runs it: with
    :func:`quick_fx` and without export's warnings (capture reports what matters as notes)."""
    with quick_fx(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(module, tuple(args), kwargs=kwargs or None,
                                   dynamic_shapes=dynamic_shapes, strict=False)


def dynamic_shapes_for(args, dims) -> tuple:
    """``dynamic_shapes`` for positional ``args``: ``Dim.AUTO`` at every ``(input, axis)`` pair
    in ``dims`` (a level's ``dynamic_dims``), static elsewhere."""
    dims = set(map(tuple, dims))
    return tuple({d: Dim.AUTO for d in range(x.dim()) if (i, d) in dims} for i, x in enumerate(args))


def _export(module, args, dynamic: bool, kwargs: dict | None = None):
    shapes = _auto_dims(args, kwargs) if dynamic else None
    if kwargs and shapes is not None:
        shapes = _by_name(module, args, kwargs, shapes)
    return export_program(module, args, shapes, kwargs)


def _by_name(module, args, kwargs, shapes) -> dict:
    """Dynamic shapes keyed by forward() parameter name (export's form when keywords are given)."""
    names = list(inspect.signature(module.forward).bind_partial(*args).arguments)
    return {**dict(zip(names, shapes[0])), **shapes[1]}


def _flat_inputs(gm, n: int) -> None:
    """The level takes every input positionally (and by its name): positional inputs first,
    then the keyword ones in the order given, so ``level(*info.example_inputs)`` works."""
    import torch.utils._pytree as pytree

    cg = gm.graph._codegen
    info = getattr(cg, "pytree_info", None)
    if info is None:
        return
    cg.pytree_info = info._replace(in_spec=pytree.tree_flatten((tuple(range(n)), {}))[1])
    gm.recompile()


def _symbolic_trace(model, concrete_args):
    try:
        return torch.fx.symbolic_trace(model, concrete_args=concrete_args)
    except Exception as e:  # noqa: BLE001 - any tracing failure is reported with its cause
        raise CaptureError(
            f"front-end 'fx' (torch.fx.symbolic_trace) failed on {type(model).__name__}: "
            f"{brief(e)}. Try frontend='export' (torch.export handles "
            "Python control flow on shapes), or pass concrete_args={...} to fix the arguments "
            "that drive control flow."
        ) from e


def _drop_unused_ops(graph) -> int:
    """Remove the pure op calls whose results nothing reads, last first (so the ops feeding
    only them go too); tensor reads stay (the level keeps every tensor of the model). Returns
    how many were removed."""
    dropped = 0
    for node in reversed(list(graph.nodes)):
        if node.op == "call_function" and not node.users and not node.is_impure():
            graph.erase_node(node)
            dropped += 1
    return dropped


def _dynamic_dims(gm) -> tuple:
    dims = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, node in enumerate(placeholders):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            for d, s in enumerate(val.shape):
                if isinstance(s, torch.SymInt) and not s.node.expr.is_number:
                    dims.append((i, d))
    return tuple(dims)


def _specialised_notes(inputs: tuple, names: tuple, dynamic_dims: tuple) -> list[str]:
    """A note per dimension capture asked to keep symbolic that export fixed to its example
    size, so that a user whose level refuses another length knows why from ``inspect``."""
    kept = set(dynamic_dims)
    notes = []
    for i, x in enumerate(inputs):
        for d in _batch_and_sequence(x):
            if (i, d) not in kept and x.shape[d] > 1:
                name = names[i] if i < len(names) else f"input {i}"
                axis = "batch" if d == 0 else "sequence"
                notes.append(
                    f"{name} axis {d} ({axis}) is static at {x.shape[d]}: the model uses that "
                    "size as a Python int (for example a loop over the sequence), so "
                    "torch.export fixed it; the level runs at this size only (capture with "
                    "example inputs of the size you will run)")
    return notes


def capture(
    model: torch.nn.Module,
    example_inputs=(),
    *,
    example_kwargs: dict | None = None,
    frontend: str = "export",
    dynamic: bool = True,
    concrete_args: dict | None = None,
    recipe=None,
    copy_weights: bool = True,
):
    """Capture ``model`` with ``example_inputs`` as a level GraphModule.

    ``dynamic=True`` keeps every input dimension symbolic that the model allows (batch, sequence);
    if export rejects that, the model is captured with static shapes and a note says why.
    ``example_inputs`` is a tuple of tensors (or a dict of keyword tensors); ``example_kwargs``
    adds keyword inputs (an encoder-decoder's ``decoder_input_ids``). The level takes every input
    positionally, positional ones first and then the keyword ones in their order (or each by its
    name); ``level.info.example_inputs`` holds them in that order.
    ``recipe`` (a :class:`vcyclefx.capture.recipe.Recipe`) says how the model is built, for
    ``vf.to_module``; Hugging Face models are recognised without one.
    ``copy_weights=False`` makes the level use the model's own tensors instead of copies (no
    second copy of the weights in memory), for a model the caller discards after capture, as
    the command line does; training such a level changes the model.
    """
    if frontend not in FRONTENDS:
        raise CaptureError(f"frontend={frontend!r} is not one of {FRONTENDS}")
    args, kwargs = _check_inputs(model, example_inputs, example_kwargs)
    if kwargs and frontend == "fx":
        raise CaptureError("keyword example inputs need frontend='export' (symbolic_trace binds "
                           "positional inputs only)")
    names = _input_names(model, args, kwargs)
    was_training = model.training
    start = time.perf_counter()
    notes: list[str] = []
    target = _symbolic_trace(model, concrete_args) if frontend == "fx" else model
    gm, train = _traced_train_or_eval(model, target, args, kwargs, dynamic, frontend, notes)
    random_ops = _unswitchable_random_ops(gm) if train else []
    if random_ops:
        # stochastic depth and similar are written as Python branches on `self.training` around
        # random ops; the graph cannot switch them off for eval, so capture the eval-mode graph
        gm = _traced(model, target, args, kwargs, dynamic and not notes, frontend, notes,
                     train=False)
        notes.append(
            f"captured in eval mode: random ops {', '.join(random_ops)} (stochastic depth?) are "
            "not switchable train/eval in a graph, so they are left out; dropout stays switchable"
        )
    if kwargs:
        _flat_inputs(gm, len(args) + len(kwargs))
    unshare_size_arithmetic(gm)
    # ops whose results nothing reads (export keeps a few, e.g. a mask's unused unsqueeze): a
    # level saved and loaded back has them removed (ExportedProgram.module()), so remove them
    # here, and a level is the same graph before and after a round trip through level.pt2
    if _drop_unused_ops(gm.graph):
        gm.recompile()
    dynamic_dims = _dynamic_dims(gm)
    if dynamic and not any(n.startswith("captured with static shapes") for n in notes):
        notes += _specialised_notes((*args, *kwargs.values()), names, dynamic_dims)
    info = LevelInfo(
        example_inputs=tuple(x.detach().clone() for x in (*args, *kwargs.values())),
        input_names=names,
        frontend=frontend,
        source_class=f"{type(model).__module__}.{type(model).__qualname__}",
        dynamic_dims=dynamic_dims,
        notes=tuple(notes),
        recipe=recipe if recipe is not None else recipe_of(model),
    )
    # the level owns copies of the model's tensors: training it never changes the user's model
    gm = own_level(gm, info, training=was_training, copy=copy_weights)
    log.info("captured %s with %s in %.2fs", type(model).__name__, frontend, time.perf_counter() - start)
    return gm


def _traced_train_or_eval(model, target, args, kwargs, dynamic: bool, frontend: str,
                          notes: list[str]):
    """(the graph, whether it is the training-mode one): captured in training mode, or, where
    that fails, in eval mode with a note. Training-only Python branches on random values (HF
    layer drop: ``if self.training and torch.rand([]) < p``) are data-dependent guards that no
    graph can hold; in eval mode they are not taken, and dropout stays switchable."""
    try:
        return _traced(model, target, args, kwargs, dynamic, frontend, notes, train=True), True
    except CaptureError as train_err:
        try:
            gm = _traced(model, target, args, kwargs, dynamic, frontend, notes, train=False)
        except CaptureError:
            raise train_err from None
        why = train_err.__cause__ if train_err.__cause__ is not None else train_err
        where = user_line(why)
        notes.append(
            f"captured in eval mode: training-mode capture failed ({brief(why, 200)}"
            f"{' at ' + where if where else ''}); training-only branches (layer drop, "
            "masks drawn in Python) are left out; dropout stays switchable")
        return gm, False


def _traced(model, target, args, kwargs, dynamic: bool, frontend: str, notes: list[str], *,
            train: bool):
    """``ep.module()`` of ``target`` exported in training (or eval) mode; with ``dynamic``, falls
    back to static shapes if symbolic ones fail (and says so in ``notes``)."""
    was_training = model.training
    model.train(train)
    mode = "training" if train else "eval"
    try:
        with held_torch_logs() as logs:
            try:
                return _export(target, args, dynamic, kwargs).module()
            except Exception as dyn_err:  # noqa: BLE001
                # a guard on a tensor's value (an unbacked symbol) fails at static shapes too
                if not dynamic or is_data_dependent(dyn_err):
                    raise export_error(frontend, model, dyn_err, logs, mode) from dyn_err
                why = brief(dyn_err, 200)
            try:
                gm = _export(target, args, False, kwargs).module()
            except Exception as static_err:  # noqa: BLE001
                raise export_error(frontend, model, static_err, logs, mode) from static_err
        notes.append(f"captured with static shapes: dynamic capture failed ({why})")
        return gm
    finally:
        model.train(was_training)


_SWITCHABLE_RANDOM = {"dropout", "dropout_", "feature_dropout", "feature_dropout_", "alpha_dropout",
                      "alpha_dropout_", "feature_alpha_dropout", "feature_alpha_dropout_",
                      "scaled_dot_product_attention"}
_RANDOM = ("bernoulli", "rand", "randn", "randint", "randperm", "normal", "uniform", "exponential",
           "native_dropout", "multinomial", "poisson", "geometric", "cauchy", "log_normal")


def _unswitchable_random_ops(gm) -> list[str]:
    """Random ops the train/eval pass cannot switch (anything but dropout's own ops)."""
    found = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        name = str(n.target).split(".")[1] if str(n.target).startswith("aten.") else ""
        if name and name not in _SWITCHABLE_RANDOM and name.startswith(_RANDOM) and name not in found:
            found.append(name)
    return found


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
    return capture(model, example_inputs, **capture_kwargs)
