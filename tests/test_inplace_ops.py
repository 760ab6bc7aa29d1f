"""In-place and out= overloads get their functional op's rule, with the output tied to the
argument they write (registry unit tests, a small module, and a real model: DeBERTa's
``detach_``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import vcyclefx as vf
from tests.conftest import rel_error
from vcyclefx.analysis.analyze import analyze
from vcyclefx.fx.args import functional_of
from vcyclefx.analysis.registry import op_of, rule_for

aten = torch.ops.aten


@pytest.mark.parametrize("op,functional", [
    (aten.detach_.default, aten.detach.default),
    (aten.add_.Tensor, aten.add.Tensor),
    (aten.add_.Scalar, aten.add.Scalar),
    (aten.add.out, aten.add.Tensor),
    (aten.index_add_.default, aten.index_add.default),
    (aten.scatter_.src, aten.scatter.src),
    (aten.bernoulli_.float, aten.bernoulli.p),
    (aten.floor_divide_.Tensor, aten.floor_divide.default),
    (aten.max.dim_max, aten.max.dim),
    (aten.sum.IntList_out, aten.sum.dim_IntList),
    (aten.unsqueeze_.default, aten.unsqueeze.default),
])
def test_in_place_and_out_overloads_map_to_their_functional_overload(op, functional):
    assert functional_of(op) is functional
    assert rule_for(SimpleNamespace(target=op)) is not None  # found, not UnsupportedOp


def test_functional_ops_and_ops_without_a_functional_form_have_no_functional_overload():
    assert functional_of(aten.add.Tensor) is None
    assert functional_of(aten.normal_.default) is None  # no functional overload with its arguments


class _InPlace(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 16)
        self.b = torch.nn.Linear(16, 8)

    def forward(self, x):
        h = self.a(x)
        buf = torch.empty_like(h)
        torch.add(h.detach(), 1.0, out=buf)  # aten.add.out (out= takes no autograd)
        buf.detach_()  # aten.detach_.default
        h = h.relu_()  # aten.relu_.default
        h.mul_(buf.sigmoid())  # aten.mul_.Tensor
        return self.b(h)


def test_in_place_and_out_ops_tie_their_output_to_the_written_argument_and_width_is_exact():
    torch.manual_seed(0)
    model = _InPlace().eval()
    x = (torch.randn(2, 5, 8),)
    level = vf.capture(model, x)
    targets = {n.target for n in level.graph.nodes if n.op == "call_function"}
    assert {aten.add.out, aten.detach_.default, aten.relu_.default, aten.mul_.Tensor} <= targets
    an = analyze(level, chains=False)
    node = {n.target: n for n in level.graph.nodes if n.op == "call_function"}
    out_arg = node[aten.add.out].kwargs["out"]
    assert an.dims(node[aten.add.out]) == an.dims(out_arg)  # written into `out`
    assert an.dims(node[aten.detach_.default]) == an.dims(node[aten.detach_.default].args[0])
    assert op_of(node[aten.mul_.Tensor]) is aten.mul.Tensor
    hidden = an.space_of(an.dims(node[aten.relu_.default])[-1])
    assert hidden.resizable and hidden.size == 16
    with torch.no_grad():
        want = model(*x)
        big, mapping = vf.decoalesce(level, width=2.0)
        assert rel_error(big.eval()(*x), want) <= 1e-5
    back, _ = vf.coalesce(big, mapping=mapping)
    for k, v in level.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


def test_in_place_ops_without_a_usable_functional_rule_are_errors_that_say_why():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    no_functional = graph.call_function(aten.set_.source_Tensor_storage_offset, (x, x, 0, [1]))
    with pytest.raises(vf.VCycleError, match=r"set_.*no functional overload whose rule"):
        rule_for(no_functional)
    no_rule = graph.call_function(aten.random_.default, (x,))
    with pytest.raises(vf.VCycleError, match=r"random_.*functional form aten.random.default has no rule"):
        rule_for(no_rule)
