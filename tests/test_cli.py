"""The command line: inspect, coalesce, decoalesce, interpolate, and its errors."""

from __future__ import annotations

import json

import pytest
import torch

import vcyclefx as vf
from tests.conftest import other_inputs
from vcyclefx import zoo
from vcyclefx.cli import main
from vcyclefx.export.leveldir import load_level


@pytest.mark.parametrize("spec,needle", [
    ("no_colon_here", "expected 'package.module:factory'"),
    ("not_a_module_xyz:factory", "cannot import module 'not_a_module_xyz'"),
    ("vcyclefx.zoo:no_such_factory", "has no callable 'no_such_factory'"),
    ("missing_file.pt2", "missing_file.pt2': no such file"),
    ("vcyclefx.zoo:SEQ", "has no callable 'SEQ'"),
])
def test_bad_model_strings_name_what_is_wrong(spec, needle, capsys):
    assert main(["inspect", spec]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith("vcyclefx inspect: error:")


def test_inspect_json_lists_spaces_chains_and_tied_tensors(capsys):
    assert main(["inspect", "vcyclefx.zoo:gpt2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    resizable = [s for s in data["spaces"] if s["resizable"]]
    assert len(resizable) == 5
    assert all(s["reason"] for s in data["spaces"] if not s["resizable"])
    assert [(c["container"], c["blocks"]) for c in data["chains"]] == [("transformer.h", 2)]
    assert data["tied"][0]["tensor"] == "lm_head.weight"
    assert sorted(data["tied"][0]["aliases"]) == ["lm_head.weight", "transformer.wte.weight"]


def test_coalesce_decoalesce_interpolate_round_trip_through_level_directories(tmp_path, capsys):
    small, big, mixed = tmp_path / "small", tmp_path / "big", tmp_path / "mixed"
    assert main(["coalesce", "vcyclefx.zoo:gpt2", "--width", "0.5", "--depth", "0.5", "-o", str(small)]) == 0
    assert sorted(p.name for p in small.iterdir()) == [
        "inputs.safetensors", "level.json", "level.pt2", "mapping.json", "weights.safetensors"]
    summary = json.loads((small / "level.json").read_text())
    assert summary["chains"] == [] and summary["parameters"] < 40_000
    assert main(["decoalesce", str(small), "-o", str(big)]) == 0
    assert main(["interpolate", str(big), str(big), "--alpha", "0.25", "-o", str(mixed)]) == 0
    restored, mapping = load_level(big)
    model, x = zoo.gpt2()
    assert restored.state_dict().keys() == model.state_dict().keys()
    model.load_state_dict(restored.state_dict(), strict=True)  # the original class takes it
    mixed_level, _ = load_level(mixed)
    for k, v in restored.state_dict().items():
        assert torch.equal(v, mixed_level.state_dict()[k])  # interpolating a level with itself
    small_level, small_mapping = load_level(small)
    again, _ = vf.decoalesce(small_level, mapping=small_mapping)
    for k, v in again.state_dict().items():
        assert torch.equal(v, restored.state_dict()[k])
    with torch.no_grad():
        assert restored.eval()(*other_inputs(x)).logits.shape == (3, 24, 128)


def test_existing_output_directory_is_not_overwritten_without_force(tmp_path, capsys):
    out = tmp_path / "lvl"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["coalesce", "vcyclefx.zoo:gpt2", "-o", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
