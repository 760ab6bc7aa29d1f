"""The pass contract (passes/contract.py): requires -> call -> ensures, then one verifier that
catches broken graphs, missing metadata, shared storage and wrong shapes; typed edits."""

from __future__ import annotations

import pytest
import torch
from torch.fx import Graph, GraphModule

from tests.conftest import captured, fresh_level, output_tensor
from vcyclefx.analysis.analyze import analyze
from vcyclefx.fx.args import Edit, replace_arg_at, replace_args, retarget, set_arg
from vcyclefx.errors import PassCheckError, PlanError, VCycleError
from vcyclefx.level import clone_level, fetch_attr
from vcyclefx.plan.choices import COALESCE, DECOALESCE
from vcyclefx.plan.depth import plan_depth
from vcyclefx.plan.width import plan_width

from passes.common import PassResult
from passes.contract import Pass, check_shapes, set_shape_check, shape_check_enabled, verify
from passes.depth import DepthPass, DepthPlan, depth_pass
from passes.width import WidthPass, WidthPlan, width_pass

aten = torch.ops.aten


class _Breaks(Pass):
    """A pass that copies its input and then damages the copy with ``damage(copy)``."""

    name = "breaking pass"

    def __init__(self, damage):
        self.damage = damage

    def call(self, gm, plan):
        new = clone_level(gm)
        self.damage(new)
        return PassResult(new, None)


def _first(gm, target):
    return next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def test_a_pass_that_breaks_lint_raises_pass_check_error_naming_the_node():
    _, level = fresh_level("gpt2")

    def use_before_definition(gm):
        node = _first(gm, aten.layer_norm.default)
        placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
        placeholder.append(node)  # now before the values it reads

    with pytest.raises(PassCheckError, match="breaking pass: the graph does not lint:.*layer_norm"):
        _Breaks(use_before_definition)(level, None)


def test_a_node_without_meta_val_is_caught_and_named():
    _, level = fresh_level("gpt2")
    with pytest.raises(PassCheckError, match=r"node %linear.*has no meta\['val'\]"):
        _Breaks(lambda gm: _first(gm, aten.linear.default).meta.pop("val"))(level, None)


def test_a_result_that_shares_storage_with_its_input_is_caught():
    _, level = fresh_level("gpt2")
    name, _ = next(iter(level.named_parameters()))

    class Aliases(Pass):
        def call(self, gm, plan):
            new = clone_level(gm)
            owner, leaf = name.rsplit(".", 1)
            setattr(new.get_submodule(owner), leaf, gm.get_parameter(name))  # the input's own
            return PassResult(new, None)

    with pytest.raises(PassCheckError, match=f"shares tensor {name} with its input"):
        Aliases()(level, None)
    with pytest.raises(PassCheckError, match="shares tensor"):
        verify(level, level)  # a pass that returns its input unchanged


def _wrong_last_dim(gm):
    node = _first(gm, aten.linear.default)
    val = node.meta["val"]
    with val.fake_mode:
        node.meta["val"] = torch.empty(*val.shape[:-1], val.shape[-1] + 1, dtype=val.dtype)


def test_a_wrong_meta_shape_is_caught_by_the_fake_re_execution_when_the_check_is_on():
    _, level = fresh_level("gpt2")
    assert shape_check_enabled()  # tests/conftest.py sets VCYCLEFX_VERIFY=1
    with pytest.raises(PassCheckError, match=r"node %linear.* has meta\['val'\] of shape .* but "
                                             "re-executing the graph gives"):
        _Breaks(_wrong_last_dim)(level, None)
    set_shape_check(False)
    try:
        _Breaks(_wrong_last_dim)(level, None)  # off: only the cheap checks run
    finally:
        set_shape_check(None)


def test_a_wrong_literal_size_is_caught_where_re_executing_it_fails():
    _, level = fresh_level("gpt2")

    def wrong_view(gm):
        node = _first(gm, aten.view.default)
        shape = list(node.args[1])
        shape[-1] = shape[-1] + 1 if isinstance(shape[-1], int) else 7
        set_arg(node, "size", shape)

    with pytest.raises(PassCheckError, match="re-executing node %view"):
        _Breaks(wrong_view)(level, None)


def test_ensures_checks_the_shapes_a_pass_promised():
    _, level = fresh_level("gpt2")
    name, p = next(iter(level.named_parameters()))

    class Promises(Pass):
        def call(self, gm, plan):
            return PassResult(clone_level(gm), None, shapes={name: (p.shape[0] + 1, *p.shape[1:])})

    with pytest.raises(PassCheckError, match=f"tensor {name} is of shape"):
        Promises()(level, None)


def test_pass_check_errors_are_vcycle_errors_not_assertions():
    assert issubclass(PassCheckError, VCycleError) and not issubclass(PassCheckError, AssertionError)


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "vit", "resnet18", "nanogpt"])
def test_width_and_depth_passes_on_zoo_models_pass_verification(name):
    _, _, level = captured(name)
    analysis = analyze(level, chains=False)
    plan = WidthPlan(COALESCE, tuple(plan_width(analysis, 0.5, coalesce=True).spaces))
    small = WidthPass(analysis)(level, plan)
    assert any(tuple(fetch_attr(level, k).shape) != s for k, s in small.shapes.items())  # resized
    chains = plan_depth(analyze(small.module), 0.5, coalesce=True)
    shallow = DepthPass()(small.module, DepthPlan(COALESCE, tuple(chains)))
    grown = DepthPass()(shallow.module, DepthPlan(DECOALESCE, tuple(chains), "copy"))
    for res, source in ((small, level), (shallow, small.module), (grown, shallow.module)):
        verify(res.module, source)
        assert check_shapes(res.module) >= len(res.module.graph.nodes) // 2


@pytest.mark.parametrize("name", ["gpt2", "llama", "vit"])
def test_width_pass_shapes_equal_a_full_fake_re_execution(name):
    """The width pass writes node shapes from the analysis; re-running every op under the fake
    mode gives the same shapes, batch*heads views included (uncached: check_shapes itself)."""
    _, _, level = captured(name)
    analysis = analyze(level, chains=False)
    big = width_pass(level, analysis, WidthPlan(DECOALESCE, tuple(
        plan_width(analysis, 2.0, coalesce=False).spaces)))
    assert check_shapes(big.module) > 50


def test_requires_refuses_an_analysis_of_another_module_and_a_bad_direction():
    _, _, level = captured("gpt2")
    analysis = analyze(level, chains=False)
    plan = WidthPlan(COALESCE, tuple(plan_width(analysis, 0.5, coalesce=True).spaces))
    with pytest.raises(PlanError, match="analysis was made of another module"):
        WidthPass(analysis)(clone_level(level), plan)
    with pytest.raises(PlanError, match="width direction must be 'coalesce' or 'decoalesce'"):
        WidthPass(analysis)(level, WidthPlan("sideways", plan.spaces))
    with pytest.raises(PlanError, match="depth_init='zero' must be 'copy' or 'identity'"):
        depth_pass(level, DepthPlan(DECOALESCE, (), "zero"))


# -- typed edits ---------------------------------------------------------------------------------
def _legacy_apply(node, changes: dict) -> None:
    """How rewrites were applied before Edit: a dict with "__target__" and digit-string keys
    (the reference the typed edits are compared with)."""
    target = changes.pop("__target__", None)
    if target is not None:
        node.target = target
    for key, value in changes.items():
        if key.isdigit():
            args = list(node.args)
            args[int(key)] = value
            node.args = tuple(args)
        else:
            set_arg(node, key, value)


def _as_legacy(edit: Edit) -> dict:
    out = {} if edit.target is None else {"__target__": edit.target}
    out.update({str(i): v for i, v in edit.positional})
    out.update(dict(edit.named))
    return out


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_typed_edits_give_the_graph_and_outputs_of_the_dict_protocol(name, monkeypatch):
    import vcyclefx as vf

    _, example, level = captured(name)

    def coalesced():
        torch.manual_seed(0)
        small, _ = vf.coalesce(level, width=0.5, depth=0.5)
        with torch.no_grad():
            return small.code, output_tensor(small.eval()(*example)), small.state_dict()

    code, out, state = coalesced()
    applied = []
    monkeypatch.setattr(Edit, "apply", lambda self, node: (applied.append(self),
                                                           _legacy_apply(node, _as_legacy(self))))
    legacy_code, legacy_out, legacy_state = coalesced()
    assert applied  # the rewrite rules did edit nodes (view sizes, split sizes, ...)
    assert code == legacy_code
    assert torch.equal(out, legacy_out)
    assert state.keys() == legacy_state.keys()
    assert all(torch.equal(state[k], legacy_state[k]) for k in state)


def test_edit_helpers_retarget_and_set_arguments_by_name_and_position():
    g = Graph()
    x = g.placeholder("x")
    chunk = g.call_function(aten.chunk.default, (x, 2, -1))
    mul = g.call_function(aten.mul.Tensor, (x, 3))
    g.output((chunk, mul))
    retarget(aten.split_with_sizes.default, split_sizes=[2, 4]).apply(chunk)
    replace_arg_at(1, 5).apply(mul)
    assert chunk.target is aten.split_with_sizes.default and chunk.args == (x, [2, 4], -1)
    assert mul.args == (x, 5)
    replace_args(dim=0).apply(chunk)
    assert chunk.args == (x, [2, 4], 0)
    y = torch.arange(6.0)
    out = GraphModule(torch.nn.Module(), g)(y)
    assert [t.tolist() for t in out[0]] == [[0.0, 1.0], [2.0, 3.0, 4.0, 5.0]]
