"""The pass contract: ``requires(gm, plan)`` -> ``call(gm, plan)`` -> ``ensures(result)``, then
one verifier, as torch.fx.passes.infra.pass_base.PassBase has it.

Every pass is a :class:`Pass`; calling it checks its preconditions, runs it, checks its
postconditions and then :func:`verify`, the same check after every pass:

- the graph lints (``Graph.lint``);
- every value node (placeholder, tensor attribute, call) has ``meta["val"]``;
- no tensor of the result shares storage with the pass's input (a level owns its weights);
- with the shape check on (``VCYCLEFX_VERIFY=1``, which the tests set, or
  :func:`set_shape_check`), the shapes in ``meta["val"]`` equal those of a fake re-execution of
  the graph from its placeholders' symbolic values. The width pass writes shapes from the
  analysis instead of re-running ops (seconds on a 124M model); this says the two agree.

Every failure is a :class:`~vcyclefx.errors.PassCheckError` naming the pass and the node.
"""

from __future__ import annotations

import contextlib
import logging
import os

import sympy
import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException, DynamicOutputShapeException, UnsupportedOperatorException,
)
from torch.fx import Graph, GraphModule, Node
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode, free_unbacked_symbols

from vcyclefx.errors import PassCheckError
from vcyclefx.level import fetch_attr, shared_tensors

from passes.common import PassResult
from passes.meta import fake_run, placeholder_mode

log = logging.getLogger("vcyclefx.passes")

ENV_VAR = "VCYCLEFX_VERIFY"
_shape_check: bool | None = None  # None: follow the environment variable


def set_shape_check(on: bool | None) -> None:
    """Turn the fake re-execution in :func:`verify` on or off (None: follow ``VCYCLEFX_VERIFY``)."""
    global _shape_check
    _shape_check = on


def shape_check_enabled() -> bool:
    if _shape_check is not None:
        return _shape_check
    return os.environ.get(ENV_VAR, "") not in ("", "0")


class Pass:
    """A graph pass: a pure function of a GraphModule and a plan that returns a
    :class:`PassResult` with a new module; ``gm`` is never changed."""

    name = "pass"

    def requires(self, gm: GraphModule, plan) -> None:
        """Preconditions on the input and the plan (raise PlanError, naming what is wrong)."""

    def call(self, gm: GraphModule, plan) -> PassResult:
        raise NotImplementedError

    def ensures(self, result: PassResult) -> None:
        """Postconditions: every tensor the pass promised has the promised shape."""
        for name, shape in result.shapes.items():
            try:
                t = fetch_attr(result.module, name)
            except AttributeError:
                t = None
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape):
                got = f"of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else "missing"
                raise PassCheckError(f"{self.name}: tensor {name} is {got}; the plan gives it "
                                     f"shape {tuple(shape)}")

    def __call__(self, gm: GraphModule, plan) -> PassResult:
        self.requires(gm, plan)
        result = self.call(gm, plan)
        self.ensures(result)
        verify(result.module, gm, what=self.name)
        return result


def lint(graph: Graph, *, what: str = "pass") -> None:
    """``graph.lint()``, its failure (which names the node) as a PassCheckError."""
    try:
        graph.lint()
    except Exception as e:  # noqa: BLE001 - lint raises RuntimeError or AssertionError
        raise PassCheckError(f"{what}: the graph does not lint: {e}") from e


def verify(gm: GraphModule, source_module: GraphModule | None = None, *, what: str = "pass") -> None:
    """The check after every pass (see the module docstring); raises PassCheckError."""
    lint(gm.graph, what=what)
    for n in _value_nodes(gm):
        if "val" not in n.meta:
            raise PassCheckError(f"{what}: node {n.format_node()} has no meta['val']")
    if source_module is not None:
        shared = shared_tensors(gm, source_module)
        if shared:
            raise PassCheckError(f"{what}: the result shares tensor {shared[0]} with its input "
                                 f"({len(shared)} shared); a pass must copy what it keeps")
    if shape_check_enabled():
        key = _graph_key(gm)
        if key not in _CHECKED:
            check_shapes(gm, what=what)
            _CHECKED.add(key)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s produced:\n%s", what, gm.graph)


def _value_nodes(gm: GraphModule):
    """Nodes that produce a value (not ops whose schema returns nothing, e.g. the
    ``_assert_tensor_metadata`` checks export inserts: a loaded .pt2 gives them no meta)."""
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            yield n
        elif n.op == "call_function":
            schema = getattr(n.target, "_schema", None)
            if schema is None or len(schema.returns) > 0:
                yield n
        elif n.op == "get_attr" and isinstance(fetch_attr(gm, n.target), torch.Tensor):
            yield n


# ops the fake mode cannot run without data; their recorded value stands in
_DATA_DEPENDENT = (DataDependentOutputException, DynamicOutputShapeException,
                   GuardOnDataDependentSymNode, UnsupportedOperatorException)


# hashes of the graphs (with their recorded shapes) that passed the shape check in this
# process: the tests run one pass on one model many times, and a second check of the same graph
# finds what the first found (the check costs about 2 ms per op; it doubled the pass tests)
_CHECKED: set[int] = set()


def _graph_key(gm: GraphModule) -> int:
    """A hash of everything the shape check reads: the ops, their arguments, every recorded
    shape and every tensor attribute's shape, bodies of higher-order ops included."""
    parts = []
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            obj = fetch_attr(gm, n.target)
            parts.append((n.name, n.target, _graph_key(obj) if isinstance(obj, GraphModule) else
                          (tuple(obj.shape), obj.dtype) if isinstance(obj, torch.Tensor) else None))
            continue
        parts.append((n.op, n.name, str(n.target), repr(n.args), repr(n.kwargs),
                      _describe(n.meta.get("val"))))
    return hash(tuple(parts))


def check_shapes(gm: GraphModule, *, what: str = "pass") -> int:
    """``meta["val"]`` shapes equal a fake re-execution of ``gm`` from its placeholders (with
    the same symbolic sizes); returns the number of values compared."""
    mode = placeholder_mode(gm)
    if mode is None:
        return 0  # no symbolic inputs to re-execute from (a graph made by hand)
    env = mode.shape_env
    no_guards = env.suppress_guards() if env is not None else contextlib.nullcontext()

    def run_op(node: Node, args, kwargs):
        try:
            out = node.target(*args, **kwargs)
        except _DATA_DEPENDENT:
            return node.meta.get("val")
        except RuntimeError as e:
            if "expected to contain only concrete integers" not in str(e):
                raise PassCheckError(f"{what}: re-executing node {node.format_node()} on fake "
                                     f"inputs fails: {e}") from e
            # a kernel that runs on symbolic sizes only under tracing (aten.pad with a
            # symbolic amount): what follows it cannot be re-executed symbolically
            raise _Unrunnable(node) from e
        except Exception as e:  # noqa: BLE001 - any failure of a rewritten op is the finding
            raise PassCheckError(f"{what}: re-executing node {node.format_node()} on fake inputs "
                                 f"fails: {e}") from e
        if _unbacked(out) - _unbacked(node.meta.get("val")):
            return node.meta.get("val")  # a fresh data-dependent size: keep the recorded one
        return out

    compared = [0]

    def compare(node: Node, value) -> None:
        compared[0] += 1
        recorded = node.meta.get("val")
        if not _same_shapes(recorded, value, env):
            raise PassCheckError(
                f"{what}: node {node.format_node()} has meta['val'] {_describe(recorded)} but "
                f"re-executing the graph gives {_describe(value)}")

    # the pass's own shape environment: suppress guards so that checking adds no facts to it
    with mode, no_guards:
        try:
            fake_run(gm, mode, [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"],
                     compare, run_op)
        except _Unrunnable as stop:
            log.debug("%s: shape check stops at %s (needs tracing to run on symbolic sizes)",
                      what, stop.node.format_node())
    return compared[0]


class _Unrunnable(Exception):
    def __init__(self, node: Node):
        super().__init__(node.format_node())
        self.node = node


def _unbacked(value) -> set:
    """The data-dependent size symbols in ``value`` (none in values that hold no sizes)."""
    try:
        return free_unbacked_symbols(value)
    except (AssertionError, TypeError, AttributeError):
        return set()


def _same_size(a, b, env=None) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    ea = a.node.expr if isinstance(a, torch.SymInt) else a
    eb = b.node.expr if isinstance(b, torch.SymInt) else b
    try:
        if str(ea) == str(eb) or bool((ea - eb).expand() == 0):
            return True
    except (TypeError, AttributeError):
        return False
    if env is None:
        return False
    # equal under what the shape environment knows (ranges, divisibility facts: a padded length
    # written two ways); where it cannot decide, the sizes must agree at the example's sizes
    try:
        known = env._maybe_evaluate_static(sympy.Eq(ea, eb))
        if known is not None:
            return bool(known)
        return env.size_hint(ea) == env.size_hint(eb)
    except Exception:  # noqa: BLE001 - torch internals; an undecidable comparison is a mismatch
        return False


def _same_shapes(recorded, value, env=None) -> bool:
    if isinstance(value, torch.Tensor):
        return (isinstance(recorded, torch.Tensor) and recorded.dim() == value.dim()
                and all(_same_size(a, b, env) for a, b in zip(recorded.shape, value.shape)))
    if isinstance(value, (list, tuple)) and isinstance(recorded, (list, tuple)):
        return len(value) == len(recorded) and all(
            _same_shapes(r, v, env) for r, v in zip(recorded, value))
    if isinstance(value, torch.SymInt):
        return isinstance(recorded, (int, torch.SymInt)) and _same_size(recorded, value, env)
    return True  # other values (None, numbers, opaque objects) carry no shape


def _describe(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"of shape {tuple(str(s) for s in v.shape)}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_describe(x) for x in v) + "]"
    return repr(v)
