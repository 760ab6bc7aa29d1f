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
from torch.fx.node import map_aggregate
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode, free_unbacked_symbols

from vcyclefx.errors import PassCheckError, brief
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


@contextlib.contextmanager
def shape_check(on: bool | None):
    """:func:`set_shape_check` for the duration of a block, then back to what it was."""
    global _shape_check
    before, _shape_check = _shape_check, on
    try:
        yield
    finally:
        _shape_check = before


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
        raise PassCheckError(f"{what}: the graph does not lint: {brief(e)}") from e


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
    """Nodes that produce a value: inputs, tensor attributes, and calls that are read or whose
    op returns something (not ``_assert_tensor_metadata``, which returns nothing)."""
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            yield n
        elif n.op == "call_function" and (n.users or _returns(n.target)):
            yield n
        elif n.op == "get_attr" and isinstance(fetch_attr(gm, n.target), torch.Tensor):
            yield n


def _returns(target) -> bool:
    schema = getattr(target, "_schema", None)
    return schema is None or bool(schema.returns)


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
    the same symbolic sizes); returns the number of values compared.

    Two limits of the fake mode outside export are allowed for: an op whose fake kernel cannot
    run at symbolic sizes (``baddbmm`` with a broadcast input) is run at the example sizes, and
    a kernel that specialises a symbolic size to its example value (``aten.pad``) matches the
    symbolic size; either way the recorded value carries on."""
    mode = placeholder_mode(gm)
    if mode is None:
        return 0  # no symbolic inputs to re-execute from (a graph made by hand)
    sizes = _Sizes(mode.shape_env)

    def run_op(node: Node, args, kwargs):
        recorded = node.meta.get("val")
        try:
            out = node.target(*args, **kwargs)
        except _DATA_DEPENDENT:
            return recorded
        except Exception as e:  # noqa: BLE001 - any failure of a rewritten op is the finding
            sizes.run_at_hints(node, args, kwargs, e, what)
            return recorded
        if _unbacked(out) - _unbacked(recorded):
            return recorded  # a fresh data-dependent size: keep the recorded one
        if not sizes.same(recorded, out) and sizes.same(recorded, out, specialised=True):
            return recorded  # the kernel specialised a symbolic size: carry the symbolic one
        return out

    compared = [0]

    def compare(node: Node, value) -> None:
        compared[0] += 1
        recorded = node.meta.get("val")
        if not sizes.same(recorded, value, specialised=True):
            raise PassCheckError(
                f"{what}: node {node.format_node()} has meta['val'] {_describe(recorded)} but "
                f"re-executing the graph gives {_describe(value)}")

    # the pass's own shape environment: suppress guards so that checking adds no facts to it
    no_guards = sizes.env.suppress_guards() if sizes.env is not None else contextlib.nullcontext()
    with mode, no_guards:
        fake_run(gm, mode, [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"],
                 compare, run_op)
    return compared[0]


def _unbacked(value) -> set:
    """The data-dependent size symbols in ``value`` (none in values that hold no sizes)."""
    try:
        return free_unbacked_symbols(value)
    except (AssertionError, TypeError, AttributeError):
        return set()


class _Sizes:
    """Equality of sizes under the shape environment of the graph's inputs."""

    def __init__(self, env):
        self.env = env

    def hint(self, s) -> int | None:
        """The value of size ``s`` at the example inputs' sizes."""
        if isinstance(s, int):
            return s
        h = s.node.hint if isinstance(s, torch.SymInt) else None
        if h is None and self.env is not None and isinstance(s, torch.SymInt):
            h = self.env.size_hint(s.node.expr, allow_none=True)
        return int(h) if h is not None else None

    def same_size(self, a, b, specialised: bool = False) -> bool:
        if isinstance(a, int) and isinstance(b, int):
            return a == b
        ea = a.node.expr if isinstance(a, torch.SymInt) else sympy.Integer(a)
        eb = b.node.expr if isinstance(b, torch.SymInt) else sympy.Integer(b)
        if str(ea) == str(eb) or (ea - eb).expand() == 0:
            return True
        if self.env is not None:
            try:  # what the guards of the capture prove (e.g. a length padded to a multiple)
                if self.env._maybe_evaluate_static(sympy.Eq(ea, eb)) is sympy.true:
                    return True
            except Exception:  # noqa: BLE001 - an expression the environment cannot read
                pass
        # a symbolic size against a concrete one: the same at the example sizes is a kernel
        # that specialised (the recorded value is then the more general one)
        return (specialised and (isinstance(a, int) or isinstance(b, int))
                and self.hint(a) is not None and self.hint(a) == self.hint(b))

    def same(self, recorded, value, specialised: bool = False) -> bool:
        if isinstance(value, torch.Tensor):
            return (isinstance(recorded, torch.Tensor) and recorded.dim() == value.dim()
                    and all(self.same_size(a, b, specialised)
                            for a, b in zip(recorded.shape, value.shape)))
        if isinstance(value, (list, tuple)) and isinstance(recorded, (list, tuple)):
            return len(value) == len(recorded) and all(
                self.same(r, v, specialised) for r, v in zip(recorded, value))
        if isinstance(value, torch.SymInt):
            return isinstance(recorded, (int, torch.SymInt)) and self.same_size(recorded, value,
                                                                                specialised)
        return True  # other values (None, numbers, opaque objects) carry no shape

    def _concrete(self, v):
        if isinstance(v, torch.Tensor):
            shape = [self.hint(s) for s in v.shape]
            if None in shape:
                raise ValueError("a data-dependent size has no example value")
            return torch.empty(shape, dtype=v.dtype, device=v.device)
        if isinstance(v, torch.SymInt):
            h = self.hint(v)
            if h is None:
                raise ValueError("a data-dependent size has no example value")
            return h
        return v

    def run_at_hints(self, node: Node, args, kwargs, error: Exception, what: str) -> None:
        """Run ``node``'s op at the example sizes after it failed at symbolic ones (``error``);
        raises PassCheckError when it fails there too or gives other shapes than recorded."""
        def fail(extra: str = ""):
            return PassCheckError(f"{what}: re-executing node {node.format_node()} on fake inputs "
                                  f"fails: {brief(error)}{extra}")

        try:
            args_c, kwargs_c = map_aggregate((args, kwargs), self._concrete)
        except ValueError:
            raise fail() from error
        try:
            out = node.target(*args_c, **kwargs_c)
        except Exception as e:  # noqa: BLE001 - it fails at the example sizes too: a finding
            raise fail() from e
        recorded = node.meta.get("val")
        at_hints = map_aggregate(recorded, lambda v: self._concrete(v)
                                 if isinstance(v, (torch.Tensor, torch.SymInt)) else v)
        if not self.same(at_hints, out):
            raise PassCheckError(
                f"{what}: node {node.format_node()} has meta['val'] {_describe(recorded)}; at the "
                f"example sizes it gives {_describe(out)} (its fake kernel cannot run at "
                f"symbolic sizes: {brief(error)})")


def _describe(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"of shape {tuple(str(s) for s in v.shape)}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_describe(x) for x in v) + "]"
    return repr(v)
