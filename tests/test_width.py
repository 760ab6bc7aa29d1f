"""Width passes: exact semantics on every zoo model."""

from __future__ import annotations

import json

import pytest
import torch

import vcyclefx as vf
from tests.conftest import assert_runs_elsewhere_and_trains, captured, other_inputs, output_tensor, rel_error
from vcyclefx import zoo
from vcyclefx.analysis.analyze import analyze
from vcyclefx.plan.width import predict_parameters

NAMES = list(zoo.ZOO)


def _state(m):
    return {k: v.detach() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("name", NAMES)
def test_decoalesce_width2_preserves_the_function(name):
    model, example, level = captured(name)
    big, mapping = vf.decoalesce(level, width=2.0)
    big.eval()
    x = other_inputs(example)  # a batch size and sequence length the capture did not use
    with torch.no_grad():
        err = rel_error(output_tensor(big(*x)), output_tensor(model(*x)))
    assert err <= 1e-5
    assert mapping.spaces and all(s.large == 2 * s.small for s in mapping.spaces)


@pytest.mark.parametrize("name", NAMES)
def test_coalesce_of_decoalesce_is_exact(name):
    _, _, level = captured(name)
    big, mapping = vf.decoalesce(level, width=2.0)
    back, _ = vf.coalesce(big, mapping=mapping)
    a, b = _state(level), _state(back)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), f"{k}: max diff {float((a[k].double() - b[k].double()).abs().max())}"


@pytest.mark.parametrize("name", NAMES)
def test_coalesce_width_half_halves_units_matches_prediction_and_trains(name):
    _, example, level = captured(name)
    a = analyze(level, chains=False)
    small, mapping = vf.coalesce(level, width=0.5)
    planned = {s.key for s in mapping.spaces} | {k["key"] for k in mapping.kept}
    assert planned == {s.key for s in a.spaces if s.resizable}  # every space decided, and why
    for sm in mapping.spaces:
        assert sm.small in (sm.large // 2, (sm.large + 1) // 2)  # halved (3 heads -> 2 groups)
    after = {s.key: s.size for s in analyze(small, chains=False).spaces}
    for sm in mapping.spaces:
        assert after[sm.key] == sm.small
    leaf_sizes = {a.space(sm.key).root.id: sm.small for sm in mapping.spaces}
    assert sum(p.numel() for p in small.parameters()) == predict_parameters(a, leaf_sizes)
    assert_runs_elsewhere_and_trains(small, example)


def test_three_heads_at_half_use_uneven_groups_that_stay_exact():
    _, example, level = captured("deit")
    small, mapping = vf.coalesce(level, width=0.5)
    heads = [s for s in mapping.spaces if s.large == 3]
    assert len(heads) == 2 and all(sorted(s.groups(), key=len) == [[1], [0, 2]] for s in heads)
    # growing back with the same mapping and coalescing again returns the small level exactly
    big, _ = vf.decoalesce(small, mapping=mapping)
    again, _ = vf.coalesce(big, mapping=mapping)
    for k, v in _state(small).items():
        assert torch.equal(v, _state(again)[k]), k


def test_normalized_space_is_kept_when_groups_would_be_uneven():
    model, x = zoo.gpt2(n_embd=48, n_head=4)  # residual 48 -> 0.75 * 48 = 36: divides 48? no
    level = vf.capture(model, x)
    _, mapping = vf.coalesce(level, width=0.75)
    kept = {k["key"]: k["reason"] for k in mapping.kept}
    residual = [k for k in kept if "uneven" in kept[k] and "norm" in kept[k]]
    assert residual, kept


def test_saved_mapping_reapplied_gives_bitwise_identical_weights(tmp_path):
    _, _, level = captured("gpt2")
    small, mapping = vf.coalesce(level, width=0.5, pairing="similarity")
    mapping.save(tmp_path / "m.json")
    loaded = vf.Mapping.load(tmp_path / "m.json")
    again, _ = vf.coalesce(level, mapping=loaded)
    for k, v in _state(small).items():
        assert torch.equal(v, _state(again)[k]), k
    data = json.loads((tmp_path / "m.json").read_text())
    # sparse index form: one entry per larger unit, never an n x n matrix
    for s in data["spaces"]:
        assert len(s["index"]) == s["large"] and all(isinstance(i, int) for i in s["index"])


def test_similarity_pairing_groups_the_most_similar_units():
    model, x = zoo.gpt2()
    with torch.no_grad():  # make FFN unit i + 1 a near copy of unit i for even i
        fc = model.transformer.h[0].mlp.c_fc
        fc.weight[:, 1::2] = fc.weight[:, 0::2] + 1e-3 * torch.randn_like(fc.weight[:, 0::2])
        fc.bias[1::2] = fc.bias[0::2]
    level = vf.capture(model, x)
    _, mapping = vf.coalesce(level, width=0.5, pairing="similarity")
    ffn = next(s for s in mapping.spaces if s.key == "transformer.h.0.mlp.c_fc.bias[0]")
    assert all(ffn.index[i] == ffn.index[i + 1] for i in range(0, ffn.large, 2))


def test_tied_head_is_compensated_by_folding_into_the_final_norm():
    _, _, level = captured("gpt2")
    big, mapping = vf.decoalesce(level, width=2.0)
    (comp,) = mapping.compensations
    assert comp.tensor == "lm_head.weight" and comp.factor == 2.0
    assert sorted(comp.fold) == ["transformer.ln_f.bias", "transformer.ln_f.weight"]
    ln = dict(level.named_parameters())["transformer.ln_f.weight"]
    ln_big = dict(big.named_parameters())["transformer.ln_f.weight"]
    assert torch.equal(ln_big, ln.repeat(2) / 2)  # strided copy, halved
    # level 0 never carries a scale node, and neither does a level whose factor folds exactly
    assert not any("vcyclefx_scale" in n.meta for n in big.graph.nodes)


def test_tied_head_gets_a_scale_node_when_folding_is_not_exact():
    model, x = zoo.gpt2()
    level = vf.capture(model, x)
    level.eval()
    big, mapping = vf.decoalesce(level, width=3.0)  # factor 3 is not a power of two
    scales = [n for n in big.graph.nodes if "vcyclefx_scale" in n.meta]
    assert len(scales) == 1 and scales[0].args[1] == pytest.approx(1 / 3)
    big.eval()
    xx = other_inputs(x)
    with torch.no_grad():
        model.eval()
        assert rel_error(big(*xx).logits, model(*xx).logits) <= 1e-5
    back, _ = vf.coalesce(big, mapping=mapping)  # the inverse removes the node again
    assert not any("vcyclefx_scale" in n.meta for n in back.graph.nodes)


def test_mapping_from_another_model_is_rejected():
    _, _, gpt2 = captured("gpt2")
    _, _, llama = captured("llama")
    _, mapping = vf.coalesce(gpt2, width=0.5)
    with pytest.raises(vf.MappingError, match="another model"):
        vf.coalesce(llama, mapping=mapping)


def test_factor_that_resizes_nothing_is_a_clear_error():
    _, _, level = captured("gpt2")
    with pytest.raises(vf.PlanError, match="width=0.001 resizes no space"):
        vf.coalesce(level, width=0.001)
    with pytest.raises(vf.PlanError, match=r"width=1.5 must be in \(0, 1\]"):
        vf.coalesce(level, width=1.5)
    with pytest.raises(vf.PlanError, match="must be >= 1"):
        vf.decoalesce(level, width=0.5)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "index"])
def test_corrupted_mapping_file_is_a_clear_error(tmp_path, damage):
    _, _, level = captured("gpt2")
    _, mapping = vf.coalesce(level, width=0.5)
    path = tmp_path / "mapping.json"
    mapping.save(path)
    text = path.read_text()
    if damage == "truncate":
        path.write_text(text[: len(text) // 2])
    elif damage == "garbage":
        path.write_text('{"format": "something else"}')
    else:
        d = json.loads(text)
        d["spaces"][0]["index"] = d["spaces"][0]["index"][:-1]
        path.write_text(json.dumps(d))
    with pytest.raises(vf.MappingError, match=str(path.name)):
        vf.Mapping.load(path)


def test_cli_failure_leaves_no_partial_level_directory(tmp_path):
    from vcyclefx.cli import main

    out = tmp_path / "level"
    assert main(["coalesce", "vcyclefx.zoo:gpt2", "--width", "0.001", "-o", str(out)]) == 2
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []
