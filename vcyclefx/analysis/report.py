"""``vf.inspect``: what the analysis found, as a readable table and as JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from vcyclefx.analysis.analyze import Analysis, Space, analyze, natural_key
from vcyclefx.analysis.chains import Chain
from vcyclefx.capture.frontend import as_level
from vcyclefx.level import level_info


@dataclass
class Report:
    analysis: Analysis = field(repr=False)
    model_name: str = ""
    capture_notes: tuple = ()

    @property
    def spaces(self) -> list[Space]:
        return self.analysis.spaces

    @property
    def resizable(self) -> list[Space]:
        return [s for s in self.analysis.spaces if s.resizable]

    @property
    def chains(self) -> list[Chain]:
        return self.analysis.chains

    @property
    def tied(self) -> list[str]:
        return self.analysis.tied

    def to_dict(self) -> dict[str, Any]:
        a = self.analysis
        return {
            "model": self.model_name,
            "nodes": len(a.gm.graph.nodes),
            "parameters": sum(int(t.numel()) for t in a.gm.parameters()),
            "spaces": [_space_dict(s) for s in a.spaces],
            "chains": [
                {"container": c.container, "blocks": len(c), "period": c.period,
                 "block_paths": c.blocks,
                 "tensors_per_block": c.params_per_block,
                 "parameters_per_block": _block_numel(a, c),
                 "depth_resizable": c.depth_ok, "reason": c.reason}
                for c in a.chains
            ],
            "tied": [
                {"tensor": name, "aliases": list(a.tensors[name].aliases),
                 "roles": sorted({r for ax in range(len(a.tensors[name].shape))
                                  for r in a.roles.get((name, ax), ())})}
                for name in a.tied
            ],
            "notes": list(self.capture_notes),
            "analysis_seconds": round(a.seconds, 4),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        return format_report(self)


def _space_dict(s: Space) -> dict[str, Any]:
    return {
        "id": s.id, "key": s.key, "size": s.size, "unit": s.unit, "kind": s.kind,
        "resizable": s.resizable, "reason": s.reason, "normalized_by": s.normalized,
        "members": [{"tensor": m.tensor, "axis": m.axis, "role": m.role, "path": m.path}
                    for m in s.members],
    }


def _block_numel(a: Analysis, c: Chain) -> int:
    params = dict(a.gm.named_parameters(remove_duplicate=False))
    return sum(int(params[t].numel()) for t in c.params[0].values() if t in params)


def _period(c: Chain) -> str:
    """``1``, or ``2 (A B)``: the period and the kinds of its blocks, in order (a letter per
    kind of block: blocks of one kind have the same structure and constants); a period whose
    blocks are of one kind (they read different values, e.g. a mask each) shows no letters."""
    if c.period == 1:
        return "1"
    kinds: list = []
    letters = []
    for k in c.kinds[:c.period]:
        if k not in kinds:
            kinds.append(k)
        letters.append(chr(ord("A") + kinds.index(k)))
    return f"{c.period} ({' '.join(letters)})" if len(kinds) > 1 else str(c.period)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def _members_summary(s: Space, limit: int = 2) -> str:
    names = sorted({m.tensor for m in s.members}, key=natural_key)
    more = f" +{len(names) - limit}" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _clip(text: str, width: int = 90) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def format_report(r: Report) -> str:
    a = r.analysis
    n_params = sum(int(t.numel()) for t in a.gm.parameters())
    parts = [
        f"model: {r.model_name}  nodes: {len(a.gm.graph.nodes)}  parameters: {n_params:,}  "
        f"analysis: {a.seconds * 1000:.0f} ms",
    ]
    rows = []
    for s in a.spaces:
        if s.resizable:
            status = "resizable" + (" (normalized: equal groups only)" if s.normalized else "")
        else:
            status = _clip("pinned: " + s.reason)
        producers = sum(m.role in ("producer", "tied") for m in s.members)
        consumers = sum(m.role in ("consumer", "tied") for m in s.members)
        rows.append([str(s.id), s.kind, str(s.size), str(s.unit), f"{producers}/{consumers}",
                     _members_summary(s), status])
    parts.append("\nspaces (units x unit features; producers/consumers):")
    parts.append(_table(["id", "kind", "units", "unit", "p/c", "tensors", "status"], rows))
    if a.chains:
        crow = [[c.container or "<root>", str(len(c)), _period(c), str(c.params_per_block),
                 f"{_block_numel(a, c):,}", "yes" if c.depth_ok else f"no: {c.reason}"]
                for c in a.chains]
        parts.append("\nchains (period: blocks per repeating unit of a layer pattern; depth "
                     "changes whole periods):")
        parts.append(_table(["container", "blocks", "period", "tensors/block", "params/block",
                             "depth"], crow))
    else:
        parts.append("\nchains: none (depth changes are not possible)")
    if a.tied:
        parts.append("\ntied tensors:")
        for name in a.tied:
            t = a.tensors[name]
            roles = sorted({x for ax in range(len(t.shape)) for x in a.roles.get((name, ax), ())})
            parts.append(f"  {name}: names {', '.join(t.aliases)}; roles {', '.join(roles)}")
    for note in r.capture_notes:
        parts.append(f"\nnote: {note}")
    return "\n".join(parts)


def inspect(model, example_inputs=None, **capture_kwargs) -> Report:
    """Capture (if needed) and analyse ``model``; ``str(report)`` is a readable table.

    The capture is the one ``vf.coalesce`` makes (``capture_kwargs`` go to ``vf.capture``), so
    the report describes the graph that a resize rewrites."""
    level = as_level(model, example_inputs, **capture_kwargs)
    analysis = analyze(level)
    info = level_info(level)
    name = (info.source_class or type(model).__name__) if info else type(model).__name__
    return Report(analysis, model_name=name, capture_notes=info.notes if info else ())
