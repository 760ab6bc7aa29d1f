"""ONNX export of a level, checked against torch with onnxruntime.

``export_onnx(level, example_inputs, "level1.onnx", check=True)``:

1. the level (a vcyclefx GraphModule, or an ``nn.Module`` that is captured first) is switched to
   eval mode (dropout off, BatchNorm running statistics) for the export and switched back after;
2. it is re-exported with ``torch.export`` with the dimensions the level captured as symbolic
   (``level_info(level).dynamic_dims``: batch, sequence) kept dynamic, and translated by the
   dynamo-based ``torch.onnx`` exporter (opset >= 18). Inputs are named after the level's
   placeholders (the model's ``forward`` arguments), outputs after their pytree paths (``logits``
   for a Hugging Face ``ModelOutput``), dynamic axes ``batch``/``sequence``/``<input>_dim<d>``.
   Before translation the re-exported graph is normalised where the exporter's own
   decomposition step fails on what torch runs (:func:`normalise_for_onnx`: ``contiguous``
   becomes a contiguous ``clone``, a ``view`` of a tensor not known to be contiguous becomes a
   ``reshape``), so a level exports where a plain ``torch.onnx.export`` of its model fails;
3. the file passes ``onnx.checker.check_model(full_check=True)``;
4. with ``check=True`` it is run in onnxruntime on fresh random inputs at two sizes different
   from the capture's (along the dynamic dimensions only, sizes the torch level accepts) and
   compared with the torch level in eval mode: per output, the *relative error*
   ``max|onnx - torch| / max|torch|`` must be <= ``rtol`` (precisely: ``max|onnx - torch| <=
   rtol * max|torch| + atol``; ``atol`` only matters for outputs that are all zeros).

Everything is written into a temporary directory beside the output and moved into place only
when all steps succeeded, so a failure never leaves a partial ``.onnx`` (or external-data file)
behind. A failure is an :class:`~vcyclefx.errors.ExportError` naming the node and op at fault and
the exporter's markdown report, which is kept beside the output file.

This module is imported by the CLI to register ``export-onnx``; torch.onnx, onnx and onnxruntime
are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from vcyclefx.errors import ExportError
from vcyclefx.store import fsync_tree, publish, temporary_directory

log = logging.getLogger("vcyclefx.export.onnx")

MIN_OPSET = 18


@dataclass(frozen=True)
class OutputCheck:
    """One output of one onnxruntime run compared with torch."""

    output: str  # the ONNX output name
    input_shapes: tuple  # the shapes of the inputs of this run
    max_abs_error: float  # max |onnx - torch|
    max_abs_ref: float  # max |torch|
    rel_error: float  # max_abs_error / max_abs_ref (max_abs_error when the reference is all zeros)
    ok: bool  # max_abs_error <= rtol * max_abs_ref + atol


def export_onnx(
    level,
    example_inputs=None,
    path=None,
    check: bool = True,
    *,
    opset: int = MIN_OPSET,
    rtol: float = 1e-4,
    atol: float = 1e-6,
    check_sizes: Sequence[Sequence[Sequence[int]]] | None = None,
    frontend: str | None = None,
    custom_translation_table: dict | None = None,
) -> Path:
    """Export ``level`` to the ONNX file ``path`` and return the path.

    ``level`` is a level made by vcyclefx (then ``example_inputs`` may be None: the inputs it was
    captured with are used) or an ``nn.Module`` (captured first with ``frontend``, default
    torch.export). ``check_sizes`` replaces the two default check sizes: a list of runs, each a
    tuple with one shape per input. ``custom_translation_table`` is passed to ``torch.onnx.export``
    (``{aten_op: onnxscript_function}``) to supply lowerings the exporter lacks.
    """
    if path is None:
        raise ExportError("export_onnx needs an output path: export_onnx(level, example_inputs, "
                          "'level.onnx')")
    if opset < MIN_OPSET:
        raise ExportError(f"opset={opset}: the dynamo-based exporter needs opset >= {MIN_OPSET}")
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"output path {path} is a directory; give a file name such as "
                          f"{path / 'level.onnx'}")
    level, args = _level_and_inputs(level, example_inputs, frontend)
    with _eval_mode(level), _staging(path) as stage:
        ep = _reexport(_exportable(level), args)
        changed = normalise_for_onnx(ep.graph_module)
        if changed:
            log.info("export: normalised for the exporter: %s", ", ".join(changed))
        names = _io_names(level, ep, args)
        log.info("export: %s -> %s (opset %d, inputs %s, outputs %s, dynamic axes %s)",
                 _source(level), path, opset, ", ".join(names.inputs),
                 ", ".join(names.outputs), _describe_axes(names) or "none")
        program = _translate(ep, names, opset, stage.reports, custom_translation_table)
        _rename_symbolic_dims(program, names.axes)
        program.save(str(stage.file))
        _check_model(stage.file)
        if check:
            results = check_onnx(level, stage.file, args, sizes=check_sizes, rtol=rtol, atol=atol)
            _raise_on_mismatch(results, rtol, atol)
    return path


def check_onnx(level, onnx_path, example_inputs=None, *, sizes=None, rtol: float = 1e-4,
               atol: float = 1e-6, seed: int = 0) -> list[OutputCheck]:
    """Run ``onnx_path`` in onnxruntime and ``level`` in torch (eval mode) on the same fresh random
    inputs, one run per entry of ``sizes`` (default: the first two sizes of
    :func:`candidate_sizes` that the torch level accepts), and return one :class:`OutputCheck`
    per run and output. A mismatch is not raised (see ``OutputCheck.ok``); a file that does not
    load or run, or outputs without the torch shapes, raise :class:`ExportError`."""
    import numpy as np
    import onnxruntime as ort
    import torch

    level, args = _level_and_inputs(level, example_inputs, None)
    with _eval_mode(level):
        try:
            session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - any onnxruntime failure is reported with its file
            raise ExportError(f"{onnx_path}: onnxruntime cannot load the model "
                              f"({type(e).__name__}: {_first_line(e)})") from e
        feed_names = [i.name for i in session.get_inputs()]
        out_names = [o.name for o in session.get_outputs()]
        if len(feed_names) != len(args):
            raise ExportError(f"{onnx_path}: the ONNX model has {len(feed_names)} inputs "
                              f"({feed_names}), the level takes {len(args)}")
        generator = torch.Generator().manual_seed(seed)
        results = []
        for shapes, inputs, expected in _reference_runs(level, args, sizes, generator):
            try:
                got = session.run(None, {n: x.numpy() for n, x in zip(feed_names, inputs)})
            except Exception as e:  # noqa: BLE001
                raise ExportError(f"{onnx_path}: onnxruntime failed at input sizes "
                                  f"{_fmt(shapes)} ({type(e).__name__}: {_first_line(e)})") from e
            if len(got) < len(expected):
                raise ExportError(f"{onnx_path}: {len(got)} ONNX outputs for {len(expected)} "
                                  "torch outputs")
            for name, a, b in zip(out_names, got, expected):
                if a.shape != b.shape:
                    raise ExportError(f"{onnx_path}: output {name!r} has shape {list(a.shape)} in "
                                      f"onnxruntime, {list(b.shape)} in torch (input sizes "
                                      f"{_fmt(shapes)})")
                results.append(_compare(name, shapes, np.asarray(a), b, rtol, atol))
    return results


def _reference_runs(level, args, sizes, generator, want: int = 2) -> list[tuple]:
    """``(shapes, inputs, torch outputs as numpy)`` for each check run. Explicit ``sizes`` must all
    run; default candidates the level rejects (a guard of the captured graph) are skipped."""
    import torch
    import torch.utils._pytree as pytree

    explicit = sizes is not None
    candidates = [tuple(map(tuple, s)) for s in sizes] if explicit else candidate_sizes(level, args)
    runs = []
    for shapes in candidates:
        if len(shapes) != len(args):
            raise ExportError(f"check_sizes entry {_fmt(shapes)} has {len(shapes)} shapes for "
                              f"{len(args)} inputs")
        inputs = fresh_inputs(args, shapes, generator)
        try:
            with torch.no_grad():
                out = [t.detach().cpu().numpy() for t in pytree.tree_leaves(level(*inputs))]
        except Exception as e:  # noqa: BLE001
            if explicit:
                raise ExportError(f"the torch level does not run at input sizes {_fmt(shapes)}: "
                                  f"{type(e).__name__}: {_first_line(e)}") from e
            log.debug("check: the level rejects input sizes %s (%s)", _fmt(shapes), _first_line(e))
            continue
        runs.append((shapes, inputs, out))
        if not explicit and len(runs) == want:
            break
    if not runs:
        shapes = tuple(tuple(x.shape) for x in args)
        log.warning("check: the level accepts no input size other than the capture's; checking "
                    "at %s only", _fmt(shapes))
        return _reference_runs(level, args, [shapes], generator)
    return runs


def _fmt(shapes) -> str:
    return str([list(s) for s in shapes])


def _compare(name, shapes, got, expected, rtol, atol) -> OutputCheck:
    import numpy as np

    a, b = got.astype(np.float64), expected.astype(np.float64)
    finite = np.isfinite(b)
    if not np.array_equal(finite, np.isfinite(a)) or not np.array_equal(a[~finite], b[~finite]):
        return OutputCheck(name, shapes, float("inf"), float("nan"), float("inf"), False)
    err = float(np.max(np.abs(a - b)[finite], initial=0.0))
    ref = float(np.max(np.abs(b)[finite], initial=0.0))
    rel = err / ref if ref > 0 else err
    return OutputCheck(name, shapes, err, ref, rel, err <= rtol * ref + atol)


def _raise_on_mismatch(results: list[OutputCheck], rtol: float, atol: float) -> None:
    bad = [r for r in results if not r.ok]
    if bad:
        r = max(bad, key=lambda r: r.rel_error)
        raise ExportError(
            f"onnxruntime and torch disagree on output {r.output!r} at input sizes "
            f"{list(map(list, r.input_shapes))}: relative error max|onnx - torch| / max|torch| = "
            f"{r.rel_error:.3g} (max abs error {r.max_abs_error:.3g}, max |torch| "
            f"{r.max_abs_ref:.3g}) > rtol={rtol:g} (atol={atol:g})")
    for shapes in dict.fromkeys(r.input_shapes for r in results):
        worst = max((r for r in results if r.input_shapes == shapes), key=lambda r: r.rel_error)
        log.info("check: onnxruntime matches torch at input sizes %s: max relative error %.2e "
                 "(%s)", list(map(list, shapes)), worst.rel_error, worst.output)


# ---------------------------------------------------------------------------------------------
# level, mode, re-export, names


def _level_and_inputs(level, example_inputs, frontend):
    import torch

    from vcyclefx.capture.frontend import as_level
    from vcyclefx.level import level_info

    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    kwargs = {"frontend": frontend} if frontend else {}
    level = as_level(level, example_inputs, **kwargs)
    args = tuple(example_inputs) if example_inputs is not None else level_info(level).example_inputs
    return level, args


@contextlib.contextmanager
def _eval_mode(level):
    """Eval mode (dropout off, BatchNorm running statistics) inside, the caller's mode after."""
    was_training = level.training
    level.eval()
    try:
        yield level
    finally:
        level.train(was_training)


def _reexport(level, args):
    """``torch.export`` of the level in its current mode, dynamic where the level's placeholders
    are symbolic (``level_info(level).dynamic_dims`` can also list dimensions that the capture
    specialised to a constant)."""
    from vcyclefx.capture.frontend import dynamic_shapes_for, export_program

    try:
        return export_program(level, args, dynamic_shapes_for(args, _symbolic_input_dims(level, args)))
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"torch.export of the level in eval mode failed (step 1 of the ONNX "
                          f"export): {type(e).__name__}: {_first_line(e)}") from e


def grouped_mm_rows(input, weight, offs):
    """``input`` (S, k) @ ``weight`` (E, k, n) by groups of rows (``offs``: each group's end row)
    as ops every exporter knows: each row's group is the number of group ends at or before it,
    the row is multiplied by its group's matrix, rows past the last end are zero (what
    transformers' ``grouped_mm_fallback`` leaves there). Same values; memory S * k * n."""
    import torch

    rows = torch.arange(input.shape[0], device=input.device)
    ends = offs.to(rows.dtype)
    group = (rows.unsqueeze(-1) >= ends.unsqueeze(0)).sum(-1).clamp(max=weight.shape[0] - 1)
    out = torch.bmm(input.unsqueeze(1), weight[group]).squeeze(1)  # (S, 1, k) @ (S, k, n)
    return out * (rows < ends[-1]).unsqueeze(-1).to(out.dtype)


def _grouped_mm_2d_3d(self, mat2, offs=None, bias=None, out_dtype=None):
    if offs is None or self.dim() != 2 or mat2.dim() != 3 or bias is not None:
        import torch

        return torch.ops.aten._grouped_mm.default(self, mat2, offs, bias, out_dtype)
    return grouped_mm_rows(self, mat2, offs).to(out_dtype or self.dtype)


def _replacements() -> dict:
    """Ops the ONNX exporter has no lowering for -> a function of ordinary ops computing the
    same values; a level's graph calls these instead while it is re-exported for ONNX."""
    import torch

    table = {torch.ops.aten._grouped_mm.default: _grouped_mm_2d_3d}
    fallback = getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)
    if fallback is not None:
        table[fallback.default] = lambda input, weight, offs: grouped_mm_rows(input, weight, offs)
    return table


def _exportable(level):
    """``level`` itself, or (where it calls an op in :func:`_replacements`) a GraphModule over
    the same tensors whose graph calls the replacement instead, for the re-export only."""
    import torch

    table = _replacements()
    if not any(n.op == "call_function" and n.target in table for n in level.graph.nodes):
        return level
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(level.graph, {}))
    graph._codegen = level.graph._codegen
    for n in graph.nodes:
        if n.op == "call_function" and n.target in table:
            log.info("export: %s (%s) is computed with ordinary ops for the exporter", n.name, n.target)
            n.target = table[n.target]
    return torch.fx.GraphModule(level, graph)


def normalise_for_onnx(gm) -> list[str]:
    """Rewrite, in place, the nodes of an exported graph that torch runs but the ONNX exporter's
    decomposition step rejects under symbolic sizes; returns ``"<node>: <old> -> <new>"`` per
    change. Both rewrites compute the same values; they only differ in aliasing, so a node whose
    result an in-place op writes into is left alone.

    - ``contiguous(x)``: the decomposition may keep ``x``'s strides when it cannot decide that a
      transposed ``(B, T, H, Dh)`` tensor is not contiguous, and the ``view`` after it then fails
      ("Cannot view a tensor with shape ... and strides ..."); a ``clone`` with
      ``memory_format=torch.contiguous_format`` always lays the copy out contiguously.
    - ``view(x, size)`` where ``x``'s strides (as the graph records them) are not the contiguous
      ones: ``reshape``, which copies where a view is impossible.
    """
    import torch

    aten = torch.ops.aten
    changed = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or _written_in_place(node):
            continue
        if node.target is aten.contiguous.default:
            fmt = node.kwargs.get("memory_format", torch.contiguous_format)
            if fmt is not torch.contiguous_format:
                continue
            node.target = aten.clone.default
            node.args = node.args[:1]
            node.kwargs = {"memory_format": torch.contiguous_format}
            changed.append(f"{node.name}: contiguous -> clone(memory_format=contiguous_format)")
        elif node.target is aten.view.default and not _known_contiguous(node.args[0]):
            node.target = aten.reshape.default
            changed.append(f"{node.name}: view -> reshape")
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


def _written_in_place(node) -> bool:
    """Some user of ``node`` writes into it (an in-place or out= op)."""
    from torch.fx import Node

    for user in node.users:
        schema = getattr(user.target, "_schema", None)
        if schema is None:
            continue
        for i, a in enumerate(schema.arguments):
            if a.alias_info is None or not a.alias_info.is_write:
                continue
            value = user.kwargs.get(a.name, user.args[i] if i < len(user.args) else None)
            if isinstance(value, Node) and value is node:
                return True
    return False


def _known_contiguous(x) -> bool:
    """``x``'s recorded strides are the row-major ones (size-1 axes ignored)."""
    import sympy
    import torch

    val = x.meta.get("val") if hasattr(x, "meta") else None
    if not isinstance(val, torch.Tensor):
        return False
    expected = sympy.Integer(1)
    for size, stride in reversed(list(zip(val.shape, val.stride()))):
        size_e, stride_e = _expr(size), _expr(stride)
        if size_e == 1:
            continue
        if sympy.expand(stride_e - expected) != 0:
            return False
        expected = expected * size_e
    return True


def _expr(v):
    import sympy
    import torch

    return v.node.expr if isinstance(v, torch.SymInt) else sympy.Integer(int(v))


@dataclass(frozen=True)
class _Names:
    inputs: list[str]
    outputs: list[str]
    axes: dict[str, str]  # symbol of a dynamic input dimension -> axis name in the ONNX file


def _io_names(level, ep, args) -> _Names:
    import torch
    import torch.utils._pytree as pytree

    placeholders = [n.name for n in level.graph.nodes if n.op == "placeholder"]
    inputs = placeholders if len(placeholders) == len(args) else [f"input_{i}" for i in range(len(args))]
    n_out = len(ep.graph_signature.user_outputs)
    try:  # the output structure (e.g. a ModelOutput) rebuilt around placeholders, for its paths
        spec = ep.call_spec.out_spec
        dummy = pytree.tree_unflatten([torch.empty(0)] * spec.num_leaves, spec)
        outputs = _unique([_path_name(p) for p, _ in pytree.tree_flatten_with_path(dummy)[0]])
    except Exception:  # noqa: BLE001 - a structure that cannot be rebuilt gets generic names
        outputs = []
    if len(outputs) != n_out:
        outputs = [f"output_{i}" for i in range(n_out)]
    axes: dict[str, str] = {}
    for name, shape in zip(inputs, _input_shapes(ep)):
        for d, s in enumerate(shape):
            if _is_symbolic(s) and str(s) not in axes:
                axes[str(s)] = "batch" if d == 0 else "sequence" if d == 1 else f"{name}_dim{d}"
    return _Names(inputs, outputs, dict(zip(axes, _unique(list(axes.values())))))


def _path_name(path) -> str:
    import torch.utils._pytree as pytree

    parts = []
    for k in path:
        if isinstance(k, pytree.MappingKey):
            parts.append(str(k.key))
        elif isinstance(k, pytree.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, pytree.SequenceKey):
            parts.append(str(k.idx))
        else:
            parts.append(re.sub(r"\W+", "", str(k)))
    name = "_".join(p for p in parts if p)
    if not name or name[0].isdigit():
        name = f"output_{name}" if name else "output"
    return name


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        k = seen.get(n, 0)
        seen[n] = k + 1
        out.append(n if k == 0 else f"{n}_{k}")
    return out


def _input_shapes(ep) -> list[tuple]:
    """The (possibly symbolic) shapes of the exported program's user inputs, in order."""
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    return [tuple(nodes[name].meta["val"].shape) for name in ep.graph_signature.user_inputs]


def _is_symbolic(s) -> bool:
    import torch

    return isinstance(s, torch.SymInt) and not s.node.expr.is_number


def _source(level) -> str:
    from vcyclefx.level import level_info

    return (level_info(level).source_class or type(level).__name__).rsplit(".", 1)[-1]


def _describe_axes(names: _Names) -> str:
    return ", ".join(sorted(set(names.axes.values())))


# ---------------------------------------------------------------------------------------------
# translation, staging, checker


def _translate(ep, names: _Names, opset: int, report_dir: Path, table):
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.onnx.export(
                ep, (), dynamo=True, opset_version=opset, input_names=names.inputs,
                output_names=names.outputs, report=True, artifacts_dir=report_dir, verbose=False,
                custom_translation_table=table,
            )
    except Exception as e:  # noqa: BLE001 - the exporter's errors are reported with their node
        raise ExportError(_conversion_message(e)) from e


_NODE_RE = re.compile(r"(?:Error when translating node|While executing) %(\S+) .*?target=([\w.]+)")
_OP_RE = re.compile(r"<OpOverload\(op='([\w.]+)', overload='(\w+)'\)>")


def _conversion_message(e: BaseException) -> str:
    """Name the node and op at fault from the exporter's exception chain."""
    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    node = op = None
    for err in chain:
        text = str(err)
        m = _NODE_RE.search(text)
        if m and node is None:
            node, op = m.group(1), m.group(2).removeprefix("torch.ops.")
        m = _OP_RE.search(text)
        if m and op is None:
            op = f"{m.group(1)}.{m.group(2)}"
    cause = chain[-1]
    where = f"node %{node} ({op})" if node else f"op {op}" if op else "the exported program"
    hint = (f" The exporter has no ONNX lowering for {op}: pass custom_translation_table="
            f"{{torch.ops.{op}: onnxscript_function}} or rewrite the model without it."
            if "No ONNX function found" in str(cause) else "")
    return (f"cannot export {where} to ONNX: {type(cause).__name__}: {_first_line(cause)}.{hint}")


class _Stage:
    def __init__(self, root: Path, name: str):
        self.root = root
        self.file = root / name  # the ONNX file (and its external data, if any) are written here
        self.reports = root / "reports"  # the exporter's markdown reports


@contextlib.contextmanager
def _staging(path: Path):
    """A temporary directory beside ``path`` (``vcyclefx.store``); on success its files are
    flushed and moved into place (the ``.onnx`` last), on failure the exporter's reports are kept
    beside ``path`` and the rest is removed."""
    with temporary_directory(path) as root:
        stage = _Stage(root, path.name)
        stage.reports.mkdir()
        moved: list[Path] = []
        try:
            yield stage
            extra = [p for p in stage.root.iterdir() if p.is_file() and p != stage.file]
            for p in extra + [stage.file]:  # external data first: the .onnx appears last
                fsync_tree(p)
                publish(p, path.parent / p.name)
                moved.append(path.parent / p.name)
        except BaseException as e:
            for p in moved:  # only external data can have been moved: the .onnx goes last
                p.unlink(missing_ok=True)
            reports = _keep_reports(stage.reports, path)
            if reports and isinstance(e, ExportError):
                e.args = (f"{e.args[0]} Exporter report: {reports[0]}",)
                e.report = reports[0]
            raise


def _keep_reports(report_dir: Path, path: Path) -> list[Path]:
    """Move the exporter's failure reports next to ``path`` as ``<stem>.<report>.md``."""
    kept = []
    for p in sorted(report_dir.glob("*.md")):
        if p.name.endswith("_success.md"):
            continue
        dest = path.parent / f"{path.stem}.{p.name}"
        publish(p, dest)
        kept.append(dest)
    return kept


def _check_model(file: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(file), full_check=True)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"the exported model fails onnx.checker: {type(e).__name__}: "
                          f"{_first_line(e)}") from e


def _rename_symbolic_dims(program, axes: dict[str, str]) -> None:
    """Give the dynamic axes readable names (``s72`` -> ``batch``) in every shape of the graph,
    and make symbolic dimensions whose name is a number (``"3"``) the static size they are."""
    import onnx_ir as ir

    pattern = re.compile(r"\b(" + "|".join(map(re.escape, axes)) + r")\b") if axes else None

    def rename(d):
        if not (isinstance(d, ir.SymbolicDim) and d.value):
            return d
        if d.value.isdigit():
            return int(d.value)
        return ir.SymbolicDim(pattern.sub(lambda m: axes[m.group(1)], d.value)) if pattern else d

    graph = program.model.graph
    values = list(graph.inputs) + list(graph.outputs)
    values += [v for node in graph.all_nodes() for v in node.outputs]
    for value in dict.fromkeys(values):
        if value.shape is not None:
            value.shape = ir.Shape([rename(d) for d in value.shape])


# ---------------------------------------------------------------------------------------------
# check inputs


def candidate_sizes(level, args, limit: int = 6) -> list[tuple]:
    """Input shapes to check at, different from the capture's along the dynamic dimensions only
    (one tuple of shapes per run): first batch + 1 / other dims + 8, then batch + 2 / other dims
    x 2, then other sizes (shrinking too), for the caller to try in order: the graph's own guards
    reject sizes the level does not accept. Dimensions that share a symbol in the level's
    placeholders keep sharing a size. A static level has one candidate: the capture's shapes."""
    dims = _symbolic_input_dims(level, args)  # (input, dim) -> symbol
    captured = tuple(tuple(x.shape) for x in args)
    choices: dict = {}  # symbol -> candidate sizes
    for (i, d), sym in dims.items():
        choices.setdefault(sym, _candidates(captured[i][d], batch=d == 0))
    if not choices:
        return [captured]
    runs = []
    for j in range(max(map(len, choices.values()))):
        values = {sym: c[j % len(c)] for sym, c in choices.items()}
        runs.append(tuple(tuple(values[dims[i, d]] if (i, d) in dims else n for d, n in enumerate(shape))
                          for i, shape in enumerate(captured)))
    return [r for r in dict.fromkeys(runs) if r != captured][:limit]


def _symbolic_input_dims(level, args) -> dict:
    """``{(input index, dim): symbol}`` from the level's placeholders (``meta["val"]``), or from
    ``level_info(level).dynamic_dims`` (one symbol per dimension) where shapes are missing."""
    from vcyclefx.level import level_info

    placeholders = [n for n in level.graph.nodes if n.op == "placeholder"]
    vals = [n.meta.get("val") for n in placeholders]
    if len(vals) != len(args) or not all(hasattr(v, "shape") for v in vals):
        return {dim: dim for dim in level_info(level).dynamic_dims}
    return {(i, d): s.node.expr for i, v in enumerate(vals)
            for d, s in enumerate(v.shape) if _is_symbolic(s)}


def _candidates(size: int, batch: bool) -> list[int]:
    grow = [size + 1, size + 2, size + 3] if batch else [size + 8, size * 2, size + 4]
    shrink = [size - 1] if batch else [size - 8, size // 2, size - 4]
    # torch.export specialises sizes 0 and 1, so a symbolic dimension is at least 2
    return [v for v in dict.fromkeys(grow + shrink) if v != size and v >= 2] or [size]


def fresh_inputs(args, shapes, generator) -> tuple:
    """Random inputs with the given shapes that look like ``args``: floats with the example's mean
    and standard deviation, integers in the example's value range (token ids stay valid ids, 0/1
    masks stay 0/1), booleans random if the example has both values."""
    import torch

    out = []
    for x, shape in zip(args, shapes):
        if x.dtype == torch.bool:
            both = bool(x.any()) and not bool(x.all())
            out.append(torch.randint(0, 2, shape, generator=generator).bool() if both
                       else torch.full(shape, bool(x.flatten()[0]) if x.numel() else False))
        elif x.dtype.is_floating_point:
            xf = x.double()
            mean, std = (float(xf.mean()), float(xf.std())) if x.numel() > 1 else (0.0, 1.0)
            out.append((torch.randn(shape, generator=generator, dtype=torch.float64) * std + mean)
                       .to(x.dtype))
        elif not x.dtype.is_complex:
            lo, hi = (int(x.min()), int(x.max())) if x.numel() else (0, 0)
            out.append(torch.randint(lo, hi + 1, shape, generator=generator, dtype=x.dtype))
        else:
            raise ExportError(f"cannot draw check inputs of dtype {x.dtype}; pass check=False")
    return tuple(out)


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return re.sub(r"\x1b\[[0-9;]*m", "", lines[0]) if lines else type(e).__name__


# ---------------------------------------------------------------------------------------------
# command line


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "export-onnx", help="export a level to ONNX and check it with onnxruntime",
        description="Export a level directory (or MODEL) to an ONNX file in eval mode with dynamic "
                    "batch/sequence axes, check it with onnx.checker and compare it with torch in "
                    "onnxruntime at two input sizes different from the capture's.")
    p.add_argument("level", metavar="DIR",
                   help="a level directory written by 'vcyclefx coalesce' (or MODEL: "
                        "package.module:factory or a .pt2 file)")
    p.add_argument("-o", "--output", required=True, metavar="FILE.onnx", help="the ONNX file to write")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the onnxruntime comparison")
    p.add_argument("--opset", type=int, default=MIN_OPSET, help=f"ONNX opset (>= {MIN_OPSET})")
    p.add_argument("--rtol", type=float, default=1e-4,
                   help="largest relative error max|onnx - torch| / max|torch| accepted")
    p.add_argument("--frontend", choices=["export", "fx"], default=None,
                   help="capture front-end when MODEL is not a level yet (default: torch.export)")
    p.set_defaults(func=_cmd_export_onnx)


def _cmd_export_onnx(args) -> int:
    import sys

    from vcyclefx.capture.specs import model_from_spec

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("export-onnx: %(message)s"))
    old_level, old_propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        log.info("loading %s", args.level)
        found = model_from_spec(args.level)
        model, example = found.model, found.example
        out = export_onnx(model, example, args.output, check=args.check, opset=args.opset,
                          rtol=args.rtol, frontend=args.frontend)
        log.info("wrote %s (%.1f kB)", out, out.stat().st_size / 1024)
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
        log.propagate = old_propagate
    return 0
