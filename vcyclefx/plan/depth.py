"""Planning for depth: which blocks of each chain group together.

``depth`` is a factor on block counts. ``adjacent`` (the paper's default) groups consecutive
blocks (2i, 2i+1); ``strided`` groups i with i + L/2. Odd counts give uneven groups (5 blocks at
0.5 -> groups of 2, 2, 1); the mapping records the grouping. A shared chain (one module
applied several times) changes its number of applications the same way. A periodic chain (a
layer pattern of period p) is grouped by whole periods: the blocks at one position of the
periods of a group form a block group. Blocks after a resized chain in the same container are
renumbered (the depth pass), so a later chain's new names are shifted by the blocks added
before it.
"""

from __future__ import annotations

import math

from vcyclefx.plan.identity import identity_zero_set

from vcyclefx.analysis.analyze import Analysis
from vcyclefx.analysis.ownership import relname
from vcyclefx.errors import PlanError
from vcyclefx.plan.choices import DEPTH_INITS, DEPTH_PAIRINGS
from vcyclefx.plan.mapping import ChainMap
from vcyclefx.plan.width import check_factor


def _groups(n_large: int, n_small: int, pairing: str) -> list[list[int]]:
    if pairing == "strided":
        return [[i for i in range(n_large) if i % n_small == g] for g in range(n_small)]
    base, extra = divmod(n_large, n_small)
    out, start = [], 0
    for g in range(n_small):
        size = base + (1 if g < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out


def plan_depth(analysis: Analysis, factor: float, pairing: str = DEPTH_PAIRINGS[0], *,
               coalesce: bool, depth_init: str = DEPTH_INITS[0]) -> list[ChainMap]:
    check_factor("depth", factor, coalesce)
    if pairing not in DEPTH_PAIRINGS:
        raise PlanError(f"depth_pairing={pairing!r} is not one of {DEPTH_PAIRINGS}")
    if factor == 1:
        return []
    if not analysis.chains:
        raise PlanError(
            f"depth={factor} needs a chain of repeated blocks, and this model has none "
            "(vcyclefx inspect lists chains); use depth=1"
        )
    out: list[ChainMap] = []
    reasons = []
    shift: dict[str, int] = {}  # per container: blocks added before the next chain in it
    for c in analysis.chains:
        if not c.depth_ok:
            reasons.append(f"{c.container}: {c.reason}")
            continue
        if c.name_pattern() is None:
            reasons.append(f"{c.container}: block names {c.blocks[:2]}... are not numbered")
            continue
        n, p, d = c.periods, c.period, shift.get(c.container, 0)
        unit = f"periods of {p} blocks" if p > 1 else "blocks"
        if coalesce:
            m = max(1, math.ceil(n * factor - 1e-9))
            if m == n:
                continue
            groups = _groups(n, m, pairing)
            large, small = list(c.blocks), [c.block_name(j, d) for j in range(m * p)]
        else:
            big = n * factor
            if abs(big - round(big)) > 1e-9:
                raise PlanError(f"depth={factor} on chain {c.container} of {n} {unit} gives "
                                f"{big} {unit}; choose a factor that gives a whole number")
            big = int(round(big))
            groups = _groups(big, n, pairing)
            large, small = [c.block_name(j, d) for j in range(big * p)], list(c.blocks)
        shift[c.container] = d + (len(small) - len(large) if coalesce else len(large) - len(small))
        # groups of periods -> groups of blocks, position by position within the period
        groups = [[i * p + r for i in members] for members in groups for r in range(p)]
        # a coalescing mapping keeps the zero set too, so that it can later de-coalesce with
        # identity blocks; an empty set (not residual) then means "copies only"
        zero: list[str] = []
        by_position: list[list[str]] = []
        if c.shared and depth_init == "identity" and not coalesce:
            raise PlanError(
                f"depth_init='identity' on chain {c.container}: its {n} blocks are applications "
                "of one module with shared weights, so zeroing the last write of a new "
                "application would zero it in every application; use depth_init='copy'")
        if c.shared:
            pass  # no identity growth for shared weights: the mapping keeps an empty zero set
        elif coalesce or depth_init == "identity":
            try:
                if p == 1:
                    zero = identity_zero_set(c.nodes[0], c.blocks[0], c.chained)
                else:
                    by_position = _zero_by_position(c)
            except PlanError:
                if not coalesce:
                    raise
        out.append(ChainMap(container=c.container, large_blocks=large, small_blocks=small,
                            groups=groups, depth_init=depth_init, zero_on_identity=zero,
                            chained=[list(x) for x in c.chained], period=p,
                            zero_by_position=by_position))
    if not out:
        raise PlanError(f"depth={factor} changes no chain" +
                        (f": {'; '.join(reasons)}" if reasons else " (each is already that size)"))
    return out


def _zero_by_position(c) -> list[list[str]]:
    """Per position in the period, the relative names of the tensors whose zeroing makes that
    block the identity: the identity set of the first period taken as one block (its links are
    the period's), split by the block each tensor belongs to."""
    first = tuple(c.blocks[:c.period])
    out: list[list[str]] = [[] for _ in first]
    for name in identity_zero_set(c.unit_nodes(0), first, c.chained):
        r = next(r for r, b in enumerate(first) if relname(name, b) is not None)
        out[r].append(relname(name, first[r]))
    return out
