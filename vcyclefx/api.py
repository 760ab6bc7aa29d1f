"""``vf.coalesce`` / ``vf.decoalesce`` / ``vf.interpolate``: the public transforms.

A Mapping always relates a larger level to a smaller one. Coalescing applies width, then depth;
de-coalescing applies depth, then width, so the width part of a mapping always refers to the
full-depth graph of the larger level.
"""

from __future__ import annotations

import torch

from passes.depth import DepthPass, DepthPlan
from passes.width import WidthPass, WidthPlan

from vcyclefx.analysis.analyze import analyze
from vcyclefx.errors import LevelError, MappingError, PlanError
from vcyclefx.capture.frontend import as_level
from vcyclefx.level import clone_level, level_info
from vcyclefx.plan.choices import (
    COALESCE, DECOALESCE, DEPTH_INITS, DEPTH_PAIRINGS, WIDTH_PAIRINGS, one_of,
)
from vcyclefx.plan.depth import plan_depth
from vcyclefx.plan.mapping import Mapping
from vcyclefx.plan.width import plan_width
from vcyclefx import selfcheck


def tensor_shapes(level) -> dict[str, list[int]]:
    out = {k: list(v.shape) for k, v in level.named_parameters(remove_duplicate=False)}
    out.update({k: list(v.shape) for k, v in level.named_buffers(remove_duplicate=False)})
    return out


def _check_shapes(level, expected: dict[str, list[int]], which: str) -> None:
    actual = tensor_shapes(level)
    for name, shape in expected.items():
        if name not in actual:
            raise MappingError(
                f"tensor {name} of the mapping's {which} level is not in this model; the mapping "
                "was made for another model"
            )
        if actual[name] != list(shape):
            raise MappingError(
                f"tensor {name} has shape {actual[name]} here but {list(shape)} on the mapping's "
                f"{which} level; the mapping was made for another model or level"
            )
    extra = sorted(set(actual) - set(expected))
    if extra:
        raise MappingError(f"tensor {extra[0]} is not in the mapping's {which} level; the mapping "
                           "was made for another model")


def _owned(result, level):
    """A transform's result never is its input: a no-op returns a copy."""
    return clone_level(result) if result is level else result


def _width(level, spaces, direction, analysis=None, check=False, what=None):
    """``analysis``: the level's own (chains=False), where the caller has it already.
    ``check``: de-coalescing must keep the function (equal groups): run both and compare."""
    if not spaces:
        return level, []
    analysis = analysis or analyze(level, chains=False)
    res = WidthPass(analysis)(level, WidthPlan(direction, tuple(spaces)))
    if check and direction == DECOALESCE and selfcheck.keeps_width(spaces) and \
            selfcheck.checkable(level, res.module):
        selfcheck.check_width(level, res.module, analysis, spaces, res.mapping, what=what)
    return res.module, res.mapping


def _depth(level, chains, direction, depth_init=None, check=False, what=None):
    """``check``: identity growth must keep the function: run both and compare."""
    if not chains:
        return level
    out = DepthPass()(level, DepthPlan(direction, tuple(chains), depth_init)).module
    if check and direction == DECOALESCE and selfcheck.keeps_depth(chains, depth_init) and \
            selfcheck.checkable(level, out):
        selfcheck.check_depth(level, out, chains, what=what)
    return out


def _check_coalesced(level, result, mapping, check):
    """Coalescing cannot keep the function; it checks what it can (vcyclefx.selfcheck): the
    result's outputs stay finite, and de-coalescing it back through ``mapping`` with identity
    growth keeps its function (the checks of ``decoalesce``), so a wrong rule met on the way
    down is named on the way back up."""
    if not (check and result is not level and selfcheck.checkable(level, result)):
        return
    with selfcheck.reusing_runs():
        selfcheck.check_finite(level, result)
        try:
            grown = _depth(result, mapping.chains, DECOALESCE, "identity", check=True,
                           what="coalescing's round trip (identity depth growth)")
        except PlanError:  # blocks that are not residual (post-norm BERT) have no identity:
            # copied blocks change the function, so only the width stage is checked
            grown = _depth(result, mapping.chains, DECOALESCE, "copy")
        _width(grown, mapping.spaces, DECOALESCE, check=True,
               what="coalescing's round trip (width de-coalescing)")


def _plan_depth(level, factor, pairing, coalesce, depth_init=DEPTH_INITS[0]):
    if factor == 1:
        return []
    return plan_depth(analyze(level), factor, pairing, coalesce=coalesce, depth_init=depth_init)


def coalesce(model, example_inputs=None, *, width: float = 1.0, depth: float = 1.0,
             pairing: str = WIDTH_PAIRINGS[0], depth_pairing: str = DEPTH_PAIRINGS[0],
             mapping: Mapping | None = None, check: bool = True, **capture_kwargs):
    """A smaller level of ``model`` and the Mapping from ``model`` to it.

    ``check``: run the result on the example inputs and raise SelfCheckError (naming the first
    node) if its outputs are not finite where the input's are, or if de-coalescing it back with
    identity growth does not keep its function (vcyclefx.selfcheck)."""
    level = as_level(model, example_inputs, **capture_kwargs)
    if mapping is not None:
        if width != 1.0 or depth != 1.0:
            raise PlanError("pass either mapping= or width=/depth= factors, not both")
        _check_shapes(level, mapping.large_shapes, "larger")
        cur, _ = _width(level, mapping.spaces, COALESCE)
        cur = _depth(cur, mapping.chains, COALESCE)
        _check_shapes(cur, mapping.small_shapes, "smaller")
        _check_coalesced(level, cur, mapping, check)
        return _owned(cur, level), mapping
    large = tensor_shapes(level)
    spaces, kept, analysis = [], [], None
    if width != 1.0:
        analysis = analyze(level, chains=False)
        decision = plan_width(analysis, width, pairing, coalesce=True)
        spaces, kept = decision.spaces, decision.kept
    elif not (0 < depth <= 1):
        raise PlanError(f"depth={depth} must be in (0, 1] to coalesce (e.g. depth=0.5)")
    cur, comps = _width(level, spaces, COALESCE, analysis)
    chains = _plan_depth(cur, depth, depth_pairing, coalesce=True)
    cur = _depth(cur, chains, COALESCE)
    info = level_info(level)
    m = Mapping(spaces=list(spaces), chains=list(chains), compensations=list(comps),
                large_shapes=large, small_shapes=tensor_shapes(cur), kept=kept,
                source_class=info.source_class if info else None)
    _check_coalesced(level, cur, m, check)
    return _owned(cur, level), m


def decoalesce(model, example_inputs=None, *, width: float = 1.0, depth: float = 1.0,
               pairing: str = WIDTH_PAIRINGS[0], depth_pairing: str = DEPTH_PAIRINGS[0],
               depth_init: str | None = None, mapping: Mapping | None = None,
               check: bool = True, **capture_kwargs):
    """A larger level: grown by factors, or restored to the shapes ``mapping`` came from.

    ``depth_init`` fills the new blocks of each group: ``"copy"`` (the default when growing by
    factors) or ``"identity"`` (residual writes zeroed: the same function). With ``mapping=``,
    None keeps the mapping's own choice and a value overrides it.

    ``check``: the stages that keep the function (width with equal group sizes, identity depth
    growth) run their input and output on the example inputs and raise SelfCheckError naming the
    first node whose values diverge (vcyclefx.selfcheck); ``check=False`` skips it."""
    if depth_init is not None and depth_init not in DEPTH_INITS:
        raise PlanError(f"depth_init={depth_init!r} must be {one_of(DEPTH_INITS)}")
    level = as_level(model, example_inputs, **capture_kwargs)
    if mapping is not None:
        if width != 1.0 or depth != 1.0:
            raise PlanError("pass either mapping= or width=/depth= factors, not both")
        _check_shapes(level, mapping.small_shapes, "smaller")
        cur = _depth(level, mapping.chains, DECOALESCE, depth_init, check=check)
        cur, _ = _width(cur, mapping.spaces, DECOALESCE, check=check)
        _check_shapes(cur, mapping.large_shapes, "larger")
        return _owned(cur, level), mapping
    small = tensor_shapes(level)
    if depth != 1.0 and depth < 1:
        raise PlanError(f"depth={depth} must be >= 1 to de-coalesce (e.g. depth=2.0)")
    chains = _plan_depth(level, depth, depth_pairing, coalesce=False,
                         depth_init=depth_init or DEPTH_INITS[0])
    cur = _depth(level, chains, DECOALESCE, check=check)
    spaces, kept, analysis = [], [], None
    if width != 1.0:
        analysis = analyze(cur, chains=False)
        decision = plan_width(analysis, width, pairing, coalesce=False)
        spaces, kept = decision.spaces, decision.kept
    cur, comps = _width(cur, spaces, DECOALESCE, analysis, check=check)
    info = level_info(level)
    m = Mapping(spaces=list(spaces), chains=list(chains), compensations=list(comps),
                large_shapes=tensor_shapes(cur), small_shapes=small, kept=kept,
                source_class=info.source_class if info else None)
    return _owned(cur, level), m


def interpolate(before, after, alpha: float):
    """``(1 - alpha) * before + alpha * after``, tensor by tensor, for same-shaped levels.

    Floating tensors are interpolated; integer buffers (step counters) are taken from ``after``.
    Returns a new level with ``before``'s graph; neither input is changed.
    """
    _check_alpha(alpha)
    for name, m in (("before", before), ("after", after)):
        if not isinstance(m, torch.nn.Module):
            raise LevelError(f"interpolate: {name} must be a module, got {type(m).__name__}")
    sa, sb = before.state_dict(keep_vars=True), after.state_dict(keep_vars=True)
    if sa.keys() != sb.keys():
        missing = sorted(set(sa) ^ set(sb))
        raise MappingError(f"interpolate: the levels have different tensors (first difference: "
                           f"{missing[0]})")
    for k in sa:
        if sa[k].shape != sb[k].shape:
            raise MappingError(f"interpolate: tensor {k} has shape {list(sa[k].shape)} in before "
                               f"but {list(sb[k].shape)} in after")
    out = clone_level(before)  # a deep copy, for levels and plain modules alike
    with torch.no_grad():
        out.load_state_dict({k: mix(a, sb[k], float(alpha)) for k, a in sa.items()})
    return out


def _check_alpha(alpha) -> None:
    if not isinstance(alpha, (int, float)) or not (0.0 <= float(alpha) <= 1.0):
        raise PlanError(f"alpha={alpha!r} must be a number in [0, 1]")


def mix(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """One tensor of :func:`interpolate` (also what the streaming command line computes):
    floating tensors ``lerp(a, b, alpha)``, integer ones (step counters) ``b``; new memory."""
    a, b = a.detach(), b.detach()
    if not a.dtype.is_floating_point or alpha == 1.0:
        return b.clone()
    if alpha == 0.0:
        return a.clone()
    return torch.lerp(a, b.to(a.dtype), alpha)
