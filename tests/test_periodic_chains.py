"""Layer patterns: periodic chains (a unit of p blocks whose kinds repeat) and the renumbering of
numbered siblings after a resized chain.

A periodic chain changes depth by whole periods: coalescing averages the blocks at one position
of the periods of a group, identity growth adds whole periods whose residual writes are zero.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vcyclefx as vf
from vcyclefx.errors import PlanError


class WindowBlock(nn.Module):
    """Pre-norm attention with a causal window of ``window`` steps, then an MLP."""

    def __init__(self, d: int, window: int):
        super().__init__()
        self.window = window
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        h = self.norm1(x)
        i = torch.arange(x.shape[1], device=x.device)
        mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < self.window)
        x = x + self.o(F.scaled_dot_product_attention(self.q(h), self.k(h), self.v(h), attn_mask=mask))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ScanBlock(nn.Module):
    """A gated cumulative-sum mixer: structurally unlike WindowBlock (the 'recurrent' kind)."""

    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.inp, self.out = nn.Linear(d, 2 * d), nn.Linear(d, d)

    def forward(self, x):
        a, g = self.inp(self.norm(x)).chunk(2, dim=-1)
        return x + self.out(torch.cumsum(a, dim=1) * torch.sigmoid(g))


class Stack(nn.Module):
    def __init__(self, layers: list[nn.Module], d: int = 16, vocab: int = 32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(layers)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.emb(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _sliding_global(n: int = 4) -> Stack:
    """Sliding-window (2) and global attention alternating: A B A B ..., blocks that differ
    only in a constant."""
    torch.manual_seed(0)
    return Stack([WindowBlock(16, 2 if i % 2 == 0 else 1000) for i in range(n)]).eval()


def _hybrid(n: int = 6) -> Stack:
    """Two scan layers then one attention layer, repeated: A A B A A B."""
    torch.manual_seed(0)
    return Stack([WindowBlock(16, 1000) if i % 3 == 2 else ScanBlock(16) for i in range(n)]).eval()


def _ids(vocab: int = 32):
    return (torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(1)),)


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _blocks(level, container: str) -> list[int]:
    depth = container.count(".") + 1
    return sorted({int(k.split(".")[depth]) for k in level.state_dict() if k.startswith(container + ".")})


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def _assert_same_state(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa) == 0.0


@pytest.mark.parametrize("make, period, kinds", [(_sliding_global, 2, "2 (A B)"),
                                                 (_hybrid, 3, "3 (A A B)")])
def test_periodic_chain_is_found_and_shown_by_inspect(make, period, kinds):
    report = vf.inspect(make(), _ids())
    (chain,) = report.chains
    assert (len(chain), chain.period, chain.depth_ok) == (len(make().layers), period, True)
    assert kinds in str(report)
    assert report.to_dict()["chains"][0]["period"] == period


_COALESCED: dict = {}


def _coalesced(make):
    """(model, inputs, level, mapping) of ``make()`` coalesced at depth 0.5, made once."""
    if make not in _COALESCED:
        model, x = make(), _ids()
        _COALESCED[make] = (model, x, *vf.coalesce(model, x, depth=0.5))
    return _COALESCED[make]


@pytest.mark.parametrize("make, period", [(_sliding_global, 2), (_hybrid, 3)])
def test_coalescing_a_layer_pattern_halves_the_periods_and_keeps_the_pattern(make, period):
    model, x, small, m = _coalesced(make)
    n = len(model.layers)
    assert _blocks(small, "layers") == list(range(n // 2))
    (cm,) = m.chains
    assert cm.period == period
    # each small block is the mean of the blocks at its position in the periods of its group
    groups = [[q * period + r for q in (2 * g, 2 * g + 1)] for g in range(n // period // 2)
              for r in range(period)]
    assert cm.groups == groups
    sd, big = small.state_dict(), model.state_dict()
    for g, members in enumerate(groups):
        for name, t in sd.items():
            if name.startswith(f"layers.{g}."):
                rel = name[len(f"layers.{g}."):]
                mean = sum(big[f"layers.{i}.{rel}"] for i in members) / len(members)
                assert torch.allclose(t, mean, atol=1e-7), name
    assert torch.isfinite(small(*x)).all()


@pytest.mark.parametrize("make", [pytest.param(_sliding_global, marks=pytest.mark.slow), _hybrid])
def test_identity_growth_of_a_layer_pattern_keeps_the_function(make):
    model, x = make(), _ids()
    big, m = vf.decoalesce(model, x, depth=2.0, depth_init="identity")
    assert _blocks(big, "layers") == list(range(2 * len(model.layers)))
    assert _rel(big(*x), model(*x)) <= 1e-5
    copied, _ = vf.decoalesce(model, x, depth=2.0)
    back, _ = vf.coalesce(copied, mapping=m)
    _assert_same_state(back, model)


def test_periodic_mapping_saves_and_loads_and_older_mappings_still_load(tmp_path):
    model, x, small, m = _coalesced(_hybrid)
    m.save(tmp_path / "m.json")
    loaded = vf.Mapping.load(tmp_path / "m.json")
    assert loaded.chains[0].period == 3 and loaded.chains[0].zero_by_position == m.chains[0].zero_by_position
    restored, _ = vf.decoalesce(small, mapping=loaded, depth_init="identity")
    assert _blocks(restored, "layers") == list(range(6))
    # a mapping of a plain chain is written as before (no period keys), and reads with period 1
    d = m.to_dict()
    for c in d["chains"]:
        del c["period"], c["zero_by_position"]
    c = d["chains"][0]
    c["groups"] = [[2 * g, 2 * g + 1] for g in range(3)]
    assert vf.Mapping.from_dict(d).chains[0].period == 1


def test_a_mapping_group_mixing_positions_of_a_period_is_refused():
    *_, m = _coalesced(_hybrid)
    d = m.to_dict()
    d["chains"][0]["groups"] = [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(vf.VCycleError, match="mixes blocks of different positions"):
        vf.Mapping.from_dict(d)


# -- Hugging Face layer patterns --------------------------------------------------------------
def _hf(cls: str, cfg: str, **kw):
    import transformers as T

    torch.manual_seed(0)
    config = getattr(T, cfg)(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                             num_attention_heads=2, num_key_value_heads=1, sliding_window=4,
                             max_position_embeddings=64, use_cache=False, pad_token_id=0, **kw)
    return getattr(T, cls)(config).eval(), _ids(64)


@pytest.mark.slow
def test_gemma2_sliding_and_full_attention_coalesce_by_whole_periods():
    """Gemma2's layer_types alternate sliding and full attention: the blocks are alike, but
    each reads the mask of its kind, so the unit is a period of 2."""
    model, x = _hf("Gemma2ForCausalLM", "Gemma2Config", head_dim=16)
    assert model.config.layer_types == ["sliding_attention", "full_attention"] * 2
    small, m = vf.coalesce(model, x, depth=0.5)
    assert m.chains[0].period == 2 and m.chains[0].groups == [[0, 2], [1, 3]]
    assert _blocks(small, "model.layers") == [0, 1]
    assert torch.isfinite(_logits(small(*x))).all()


@pytest.mark.slow
def test_gemma2_identity_growth_is_refused_naming_the_period_and_why():
    model, x = _hf("Gemma2ForCausalLM", "Gemma2Config", head_dim=16)
    # Gemma's norms scale by (1 + weight) and the branch ends in a cast: refused, and said where
    with pytest.raises(PlanError, match=r"period of blocks model\.layers\.0, model\.layers\.1.*cannot zero"):
        vf.decoalesce(model, x, depth=2.0, depth_init="identity")


@pytest.mark.slow
def test_cohere2_layer_pattern_identity_growth_and_exact_round_trip():
    model, x = _hf("Cohere2ForCausalLM", "Cohere2Config",
                   layer_types=["sliding_attention", "full_attention"] * 2)
    ref = _logits(model(*x))
    big, m = vf.decoalesce(model, x, depth=2.0, depth_init="identity")
    assert m.chains[0].period == 2 and _blocks(big, "model.layers") == list(range(8))
    assert _rel(_logits(big(*x)), ref) <= 1e-5
    back, _ = vf.coalesce(vf.decoalesce(model, x, depth=2.0)[0], mapping=m)
    _assert_same_state(back, model)


# -- renumbering the siblings after a chain ------------------------------------------------------
def test_mobilenet_v2_depth_renumbers_later_siblings_and_loads_strictly_into_torchvision():
    """A MobileNetV2 whose ``features`` holds a chain (features.3, 4) and, after it, the next
    stage's block and the final conv (features.5, 6): coalescing renumbers them, and the level
    is torchvision's MobileNetV2 built with the new block count."""
    from torchvision.models import MobileNetV2

    torch.manual_seed(0)
    setting = [[1, 16, 1, 1], [6, 24, 3, 2], [6, 32, 1, 2]]
    model = MobileNetV2(num_classes=10, inverted_residual_setting=setting).eval()
    x = (torch.randn(2, 3, 32, 32),)
    small, m = vf.coalesce(model, x, depth=0.5)
    assert [(c.large_blocks, c.small_blocks) for c in m.chains] == [
        (["features.3", "features.4"], ["features.3"])]
    assert _blocks(small, "features") == list(range(6))  # features.0..6 less one block
    setting[1][2] = 2
    theirs = MobileNetV2(num_classes=10, inverted_residual_setting=setting).eval()
    theirs.load_state_dict(small.state_dict(), strict=True)
    assert torch.equal(theirs(*x), small(*x))
    assert torch.equal(theirs.features[5][0].weight, model.features[6][0].weight)


@pytest.mark.slow
def test_mobilenet_v2_four_chains_in_one_container_renumber_and_round_trip_exactly():
    from torchvision.models import MobileNetV2

    torch.manual_seed(0)
    model = MobileNetV2(num_classes=10).eval()
    x = (torch.randn(2, 3, 32, 32),)
    big, m = vf.decoalesce(model, x, depth=2.0)
    assert _blocks(big, "features") == list(range(19 + 9))
    back, _ = vf.coalesce(big, mapping=m)
    _assert_same_state(back, model)
    small, m2 = vf.coalesce(model, x, depth=0.5)
    assert [(len(c.large_blocks), len(c.small_blocks)) for c in m2.chains] == [(2, 1), (3, 2), (2, 1), (2, 1)]
    assert _blocks(small, "features") == list(range(19 - 4))
    setting = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 2, 2], [6, 64, 3, 2], [6, 96, 2, 1],
               [6, 160, 2, 2], [6, 320, 1, 1]]
    theirs = MobileNetV2(num_classes=10, inverted_residual_setting=setting).eval()
    theirs.load_state_dict(small.state_dict(), strict=True)
    assert torch.equal(theirs(*x), small(*x))
    restored, _ = vf.decoalesce(small, mapping=m2)
    assert restored.state_dict().keys() == model.state_dict().keys()
