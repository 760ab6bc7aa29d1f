"""Depth passes: chains of repeated blocks, alone and with width."""

from __future__ import annotations

import pytest
import torch

import vcyclefx as vf
from tests.conftest import assert_runs_elsewhere_and_trains, captured, other_inputs, output_tensor, rel_error
from vcyclefx import zoo
from vcyclefx.analysis.analyze import analyze

NAMES = list(zoo.ZOO)
POST_NORM = {"bert"}  # zeroing residual branches cannot give the identity under a post-norm


def _state(m):
    return {k: v.detach() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("name", NAMES)
def test_coalesce_depth_half_halves_blocks_runs_elsewhere_and_trains(name):
    _, example, level = captured(name)
    a = analyze(level)
    small, mapping = vf.coalesce(level, depth=0.5)
    b = analyze(small)
    assert [len(c) for c in b.chains or []] in ([], [1] * len(a.chains))  # 2 blocks -> 1
    assert [len(c.small_blocks) for c in mapping.chains] == [(len(c) + 1) // 2 for c in a.chains]
    removed = sum(_block_params(level, c, drop=len(c) // 2) for c in a.chains)
    assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in level.parameters()) - removed
    assert_runs_elsewhere_and_trains(small, example)


def _block_params(level, chain, drop: int) -> int:
    params = dict(level.named_parameters(remove_duplicate=False))
    per_block = sum(params[t].numel() for t in chain.params[0].values() if t in params)
    return per_block * drop


@pytest.mark.parametrize("name", NAMES)
def test_decoalesce_identity_preserves_the_function_with_and_without_width(name):
    model, example, level = captured(name)
    x = other_inputs(example)
    if name in POST_NORM:
        with pytest.raises(vf.PlanError, match="layer_norm.*post-norm"):
            vf.decoalesce(level, depth=2.0, depth_init="identity")
        return
    with torch.no_grad():
        want = output_tensor(model(*x))
    for width in (1.0, 2.0):
        big, mapping = vf.decoalesce(level, width=width, depth=2.0, depth_init="identity")
        assert [len(c.large_blocks) for c in mapping.chains] == [4]
        with torch.no_grad():
            got = output_tensor(big.eval()(*x))
        assert rel_error(got, want) <= 1e-5, width


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_decoalesce_with_a_coalescing_mapping_can_grow_identity_blocks(name):
    # The V-cycle's way up (VCycle(depth_init="identity")): the coarse level's own function,
    # with the coalescing mapping's shapes and names.
    _, example, level = captured(name)
    small, mapping = vf.coalesce(level, width=0.5, depth=0.5)
    if name in POST_NORM:
        with pytest.raises(vf.PlanError, match="not residual.*depth_init='copy'"):
            vf.decoalesce(small, mapping=mapping, depth_init="identity")
        return
    big, _ = vf.decoalesce(small, mapping=mapping, depth_init="identity")
    assert {k: v.shape for k, v in big.state_dict().items()} == \
        {k: v.shape for k, v in level.state_dict().items()}
    copy, _ = vf.decoalesce(small, mapping=mapping)  # the mapping's own choice: copies
    x = other_inputs(example)
    with torch.no_grad():
        want = output_tensor(small.eval()(*x))
        got = output_tensor(big.eval()(*x))
        copied = output_tensor(copy.eval()(*x))
    assert rel_error(got, want) <= 1e-5
    assert rel_error(copied, want) > 1e-3  # copies apply every block twice: not the same function


@pytest.mark.parametrize("name", NAMES)
def test_copy_round_trip_with_width_and_depth_is_exact(name):
    _, _, level = captured(name)
    big, mapping = vf.decoalesce(level, width=2.0, depth=2.0, depth_init="copy")
    back, _ = vf.coalesce(big, mapping=mapping)
    a, b = _state(level), _state(back)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama", "deit", "vit", "resnet18", "nanogpt"])
def test_level0_after_a_round_trip_loads_strictly_into_the_original_class(name):
    model, example, level = captured(name)
    small, mapping = vf.coalesce(level, width=0.5, depth=0.5)
    restored, _ = vf.decoalesce(small, mapping=mapping)
    fresh, _ = zoo.ZOO[name]()
    fresh.load_state_dict(restored.state_dict(), strict=True)
    fresh.eval()
    restored.eval()
    x = other_inputs(example)
    with torch.no_grad():
        # the same weights through the original eager code (torchvision's attention takes
        # another kernel path than the captured graph, hence a rounding-level tolerance)
        assert rel_error(output_tensor(restored(*x)), output_tensor(fresh(*x))) <= 1e-6
    assert type(fresh) is type(model)


def test_block_names_follow_the_original_numbering():
    model, x = zoo.gpt2(n_layer=3)
    level = vf.capture(model, x)
    small, mapping = vf.coalesce(level, depth=0.5)  # 3 blocks -> 2: groups [0, 1], [2]
    (cm,) = mapping.chains
    assert cm.groups == [[0, 1], [2]]
    assert cm.small_blocks == ["transformer.h.0", "transformer.h.1"]
    names = {k.split(".")[2] for k in small.state_dict() if k.startswith("transformer.h.")}
    assert names == {"0", "1"}
    p = dict(level.named_parameters())
    q = dict(small.named_parameters())
    w = "attn.c_attn.weight"
    assert torch.equal(q[f"transformer.h.0.{w}"], (p[f"transformer.h.0.{w}"] + p[f"transformer.h.1.{w}"]) / 2)
    assert torch.equal(q[f"transformer.h.1.{w}"], p[f"transformer.h.2.{w}"])
    big, m2 = vf.decoalesce(level, depth=2.0, depth_pairing="strided")
    assert m2.chains[0].groups == [[0, 3], [1, 4], [2, 5]]
    assert torch.equal(dict(big.named_parameters())[f"transformer.h.4.{w}"], p[f"transformer.h.1.{w}"])


def test_two_chains_in_one_model_are_both_changed():
    class Stage(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.norm = torch.nn.LayerNorm(d)
            self.fc = torch.nn.Linear(d, d)

        def forward(self, x):
            return x + self.fc(self.norm(x))

    class TwoStages(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.ModuleList([Stage(16) for _ in range(4)])
            self.up = torch.nn.Linear(16, 32)
            self.b = torch.nn.ModuleList([Stage(32) for _ in range(2)])
            self.head = torch.nn.Linear(32, 3)

        def forward(self, x):
            for s in self.a:
                x = s(x)
            x = self.up(x)
            for s in self.b:
                x = s(x)
            return self.head(x)

    torch.manual_seed(0)
    model = TwoStages()
    x = (torch.randn(2, 5, 16),)
    level = vf.capture(model, x)
    assert sorted((c.container, len(c)) for c in analyze(level).chains) == [("a", 4), ("b", 2)]
    small, mapping = vf.coalesce(level, depth=0.5)
    assert sorted((c.container, len(c.small_blocks)) for c in mapping.chains) == [("a", 2), ("b", 1)]
    big, _ = vf.decoalesce(level, depth=2.0, depth_init="identity")
    model.eval()
    with torch.no_grad():
        assert rel_error(big.eval()(*x), model(*x)) <= 1e-6


def test_depth_on_a_model_without_chain_is_a_clear_error_and_depth1_is_a_no_op():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    level = vf.capture(model, (torch.randn(2, 8),))
    with pytest.raises(vf.PlanError, match="no(ne)? chain|has none"):
        vf.coalesce(level, depth=0.5)
    same, mapping = vf.coalesce(level, width=1.0, depth=1.0)
    assert not mapping.spaces and not mapping.chains
    for k, v in _state(level).items():
        assert torch.equal(v, _state(same)[k])


def test_a_chain_link_that_points_inside_the_block_is_refused_not_rewired():
    """De-coalescing a one-block chain cannot compare blocks; a link that locates a value of the
    block itself (not its input from the previous block) would feed the wrong node."""
    import copy

    from vcyclefx.analysis.ownership import ownership

    model, x = zoo.gpt2(n_layer=2)
    small, mapping = vf.coalesce(model, x, depth=0.5)
    (cm,) = mapping.chains
    block = ownership(small)[0][cm.small_blocks[0]]
    inside = set(block)
    user = next(i for i, n in enumerate(block) if n.all_input_nodes and n.all_input_nodes[0] in inside)
    bad = copy.deepcopy(mapping)
    bad.chains[0].chained = [[user, 0, cm.chained[0][2]]]
    with pytest.raises(vf.PlanError, match="does not locate block"):
        vf.decoalesce(small, mapping=bad)
    big, _ = vf.decoalesce(small, mapping=mapping)  # the mapping as made still works
    assert sum(1 for _ in big.parameters()) == sum(1 for _ in model.parameters())
