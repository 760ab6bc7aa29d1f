"""The graph of a level made exportable to ONNX, computing the same values.

- :func:`exportable`: ops the exporter has no lowering for (``aten._grouped_mm``, transformers'
  ``grouped_mm_fallback``) are replaced by ordinary ops (:func:`grouped_mm_rows`), for the
  re-export only;
- :func:`normalise_for_onnx`: nodes that torch runs but the exporter's decomposition step
  rejects under symbolic sizes are rewritten (``contiguous`` -> contiguous ``clone``, ``view``
  of a tensor not known to be contiguous -> ``reshape``).
"""

from __future__ import annotations

import logging

import sympy
import torch
from torch.fx import Node

log = logging.getLogger("vcyclefx.export.onnx")  # the export's logger: one stream for the CLI


def grouped_mm_rows(input, weight, offs):
    """``input`` (S, k) @ ``weight`` (E, k, n) by groups of rows (``offs``: each group's end row)
    as ops every exporter knows: each row's group is the number of group ends at or before it,
    the row is multiplied by its group's matrix, rows past the last end are zero (what
    transformers' ``grouped_mm_fallback`` leaves there). Same values; memory S * k * n."""
    rows = torch.arange(input.shape[0], device=input.device)
    ends = offs.to(rows.dtype)
    group = (rows.unsqueeze(-1) >= ends.unsqueeze(0)).sum(-1).clamp(max=weight.shape[0] - 1)
    out = torch.bmm(input.unsqueeze(1), weight[group]).squeeze(1)  # (S, 1, k) @ (S, k, n)
    return out * (rows < ends[-1]).unsqueeze(-1).to(out.dtype)


def _grouped_mm_2d_3d(self, mat2, offs=None, bias=None, out_dtype=None):
    if offs is None or self.dim() != 2 or mat2.dim() != 3 or bias is not None:
        return torch.ops.aten._grouped_mm.default(self, mat2, offs, bias, out_dtype)
    return grouped_mm_rows(self, mat2, offs).to(out_dtype or self.dtype)


def _replacements() -> dict:
    """Ops the ONNX exporter has no lowering for -> a function of ordinary ops computing the
    same values; a level's graph calls these instead while it is re-exported for ONNX."""
    table = {torch.ops.aten._grouped_mm.default: _grouped_mm_2d_3d}
    fallback = getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)
    if fallback is not None:
        table[fallback.default] = lambda input, weight, offs: grouped_mm_rows(input, weight, offs)
    return table


def exportable(level):
    """``level`` itself, or (where it calls an op in :func:`_replacements`) a GraphModule over
    the same tensors whose graph calls the replacement instead, for the re-export only."""
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
    - ``view(x, size)`` or ``reshape(x, size)`` where ``x``'s strides (as the graph records them)
      are not the contiguous ones: ``reshape`` of a contiguous ``clone`` of ``x``. The exporter
      decomposes ``reshape`` into a ``view`` when it cannot decide under symbolic sizes that a
      copy is needed (a transposed ``(64*B, 4, 2, 32)`` attention output merged to
      ``(64*B, 2, 2, 64)``: "Cannot view a tensor with shape ... and strides ..."); a reshape of
      a contiguous tensor is always a view. ONNX has no views, so the copy costs nothing there.
    """
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
        elif (node.target in (aten.view.default, aten.reshape.default)
              and not _known_contiguous(node.args[0])):
            old = str(node.target).split(".")[1]
            _reshape_contiguous_copy(gm.graph, node)
            changed.append(f"{node.name}: {old} -> reshape of a contiguous clone")
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


def _reshape_contiguous_copy(graph, node) -> None:
    """``node`` (a view or reshape of ``x``) -> ``reshape(clone(x, contiguous_format), size)``."""
    x = node.args[0]
    with graph.inserting_before(node):
        copy = graph.call_function(torch.ops.aten.clone.default, (x,),
                                   {"memory_format": torch.contiguous_format})
    copy.meta = dict(x.meta)
    val = x.meta.get("val")
    if isinstance(val, torch.Tensor):
        copy.meta["val"] = val.clone(memory_format=torch.contiguous_format)
    node.target = torch.ops.aten.reshape.default
    node.args = (copy, *node.args[1:])


def _written_in_place(node) -> bool:
    """Some user of ``node`` writes into it (an in-place or out= op)."""
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
    return v.node.expr if isinstance(v, torch.SymInt) else sympy.Integer(int(v))
