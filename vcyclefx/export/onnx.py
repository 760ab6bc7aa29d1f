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
   decomposition step fails on what torch runs, and ops it cannot lower are computed with
   ordinary ones (``vcyclefx.export.onnx_graph``), so a level exports where a plain
   ``torch.onnx.export`` of its model fails;
3. the file passes ``onnx.checker.check_model(full_check=True)``;
4. with ``check=True`` it is run in onnxruntime on fresh random inputs at two sizes different
   from the capture's (along the dynamic dimensions only, sizes the torch level accepts) and
   compared with the torch level in eval mode (``vcyclefx.export.onnx_check``): per output, the
   *relative error* ``max|onnx - torch| / max|torch|`` must be <= ``rtol``.

Everything is written into a temporary directory beside the output (``vcyclefx.store``) and
moved into place only when all steps succeeded, so a failure never leaves a partial ``.onnx`` (or external-data file)
behind. A failure is an :class:`~vcyclefx.errors.ExportError` naming the node and op at fault and
the exporter's markdown report, which is kept beside the output file.

This module is imported by the CLI to register ``export-onnx`` (:func:`register_cli`); onnx,
onnx_ir and onnxruntime are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.utils._pytree as pytree

from vcyclefx.capture.frontend import dynamic_shapes_for, export_program
from vcyclefx.capture.specs import model_from_spec
from vcyclefx.errors import ExportError
from vcyclefx.export.onnx_check import (OutputCheck, candidate_sizes, check_onnx, eval_mode,
                                        first_line, fresh_inputs, is_symbolic, level_and_inputs,
                                        raise_on_mismatch, symbolic_input_dims)
from vcyclefx.export.onnx_graph import exportable, grouped_mm_rows, normalise_for_onnx
from vcyclefx.level import level_info
from vcyclefx.store import fsync_tree, publish, temporary_directory

# the check and graph helpers are imported from here too (tests, tools/bench_onnx.py)
__all__ = ["MIN_OPSET", "OutputCheck", "candidate_sizes", "check_onnx", "export_onnx",
           "fresh_inputs", "grouped_mm_rows", "normalise_for_onnx", "register_cli"]

log = logging.getLogger("vcyclefx.export.onnx")

MIN_OPSET = 18


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
    level, args = level_and_inputs(level, example_inputs, frontend)
    with eval_mode(level), _staging(path) as stage:
        ep = _reexport(exportable(level), args)
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
            raise_on_mismatch(results, rtol, atol)
    return path


# ---------------------------------------------------------------------------------------------
# level, mode, re-export, names


def _reexport(level, args):
    """``torch.export`` of the level in its current mode, dynamic where the level's placeholders
    are symbolic (``level_info(level).dynamic_dims`` can also list dimensions that the capture
    specialised to a constant)."""
    try:
        return export_program(level, args, dynamic_shapes_for(args, symbolic_input_dims(level, args)))
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"torch.export of the level in eval mode failed (step 1 of the ONNX "
                          f"export): {type(e).__name__}: {first_line(e)}") from e


@dataclass(frozen=True)
class _Names:
    inputs: list[str]
    outputs: list[str]
    axes: dict[str, str]  # symbol of a dynamic input dimension -> axis name in the ONNX file


def _io_names(level, ep, args) -> _Names:
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
            if is_symbolic(s) and str(s) not in axes:
                axes[str(s)] = "batch" if d == 0 else "sequence" if d == 1 else f"{name}_dim{d}"
    return _Names(inputs, outputs, dict(zip(axes, _unique(list(axes.values())))))


def _path_name(path) -> str:
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


def _source(level) -> str:
    return (level_info(level).source_class or type(level).__name__).rsplit(".", 1)[-1]


def _describe_axes(names: _Names) -> str:
    return ", ".join(sorted(set(names.axes.values())))


# ---------------------------------------------------------------------------------------------
# translation, staging, checker


def _translate(ep, names: _Names, opset: int, report_dir: Path, table):
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
    return (f"cannot export {where} to ONNX: {type(cause).__name__}: {first_line(cause)}.{hint}")


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
                          f"{first_line(e)}") from e


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
