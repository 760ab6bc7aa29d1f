"""Mappings between two levels: small, JSON-serialisable, versioned.

A :class:`Mapping` always relates a *larger* level to a *smaller* one, whichever call made it.
Per space it stores, for each unit of the larger level, the unit of the smaller level it belongs
to (sparse index form: applied with gather / index_add, never as a dense matrix); per chain, the
groups of larger-level blocks that make each smaller-level block; and the scale compensations of
tied tensors. It also records every tensor's shape on both sides, so that applying it to the
wrong model fails with a message naming the first tensor that does not fit.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vcyclefx.errors import MappingError
from vcyclefx.plan.choices import DEPTH_INITS, one_of
from vcyclefx.store import atomic_write_text

FORMAT = "vcyclefx.mapping"
VERSION = 1


@dataclass
class SpaceMap:
    key: str  # the space's stable key (see analysis.Space.key), on the larger level
    large: int  # units on the larger level
    small: int  # units on the smaller level
    index: list[int]  # for each larger unit, its smaller unit
    unit: int = 1  # features per unit (informational)
    normalized: bool = False  # a norm runs over the space

    def groups(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in range(self.small)]
        for i, g in enumerate(self.index):
            out[g].append(i)
        return out

    def validate(self) -> None:
        if len(self.index) != self.large:
            raise MappingError(f"space {self.key}: index has {len(self.index)} entries, expected {self.large}")
        if any(not (0 <= g < self.small) for g in self.index):
            raise MappingError(f"space {self.key}: index values must be in [0, {self.small})")
        if len(set(self.index)) != self.small:
            raise MappingError(f"space {self.key}: some of its {self.small} smaller units have no larger unit")


@dataclass
class ChainMap:
    container: str
    large_blocks: list[str]
    small_blocks: list[str]
    groups: list[list[int]]  # for each smaller block, the indices of its larger blocks
    depth_init: str = DEPTH_INITS[0]  # how de-coalescing fills the blocks of a group
    zero_on_identity: list[str] = field(default_factory=list)  # relative tensor names
    chained: list[list[int]] = field(default_factory=list)  # (input slot, output position) pairs
    # a layer pattern: blocks per repeating unit; ``chained`` then links units (the nodes of
    # ``period`` blocks), each group holds blocks of one position in the period, and
    # ``zero_by_position`` lists per position the tensors ``zero_on_identity`` lists for period 1
    period: int = 1
    zero_by_position: list[list[str]] = field(default_factory=list)

    def zero_set(self, block: int) -> list[str]:
        """Relative names of the tensors to zero in block ``block`` of the larger level to make
        it the identity."""
        if self.period == 1:
            return self.zero_on_identity
        return self.zero_by_position[block % self.period] if self.zero_by_position else []

    def validate(self) -> None:
        p = self.period
        if p < 1 or len(self.large_blocks) % p or len(self.small_blocks) % p:
            raise MappingError(f"chain {self.container}: period {p} does not divide its "
                               f"{len(self.large_blocks)} and {len(self.small_blocks)} blocks")
        if any(i % p != g % p for g, members in enumerate(self.groups) for i in members):
            raise MappingError(f"chain {self.container}: a group of period {p} mixes blocks of "
                               "different positions in the period")
        if self.zero_by_position and len(self.zero_by_position) != p:
            raise MappingError(f"chain {self.container}: zero_by_position needs one list per "
                               f"position of period {p}")
        if len(self.groups) != len(self.small_blocks):
            raise MappingError(f"chain {self.container}: {len(self.groups)} groups for {len(self.small_blocks)} blocks")
        flat = sorted(i for g in self.groups for i in g)
        if flat != list(range(len(self.large_blocks))):
            raise MappingError(f"chain {self.container}: groups must cover blocks 0..{len(self.large_blocks) - 1} once")
        if self.depth_init not in DEPTH_INITS:
            raise MappingError(f"chain {self.container}: depth_init must be {one_of(DEPTH_INITS)}")


TIED = "tied"
WEIGHT_NORM = "weight_norm"


@dataclass
class Compensation:
    """A scale one level carries relative to the other, where mapping tensors alone cannot be
    exact.

    ``kind`` ``"tied"``: a tied tensor keeps the producer rule; its consumer input is scaled
    instead. ``factor`` is what the smaller level multiplies the consumer input by, relative to
    the larger level (the group size); ``node`` is the contraction where the tensor is a
    consumer.

    ``kind`` ``"weight_norm"``: copying or splitting ``v`` inside the norm of ``w = g v/||v||``
    changes ``||v||``; ``factor`` is what the smaller level multiplies ``w`` (the output of
    ``node``) by, ``prod(k ** (halves[k] / 2))`` over group sizes k (kept as whole half-powers
    so that scale nodes cancel exactly).

    ``fold`` lists tensors that carry the factor (a norm's affine parameters, weight norm's
    ``g``) where that is exact; empty means an explicit scale node.
    """

    tensor: str
    space: str
    factor: float
    node: str
    fold: list[str] = field(default_factory=list)
    kind: str = TIED
    halves: dict[str, int] = field(default_factory=dict)


@dataclass
class Mapping:
    spaces: list[SpaceMap] = field(default_factory=list)
    chains: list[ChainMap] = field(default_factory=list)
    compensations: list[Compensation] = field(default_factory=list)
    large_shapes: dict[str, list[int]] = field(default_factory=dict)
    small_shapes: dict[str, list[int]] = field(default_factory=dict)
    kept: list[dict[str, Any]] = field(default_factory=list)  # spaces left as they were, and why
    source_class: str | None = None
    version: int = VERSION

    # -- queries -----------------------------------------------------------------------------------
    def space(self, key: str) -> SpaceMap:
        for s in self.spaces:
            if s.key == key:
                return s
        raise KeyError(key)

    def validate(self) -> None:
        if self.version != VERSION:
            raise MappingError(f"mapping version {self.version} is not supported (this vcyclefx reads {VERSION})")
        for s in self.spaces:
            s.validate()
        for c in self.chains:
            c.validate()

    def summary(self) -> str:
        lines = []
        for s in self.spaces:
            lines.append(f"space {s.key}: {s.large} -> {s.small} units (unit {s.unit})")
        for c in self.chains:
            period = f" (period {c.period})" if c.period > 1 else ""
            lines.append(f"chain {c.container}: {len(c.large_blocks)} -> {len(c.small_blocks)} blocks"
                         f"{period}, groups {c.groups}")
        for k in self.kept:
            lines.append(f"kept space {k['key']}: {k['reason']}")
        for c in self.compensations:
            if c.kind == WEIGHT_NORM:
                where = f"folded into {', '.join(c.fold)}" if c.fold else f"scale node after {c.node}"
                lines.append(f"weight norm of {c.tensor}: weight x{c.factor:g} on the smaller level "
                             f"({where})")
                continue
            where = f"folded into {', '.join(c.fold)}" if c.fold else f"scale node before {c.node}"
            lines.append(f"tied {c.tensor}: consumer input x{c.factor:g} on the smaller level ({where})")
        return "\n".join(lines)

    # -- serialisation ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["format"] = FORMAT
        for c in d["chains"]:  # written only for layer patterns: plain chains read as before
            if c["period"] == 1 and not c["zero_by_position"]:
                del c["period"], c["zero_by_position"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "mapping") -> "Mapping":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise MappingError(f"{source}: not a vcyclefx mapping (missing \"format\": \"{FORMAT}\")")
        try:
            m = cls(
                spaces=[SpaceMap(**s) for s in d["spaces"]],
                chains=[ChainMap(**c) for c in d["chains"]],
                compensations=[Compensation(**c) for c in d.get("compensations", [])],
                large_shapes={k: list(v) for k, v in d["large_shapes"].items()},
                small_shapes={k: list(v) for k, v in d["small_shapes"].items()},
                kept=list(d.get("kept", [])),
                source_class=d.get("source_class"),
                version=int(d["version"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise MappingError(f"{source}: malformed mapping ({type(e).__name__}: {e})") from e
        try:
            m.validate()
        except MappingError as e:
            raise MappingError(f"{source}: {e}") from e
        return m

    def save(self, path: str | os.PathLike) -> None:
        """Write the mapping as JSON, atomically (``vcyclefx.store``)."""
        self.validate()
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Mapping":
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise MappingError(f"cannot read mapping file {p}: {e.strerror}") from e
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise MappingError(f"mapping file {p} is not valid JSON (line {e.lineno}: {e.msg}); "
                               "it may be truncated or corrupted") from e
        return cls.from_dict(d, source=f"mapping file {p}")
