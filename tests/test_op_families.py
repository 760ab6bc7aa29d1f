"""Rules are written for op families, not for the overload one release happened to emit.

The overloads are listed from ``torch.ops.aten`` itself, so an overload a new torch adds (or
one a new transformers starts to emit, as ``aten.tensor_split.indices`` in Mamba-2 under
transformers 5.25) is a failure here, not a user's ``UnsupportedOp``. The split family's
rewrites are checked end to end: a width x2 de-coalescing through each op is exact.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vcyclefx as vf
import vcyclefx.analysis.rules  # noqa: F401 - registers the built-in rules
from tests.conftest import rel_error
from vcyclefx.analysis import registry
from vcyclefx.analysis.registry import graph_overloads, has_rule

aten = torch.ops.aten

# The families the rules touch, by op name (an op a torch build lacks is skipped by name, not
# by test: `_present` below).
FAMILIES = {
    "split": """tensor_split split split_with_sizes unsafe_split unsafe_split_with_sizes chunk
        unsafe_chunk unbind split_copy split_with_sizes_copy unbind_copy hsplit vsplit dsplit""",
    "view": """view reshape _unsafe_view view_copy view_as reshape_as expand_as flatten unflatten
        squeeze unsqueeze squeeze_copy unsqueeze_copy permute permute_copy transpose
        transpose_copy t t_copy swapaxes swapdims movedim moveaxis expand expand_copy
        broadcast_to alias alias_copy detach detach_copy _reshape_alias _reshape_alias_copy
        ravel contiguous clone as_strided as_strided_copy""",
    "concatenation": "cat concat concatenate stack hstack vstack dstack column_stack row_stack",
    "slicing and indexing": """slice slice_copy select select_copy narrow narrow_copy index
        index_select gather take_along_dim _unsafe_index index_put _unsafe_index_put
        slice_scatter select_scatter diagonal diagonal_copy""",
    "reduction": """sum mean nansum nanmean amax amin max min prod var std var_mean std_mean
        logsumexp norm linalg_vector_norm argmax argmin all any cumsum cumprod count_nonzero
        softmax log_softmax _softmax _log_softmax""",
}


def _present(names: str) -> list[str]:
    return [n for n in names.split() if isinstance(getattr(aten, n, None), torch._ops.OpOverloadPacket)]


def _uncovered(name: str) -> list[str]:
    return [str(op) for op in graph_overloads(getattr(aten, name)) if not has_rule(op)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_overload_of_every_op_of_a_family_has_a_rule(family):
    names = _present(FAMILIES[family])
    assert len(names) >= 8  # the family is there to check
    missing = {n: _uncovered(n) for n in names}
    assert not {n: m for n, m in missing.items() if m}


def _ruled_packets() -> list[str]:
    names = set()
    for target in list(registry._RULES):
        if isinstance(target, torch._ops.OpOverload) and target._schema.name.startswith("aten::"):
            names.add(target._schema.name.split("::")[1])
    return sorted(names)


def test_an_op_with_a_rule_has_one_for_every_overload_and_for_its_copy_form():
    names = _ruled_packets()
    assert len(names) > 250
    with_copy = names + [n + "_copy" for n in names if hasattr(aten, n + "_copy")]
    missing = {n: _uncovered(n) for n in with_copy}
    assert not {n: m for n, m in missing.items() if m}


def test_graph_overloads_leave_out_torchscript_list_builtins_and_named_tensor_forms():
    split = {str(o) for o in graph_overloads(aten.split)}
    assert {"aten.split.Tensor", "aten.split.sizes"} <= split
    assert "aten.split.str" not in split and "aten.split.default" not in split  # TorchScript's
    assert "aten.sum.int" not in {str(o) for o in graph_overloads(aten.sum)}
    assert "aten.index.list_Tensor" not in {str(o) for o in graph_overloads(aten.index)}
    assert all("Dimname" not in str(o._schema) for o in graph_overloads(aten.unbind))


def test_a_removed_rule_is_a_failure_of_the_family_check(monkeypatch):
    monkeypatch.delitem(registry._RULES, aten.tensor_split.indices)
    monkeypatch.setattr(registry, "_DERIVED", {})
    assert _uncovered("tensor_split") == ["aten.tensor_split.indices"]


# -- the split family's rewrites, end to end ----------------------------------------------------
class _Splits(nn.Module):
    """A 24-wide space cut into three 8-wide pieces by ``how``, recombined by a product of the
    pieces (so a piece taken from the wrong offset changes the output)."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.up = nn.Linear(6, 24)
        self.down = nn.Linear(8, 5)

    def forward(self, x):
        h = self.up(x)  # (B, T, 24)
        how = self.how
        if how == "tensor_split_indices":
            a, b, c = torch.tensor_split(h, [8, 16], dim=-1)
        elif how == "tensor_split_sections":
            a, b, c = torch.tensor_split(h, 3, dim=-1)
        elif how == "split_size":
            a, b, c = torch.split(h, 8, dim=-1)
        elif how == "split_sizes":
            a, b, c = torch.split(h, [8, 8, 8], dim=-1)
        elif how == "chunk":
            a, b, c = torch.chunk(h, 3, dim=-1)
        elif how == "unsafe_split":
            a, b, c = h.unsafe_split(8, dim=-1)
        elif how == "unsafe_chunk":
            a, b, c = h.unsafe_chunk(3, dim=-1)
        elif how == "dsplit":
            a, b, c = torch.dsplit(h, 3)
        elif how in ("hsplit", "hsplit_points"):  # along dim 1: the feature axis first
            a, b, c = torch.hsplit(h.transpose(1, 2), 3 if how == "hsplit" else [8, 16])
            a, b, c = a.transpose(1, 2), b.transpose(1, 2), c.transpose(1, 2)
        elif how == "tensor_split_tensor":  # split points in a tensor: cut by sizes after
            a, b, c = torch.tensor_split(h, torch.tensor([8, 16]), dim=-1)
        else:
            raise ValueError(how)
        return self.down(a * torch.sigmoid(b) + c)


SPLITS = ["tensor_split_indices", "tensor_split_sections", "split_size", "split_sizes", "chunk",
          "unsafe_split", "unsafe_chunk", "dsplit", "hsplit", "hsplit_points", "tensor_split_tensor"]


@pytest.mark.parametrize("how", SPLITS)
def test_width_x2_through_each_split_op_is_exact_and_round_trips(how):
    torch.manual_seed(0)
    model = _Splits(how).eval()
    x = (torch.randn(2, 5, 6),)
    level = vf.capture(model, x)
    big, mapping = vf.decoalesce(level, width=2.0)
    assert big.state_dict()["up.weight"].shape == (48, 6)
    with torch.no_grad():
        assert rel_error(big.eval()(*x), model(*x)) <= 1e-5
        y = (torch.randn(3, 7, 6),)  # another batch and sequence length
        assert rel_error(big.eval()(*y), model(*y)) <= 1e-5
    back, _ = vf.coalesce(big, mapping=mapping)
    for k, v in level.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


# -- ops of the other families that torch.export does emit (each was an UnsupportedOp before) ----
class _Ops(nn.Module):
    """A 24-wide space through one op of a family and back to a linear read-out."""

    FORWARD = {  # how -> (the op the graph must hold, h -> h through that op)
        "movedim_lists": ("aten.movedim.intlist",
                          lambda h: torch.movedim(h, [0, 2], [2, 0]).movedim([2, 0], [0, 2])),
        "moveaxis": ("aten.moveaxis.int", lambda h: torch.moveaxis(h, 2, 0).moveaxis(0, 2)),
        "ravel": ("aten.ravel.default", lambda h: h.ravel().reshape(h.shape)),
        "reshape_as": ("aten.reshape_as.default", lambda h: h.reshape(-1).reshape_as(h)),
        "view_dtype": ("aten.view.dtype", lambda h: h.view(torch.int32).view(torch.float32)),
        "diagonal": ("aten.diagonal.default", lambda h: torch.diagonal(
            h.unsqueeze(1).expand(-1, h.shape[1], -1, -1), dim1=1, dim2=2).transpose(1, 2)),
        "hstack": ("aten.hstack.default", lambda h: torch.hstack(
            [c * (i + 1) for i, c in enumerate(h.transpose(1, 2).chunk(2, dim=1))]).transpose(1, 2)),
        "dstack": ("aten.dstack.default", lambda h: torch.dstack(
            [c * (i + 1) for i, c in enumerate(h.chunk(2, dim=-1))])),
        "slice_scatter": ("aten.slice_scatter.default", lambda h: torch.slice_scatter(
            h, h[..., 8:16] * 3, dim=-1, start=8, end=16)),
        "select_scatter": ("aten.select_scatter.default", lambda h: torch.select_scatter(
            h, h[:, 0] * 3, dim=1, index=0)),
        "take_along_dim": ("aten.take_along_dim.default", lambda h: h * torch.take_along_dim(
            h, torch.argmax(h, dim=1, keepdim=True), dim=1)),
        "std_mean": ("aten.std_mean.dim", lambda h: (lambda s, m: (h - m) / s)(
            *torch.std_mean(h, dim=1, keepdim=True))),
        "var_mean_biased": ("aten.var_mean.correction", lambda h: (lambda v, m: (h - m) * torch.rsqrt(
            v + 1e-5))(*torch.var_mean(h, dim=-1, keepdim=True, correction=0))),
        "count_nonzero": ("aten.count_nonzero.default",
                          lambda h: h * torch.count_nonzero(h > 0, dim=1).unsqueeze(1)),
        "sort_stable": ("aten.sort.stable", lambda h: torch.sort(h, dim=1, stable=True)[0]),
    }

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.up = nn.Linear(6, 24)
        self.down = nn.Linear(24, 5)

    def forward(self, x):
        return self.down(self.FORWARD[self.how][1](self.up(x)))


@pytest.mark.parametrize("how", list(_Ops.FORWARD))
def test_width_x2_through_each_view_scatter_and_reduction_op_is_exact_and_round_trips(how):
    torch.manual_seed(0)
    model = _Ops(how).eval()
    x = (torch.randn(2, 5, 6),)
    level = vf.capture(model, x)
    assert _Ops.FORWARD[how][0] in {str(n.target) for n in level.graph.nodes}
    big, mapping = vf.decoalesce(level, width=2.0)
    assert big.state_dict()["up.weight"].shape == (48, 6)
    with torch.no_grad():
        assert rel_error(big.eval()(*x), model(*x)) <= 1e-5
    back, _ = vf.coalesce(big, mapping=mapping)
    for k, v in level.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
