"""Checking an ONNX file against its torch level with onnxruntime (step 4 of ``export_onnx``).

:func:`check_onnx` runs the file in onnxruntime and the level in torch (eval mode) on fresh
random inputs at sizes different from the capture's, along the dynamic dimensions only
(:func:`candidate_sizes`, drawn by :func:`fresh_inputs`), and compares them per output: the
*relative error* ``max|onnx - torch| / max|torch|`` must be <= ``rtol`` (precisely:
``max|onnx - torch| <= rtol * max|torch| + atol``; ``atol`` only matters for outputs that are all
zeros). Also here: the level and inputs of a call and its eval-mode switch, which the export
shares. onnxruntime is imported by :func:`check_onnx` only.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.utils._pytree as pytree

from vcyclefx.capture.frontend import as_level
from vcyclefx.errors import ExportError
from vcyclefx.level import level_info

log = logging.getLogger("vcyclefx.export.onnx")  # the export's logger: one stream for the CLI


@dataclass(frozen=True)
class OutputCheck:
    """One output of one onnxruntime run compared with torch."""
    output: str  # the ONNX output name
    input_shapes: tuple  # the shapes of the inputs of this run
    max_abs_error: float  # max |onnx - torch|
    max_abs_ref: float  # max |torch|
    rel_error: float  # max_abs_error / max_abs_ref (max_abs_error when the reference is all zeros)
    ok: bool  # max_abs_error <= rtol * max_abs_ref + atol


def check_onnx(level, onnx_path, example_inputs=None, *, sizes=None, rtol: float = 1e-4,
               atol: float = 1e-6, seed: int = 0) -> list[OutputCheck]:
    """Run ``onnx_path`` in onnxruntime and ``level`` in torch (eval mode) on the same fresh random
    inputs, one run per entry of ``sizes`` (default: the first two sizes of
    :func:`candidate_sizes` that the torch level accepts), and return one :class:`OutputCheck`
    per run and output. A mismatch is not raised (see ``OutputCheck.ok``); a file that does not
    load or run, or outputs without the torch shapes, raise :class:`ExportError`."""
    import onnxruntime as ort

    level, args = level_and_inputs(level, example_inputs, None)
    with eval_mode(level):
        try:
            session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - any onnxruntime failure is reported with its file
            raise ExportError(f"{onnx_path}: onnxruntime cannot load the model "
                              f"({type(e).__name__}: {first_line(e)})") from e
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
                                  f"{_fmt(shapes)} ({type(e).__name__}: {first_line(e)})") from e
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
                                  f"{type(e).__name__}: {first_line(e)}") from e
            log.debug("check: the level rejects input sizes %s (%s)", _fmt(shapes), first_line(e))
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
    a, b = got.astype(np.float64), expected.astype(np.float64)
    finite = np.isfinite(b)
    if not np.array_equal(finite, np.isfinite(a)) or not np.array_equal(a[~finite], b[~finite]):
        return OutputCheck(name, shapes, float("inf"), float("nan"), float("inf"), False)
    err = float(np.max(np.abs(a - b)[finite], initial=0.0))
    ref = float(np.max(np.abs(b)[finite], initial=0.0))
    rel = err / ref if ref > 0 else err
    return OutputCheck(name, shapes, err, ref, rel, err <= rtol * ref + atol)


def raise_on_mismatch(results: list[OutputCheck], rtol: float, atol: float) -> None:
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


def level_and_inputs(level, example_inputs, frontend):
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    kwargs = {"frontend": frontend} if frontend else {}
    level = as_level(level, example_inputs, **kwargs)
    args = tuple(example_inputs) if example_inputs is not None else level_info(level).example_inputs
    return level, args


@contextlib.contextmanager
def eval_mode(level):
    """Eval mode (dropout off, BatchNorm running statistics) inside, the caller's mode after."""
    was_training = level.training
    level.eval()
    try:
        yield level
    finally:
        level.train(was_training)


def is_symbolic(s) -> bool:
    return isinstance(s, torch.SymInt) and not s.node.expr.is_number


def candidate_sizes(level, args, limit: int = 6) -> list[tuple]:
    """Input shapes to check at, different from the capture's along the dynamic dimensions only
    (one tuple of shapes per run): first batch + 1 / other dims + 8, then batch + 2 / other dims
    x 2, then other sizes (shrinking too), for the caller to try in order: the graph's own guards
    reject sizes the level does not accept. Dimensions that share a symbol in the level's
    placeholders keep sharing a size. A static level has one candidate: the capture's shapes."""
    dims = symbolic_input_dims(level, args)  # (input, dim) -> symbol
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


def symbolic_input_dims(level, args) -> dict:
    """``{(input index, dim): symbol}`` from the level's placeholders (``meta["val"]``), or from
    ``level_info(level).dynamic_dims`` (one symbol per dimension) where shapes are missing."""
    placeholders = [n for n in level.graph.nodes if n.op == "placeholder"]
    vals = [n.meta.get("val") for n in placeholders]
    if len(vals) != len(args) or not all(hasattr(v, "shape") for v in vals):
        return {dim: dim for dim in level_info(level).dynamic_dims}
    return {(i, d): s.node.expr for i, v in enumerate(vals)
            for d, s in enumerate(v.shape) if is_symbolic(s)}


def _candidates(size: int, batch: bool) -> list[int]:
    grow = [size + 1, size + 2, size + 3] if batch else [size + 8, size * 2, size + 4]
    shrink = [size - 1] if batch else [size - 8, size // 2, size - 4]
    # torch.export specialises sizes 0 and 1, so a symbolic dimension is at least 2
    return [v for v in dict.fromkeys(grow + shrink) if v != size and v >= 2] or [size]


def fresh_inputs(args, shapes, generator) -> tuple:
    """Random inputs with the given shapes that look like ``args``: floats with the example's mean
    and standard deviation, integers in the example's value range (token ids stay valid ids, 0/1
    masks stay 0/1), booleans random if the example has both values."""
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


def first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return re.sub(r"\x1b\[[0-9;]*m", "", lines[0]) if lines else type(e).__name__
