"""Transforms that check themselves (issue 30; DESIGN.md: "check=True ... a VCycleError naming the
first node whose values diverge"): a wrong rule is caught and its node named, correct transforms
pass (also node by node), check=False skips the check."""

from __future__ import annotations

import pytest
import torch

import vcyclefx as vf
from vcyclefx import selfcheck, zoo
from vcyclefx.analysis import analyze as _analyze  # noqa: F401 - registers the built-in rules
from vcyclefx.analysis import registry

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


@pytest.fixture
def sdpa_forgets_head_dim(monkeypatch):
    """A wrong SDPA rule: it forgets that head_dim sets the attention scale (1/sqrt(head_dim)),
    so head_dim becomes resizable and de-coalescing changes the attention logits; the real rule
    is put back after the test."""
    real = registry._RULES[SDPA]
    monkeypatch.setitem(registry._RULES, SDPA, real)  # restored at teardown
    monkeypatch.setattr(registry, "_DERIVED", {})

    class NoHeadDimPin:
        def __init__(self, ctx):
            self._ctx = ctx

        def __getattr__(self, name):
            return getattr(self._ctx, name)

        def pin(self, d, why):
            if not why.startswith("head_dim"):
                self._ctx.pin(d, why)

    @registry.register_rule(SDPA, replace=True)
    def _wrong_sdpa(ctx, node):
        real.analyze(NoHeadDimPin(ctx), node)


def test_a_wrong_rule_is_a_self_check_error_naming_its_node(sdpa_forgets_head_dim):
    model, x = zoo.gpt2()
    with pytest.raises(vf.SelfCheckError) as info:
        vf.decoalesce(model, x, width=2.0)
    e = info.value
    assert isinstance(e, vf.VCycleError)
    assert e.op == str(SDPA) and e.node.startswith("scaled_dot_product_attention")
    assert e.error > 1e-3  # a wrong rule is far beyond float32 rounding
    assert e.node in str(e) and "relative error" in str(e) and "check=False" in str(e)
    assert "attn.c_proj" in e.space  # the resized head space of its axes


def test_the_wrong_rule_passes_silently_with_check_false(sdpa_forgets_head_dim):
    model, x = zoo.gpt2()
    big, _ = vf.decoalesce(model, x, width=2.0, check=False)  # what happened before issue 30
    small = vf.coalesce(model, x, width=1.0, depth=1.0)[0]
    with torch.no_grad():
        err = selfcheck.rel_error(big.eval()(*x).logits, small.eval()(*x).logits)
    assert err > 1e-3


@pytest.fixture
def every_node(monkeypatch):
    """Compare every input-dependent node, not only the outputs, and record which stages ran."""
    monkeypatch.setattr(selfcheck, "EVERY_NODE", True)
    calls = []
    real = selfcheck._compare
    monkeypatch.setattr(selfcheck, "_compare",
                        lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    return calls


@pytest.mark.parametrize("name", ["gpt2", "resnet18",  # an HF LM and a CNN by default
                                  pytest.param("llama", marks=pytest.mark.slow),
                                  pytest.param("deit", marks=pytest.mark.slow)])
def test_correct_transforms_pass_the_check_node_by_node(name, every_node):
    """No false positive: width x2 and identity depth growth pass, node by node."""
    model, x = getattr(zoo, name)()
    vf.decoalesce(model, x, width=2.0, depth=2.0, depth_init="identity")
    assert every_node == ["identity depth growth", "de-coalescing in width"]


def test_the_round_trip_through_the_mapping_passes_node_by_node(every_node):
    """A coalesced level (carrying folded tied-weight scales) restored by its mapping."""
    model, x = zoo.gpt2()
    small, m = vf.coalesce(model, x, width=0.5, depth=0.5)
    vf.decoalesce(small, mapping=m, depth_init="identity")
    vf.decoalesce(small, mapping=m)  # copied blocks: only the width stage must keep the function
    assert every_node == ["coalescing's round trip (identity depth growth)",  # inside coalesce
                          "coalescing's round trip (width de-coalescing)",
                          "identity depth growth", "de-coalescing in width",
                          "de-coalescing in width"]


def test_a_wrong_rule_met_while_coalescing_is_named_on_the_round_trip(sdpa_forgets_head_dim):
    """Coalescing cannot keep the function, but de-coalescing its result through its own
    mapping must: the wrong rule (head_dim resized) is caught there and its node named."""
    model, x = zoo.gpt2()
    with pytest.raises(vf.SelfCheckError) as info:
        vf.coalesce(model, x, width=0.5)
    e = info.value
    assert e.op == str(SDPA) and e.node.startswith("scaled_dot_product_attention")
    assert str(e).startswith("coalescing's round trip (width de-coalescing) changed the model's "
                             "function") and e.error > 1e-3
    small, _ = vf.coalesce(model, x, width=0.5, check=False)  # silently wrong without the check
    # heads 4 -> 2 and, wrongly, head_dim 16 -> 8: q, k, v of 2 x 8 (the right level has 2 x 16)
    assert small.get_submodule("transformer.h.0.attn.c_attn").weight.shape == (32, 48)


def test_check_false_runs_no_model(monkeypatch):
    runs = []
    real = selfcheck._run_once
    monkeypatch.setattr(selfcheck, "_run_once",
                        lambda gm, visit=None: runs.append(gm) or real(gm, visit))
    model, x = zoo.gpt2()
    big, m = vf.decoalesce(model, x, width=2.0, check=False)
    vf.coalesce(big, mapping=m, check=False)
    assert runs == []
    vf.decoalesce(model, x, width=2.0)
    assert len(runs) == 2  # the level and its de-coalesced copy, once each
    vf.coalesce(big, mapping=m)
    # the coalesced level (finite outputs, then the round trip's input) and its de-coalesced
    # copy: once each
    assert len(runs) == 4 and runs[2] is not runs[3]


def test_depth_check_names_the_first_node_of_a_broken_block():
    """A block that is not the copy it should be: the error names a node inside it."""
    model, x = zoo.gpt2()
    small = vf.coalesce(model, x, width=1.0, depth=1.0)[0]
    big, m = vf.decoalesce(small, width=1.0, depth=2.0, depth_init="identity")
    groups = m.chains[0].groups  # the first block of each group stands for the old block
    copy_of_1 = m.chains[0].large_blocks[groups[1][0]]
    with torch.no_grad():
        big.get_submodule(f"{copy_of_1}.mlp.c_fc").bias.add_(1.0)
    with pytest.raises(vf.SelfCheckError) as info:
        selfcheck.check_depth(small, big, m.chains)
    node = next(n for n in big.graph.nodes if n.name == info.value.node)
    assert selfcheck._module_path(node) == f"{copy_of_1}.mlp.c_fc"


def test_coalesce_check_names_the_first_non_finite_node():
    model, x = zoo.gpt2()
    small, m = vf.coalesce(model, x, width=0.5)
    level = vf.decoalesce(small, mapping=m)[0]  # a larger level with finite outputs
    with torch.no_grad():
        small.get_submodule("transformer.h.1.ln_2").weight[0] = float("inf")
    with pytest.raises(vf.SelfCheckError) as info:
        selfcheck.check_finite(level, small)
    node = next(n for n in small.graph.nodes if n.name == info.value.node)
    assert selfcheck._module_path(node) == "transformer.h.1.ln_2"


def test_cli_no_check_flag():
    from vcyclefx.cli import build_parser

    p = build_parser()
    assert p.parse_args(["decoalesce", "D", "-o", "O"]).check is True
    assert p.parse_args(["decoalesce", "D", "-o", "O", "--no-check"]).check is False
    assert p.parse_args(["coalesce", "M", "-o", "O", "--no-check"]).check is False
