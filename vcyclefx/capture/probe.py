"""A faster capture for analysis only: two static exports instead of one symbolic export.

``torch.export`` with symbolic batch/sequence sizes costs 2-3x a static export (every shape
computation becomes sympy arithmetic: about 49k symbolic operations for the 124M GPT-2). The
analysis only needs to know *which* axes are batch/sequence sized and how (``s0``, ``2*s1``,
``s0*s1``), not a graph that runs at other sizes. So :func:`probe_capture` exports the model twice
with static shapes, at the example sizes and at other batch/sequence sizes, checks that both
graphs have the same ops in the same order, and labels every axis whose size differs between
them with the one monomial ``c * s0**i * s1**j`` that explains both sizes. The labels go into
``node.meta["vcyclefx_sizes"]``, which the analysis reads in preference to ``meta["val"]``.

Anything this cannot explain (graphs that differ because of Python control flow on a size, a
size such as ``s1 - 1``, sizes that fit more than one monomial) returns ``None`` and the caller
falls back to the ordinary symbolic capture, so the analysis never rests on a guess. The level
returned is static-shaped: it is for analysis and reports, not for running at other sizes.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import select
import signal
import sys
import threading
import time
from dataclasses import replace
from fractions import Fraction

import sympy
import torch

from vcyclefx.capture.frontend import _batch_and_sequence, _check_inputs, capture
from vcyclefx.analysis.dims import SIZES, sizes_of
from vcyclefx.level import level_info, make_level

log = logging.getLogger("vcyclefx.probe")

MAX_POWER = 3  # exponents per symbol tried in a fit (a flattened attention map is b * h * s**2)


def _resized_inputs(args: tuple, new_size: dict[int, int]) -> tuple:
    """The example inputs with every batch/sequence axis at its new size; values are taken
    cyclically from the originals (token ids stay valid, masks stay masks)."""
    out = []
    for x in args:
        for d in _batch_and_sequence(x):
            n = int(x.shape[d])
            x = x.index_select(d, torch.arange(new_size[n], device=x.device) % n)
        out.append(x)
    return tuple(out)


def _plan_sizes(args: tuple) -> tuple[dict[int, sympy.Symbol], dict[int, int]] | None:
    """One symbol per distinct example size of a batch/sequence axis (export's duck sizing
    does the same), and the size each is probed at: sequences shrink by a quarter (staying
    within position tables), batches grow by one."""
    seq_sizes, all_sizes = set(), []
    for x in args:
        for d in _batch_and_sequence(x):
            n = int(x.shape[d])
            if n not in all_sizes:
                all_sizes.append(n)
            if d == 1:
                seq_sizes.add(n)
    if not seq_sizes:
        return None  # batch-only symbolic export costs about what two static ones do
    if len(all_sizes) > 3 or min(all_sizes) < 2:
        return None  # sizes 0/1 are specialised by export anyway; many symbols: too ambiguous
    symbols = {n: sympy.Symbol(f"s{k}", integer=True, positive=True) for k, n in enumerate(all_sizes)}
    new = {}
    for n in all_sizes:
        m = n - max(1, n // 4) if n in seq_sizes and n >= 3 else n + 1
        if m in all_sizes or m in new.values():
            return None
        new[n] = m
    return symbols, new


def _fit(a: int, b: int, base: list[tuple[int, int, sympy.Symbol]]):
    """The monomial ``c * prod(sym**e)`` equal to ``a`` at the example sizes and ``b`` at the
    probe sizes, or None when none or more than one fits."""
    fits = []
    for powers in itertools.product(range(MAX_POWER + 1), repeat=len(base)):
        if not any(powers):
            continue
        p0 = p1 = 1
        for (n, m, _), e in zip(base, powers):
            p0, p1 = p0 * n**e, p1 * m**e
        c = Fraction(a, p0)
        if c * p1 == b:
            fits.append((c, powers))
    if len(fits) != 1:
        return None
    c, powers = fits[0]
    expr = sympy.Rational(c.numerator, c.denominator)
    for (_, _, sym), e in zip(base, powers):
        expr = expr * sym**e
    return expr


def _label(s0, s1, fit):
    """Labels for one node: equal sizes stay ints, differing ones become monomials; raises
    LookupError where the two captures cannot be matched."""
    if isinstance(s0, tuple) and isinstance(s1, tuple) and len(s0) == len(s1):
        out = []
        for a, b in zip(s0, s1):
            a, b = int(a), int(b)
            if a == b:
                out.append(a)
                continue
            expr = fit(a, b)
            if expr is None:
                raise LookupError(f"size {a} (probed: {b}) is not a monomial of batch/sequence")
            out.append(expr)
        return tuple(out)
    if isinstance(s0, list) and isinstance(s1, list) and len(s0) == len(s1):
        return [_label(x, y, fit) for x, y in zip(s0, s1)]
    if s0 is None and s1 is None:
        return None
    raise LookupError(f"output structure differs ({s0} vs {s1})")


def _signature(gm) -> list:
    """What the comparison needs of a graph: op, target and shapes of every node, in order
    (plain lists and ints, so that a forked child can send it back as JSON)."""
    return [[n.op, str(n.target), _jsonable(sizes_of(n))] for n in gm.graph.nodes]


def _jsonable(tree):
    if isinstance(tree, tuple):
        return {"shape": [int(s) for s in tree]}
    if isinstance(tree, list):
        return [_jsonable(t) for t in tree]
    return None


def _from_json(tree):
    if isinstance(tree, dict):
        return tuple(tree["shape"])
    if isinstance(tree, list):
        return [_from_json(t) for t in tree]
    return None


def _static_capture(model, args):
    """``capture(dynamic=False)``, quicker: no Python stack trace recorded per node (15-30% of a
    static export; a report never shows them), and the GraphModules export makes on the way are
    compiled to Python lazily (export builds ten of them for GPT-2-base; only the last one is
    used). Both are torch internals; where a torch version lacks them, capture is just slower."""
    with contextlib.ExitStack() as stack:
        config = getattr(torch.fx, "config", None)
        if hasattr(config, "do_not_emit_stack_traces"):
            before = config.do_not_emit_stack_traces
            config.do_not_emit_stack_traces = True
            stack.callback(setattr, config, "do_not_emit_stack_traces", before)
        try:
            from torch.fx._lazy_graph_module import _use_lazy_graph_module
        except ImportError:
            pass
        else:
            stack.enter_context(_use_lazy_graph_module(True))
        return capture(model, args, dynamic=False)


def _can_fork() -> bool:
    return (hasattr(os, "fork") and sys.platform.startswith("linux")
            and threading.active_count() == 1 and not torch.cuda.is_initialized())


class _Child:
    """The probe capture running in a forked child (the second core works while this process
    captures at the example sizes)."""

    def __init__(self, model, args):
        read_end, write_end = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # child: capture, send the signature, leave without any cleanup
            code = 0
            try:
                os.close(read_end)
                payload = {"signature": _signature(_static_capture(model, args))}
            except BaseException as e:  # noqa: BLE001 - reported to the parent, which falls back
                payload = {"error": f"{type(e).__name__}: {e}"}
                code = 1
            try:
                with os.fdopen(write_end, "w") as f:
                    json.dump(payload, f)
            finally:
                os._exit(code)
        os.close(write_end)
        self.fd = read_end

    def result(self, timeout: float) -> list:
        """The child's signature; LookupError if it failed or gave no answer in time."""
        chunks, deadline = [], time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                    raise LookupError(f"probe child gave no answer in {timeout:.0f}s")
                chunk = os.read(self.fd, 1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            self.close()
        payload = json.loads(b"".join(chunks) or b"{}")
        if "signature" not in payload:
            raise LookupError(payload.get("error", "probe child failed"))
        return payload["signature"]

    def close(self) -> None:
        if self.pid is None:
            return
        os.close(self.fd)
        try:
            os.kill(self.pid, signal.SIGKILL)  # no-op for a child that has finished
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)
        self.pid = None


def _fork_capture(model, args) -> _Child | None:
    """A child capturing ``model`` at ``args``, or None where forking is not safe."""
    return _Child(model, args) if _can_fork() else None


def probe_capture(model: torch.nn.Module, example_inputs, *, parallel: bool = False):
    """A static-shaped level whose nodes carry symbolic size labels, or None when the model
    cannot be probed this way (the caller then captures with symbolic shapes).

    ``parallel=True`` runs the second capture in a forked child on another core where that is
    safe (Linux, one Python thread, CUDA not initialised); the command line uses it."""
    args, _ = _check_inputs(model, example_inputs)
    plan = _plan_sizes(args)
    if plan is None:
        return None
    symbols, new = plan
    start = time.perf_counter()
    child = None
    try:
        resized = _resized_inputs(args, new)
        child = _fork_capture(model, resized) if parallel else None
        gm = _static_capture(model, args)
        own = time.perf_counter() - start
        if child is not None:
            others = [(op, target, _from_json(sz)) for op, target, sz in child.result(60 + 10 * own)]
        else:
            others = [(n.op, str(n.target), sizes_of(n))
                      for n in _static_capture(model, resized).graph.nodes]
    except Exception as e:  # noqa: BLE001 - any failure means: use the symbolic capture
        log.info("probe capture not possible (%s: %s); capturing symbolically", type(e).__name__, e)
        return None
    finally:
        if child is not None:
            child.close()
    nodes = list(gm.graph.nodes)
    if len(nodes) != len(others) or any(
        (n.op, str(n.target)) != (o[0], o[1]) for n, o in zip(nodes, others)
    ):
        log.info("probe captures differ in structure; capturing symbolically")
        return None
    base = [(n, new[n], symbols[n]) for n in symbols]
    fits: dict[tuple[int, int], sympy.Expr | None] = {}  # most axes repeat a few size pairs

    def fit(a: int, b: int):
        if (a, b) not in fits:
            fits[a, b] = _fit(a, b, base)
        return fits[a, b]

    labels = []
    try:
        for n, o in zip(nodes, others):
            labels.append(_label(sizes_of(n), o[2], fit))
    except LookupError as e:
        log.info("probe labels not possible (%s); capturing symbolically", e)
        return None
    dynamic_dims, inputs = [], 0
    for n, lab in zip(nodes, labels):
        if lab is not None and any(not isinstance(s, int) for s in _flat(lab)):
            n.meta[SIZES] = lab
        if n.op == "placeholder":
            if isinstance(lab, tuple):
                dynamic_dims += [(inputs, d) for d, s in enumerate(lab) if not isinstance(s, int)]
            inputs += 1
    make_level(gm, replace(level_info(gm), dynamic_dims=tuple(dynamic_dims)))
    log.info("probed %s with two static captures in %.2fs", type(model).__name__,
             time.perf_counter() - start)
    return gm


def _flat(lab):
    if isinstance(lab, tuple):
        return list(lab)
    if isinstance(lab, list):
        return [s for x in lab for s in _flat(x)]
    return []
