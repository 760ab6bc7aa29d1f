"""Writing a level lifts its graph into an ExportedProgram instead of exporting it again; the
program runs exactly like the level, at other batch and sequence sizes too."""

from __future__ import annotations

import io

import pytest
import torch

import vcyclefx as vf
from vcyclefx import zoo
from vcyclefx.export.leveldir import load_level, save_level
from vcyclefx.export.program import NotLiftable, lift, program_of, reexport


def _round_trip(ep):
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    return torch.export.load(io.BytesIO(buf.getvalue())).module()


@pytest.mark.parametrize("name", ["gpt2", pytest.param("llama", marks=pytest.mark.slow)])
def test_the_lifted_program_equals_the_level_at_other_sizes(name):
    model, x = getattr(zoo, name)()
    small, _ = vf.coalesce(model, x, width=0.5, depth=0.5)
    small.eval()
    lifted, exported = lift(small), reexport(small)
    assert str(lifted.range_constraints) == str(exported.range_constraints)
    assert len(lifted.graph.nodes) == len(exported.graph.nodes)
    assert [s.kind for s in lifted.graph_signature.input_specs] == \
        [s.kind for s in exported.graph_signature.input_specs]
    mod = _round_trip(lifted)
    vocab = int(x[0].max()) + 1
    for shape in [(3, 9), tuple(x[0].shape), (5, 30)]:
        ids = torch.randint(0, vocab, shape)
        a, b = mod(ids), small(ids)
        assert torch.equal(a.logits, b.logits), shape


def test_a_graph_that_updates_its_buffers_is_re_exported():
    model, x = zoo.resnet18()
    level = vf.capture(model, x)
    level.train()  # BatchNorm updates its running statistics in place
    with pytest.raises(NotLiftable, match="in place"):
        lift(level)
    ep = program_of(level)
    mod = _round_trip(ep)
    x0 = x[0] if isinstance(x, tuple) else x
    torch.manual_seed(0)
    want = level(x0)
    got = mod(x0)  # training-mode graph: BatchNorm normalizes with the batch's statistics
    assert torch.allclose(got, want, atol=1e-5)


def test_saving_a_level_exports_nothing(tmp_path, monkeypatch):
    model, x = zoo.gpt2()
    small, mapping = vf.coalesce(model, x, width=0.5, depth=0.5)
    calls = []
    real = torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: calls.append(1) or real(*a, **k))
    save_level(small, tmp_path / "lvl", mapping)
    assert calls == []
    monkeypatch.undo()
    back, m2 = load_level(tmp_path / "lvl")
    small.eval(), back.eval()
    ids = torch.randint(0, 50, (3, 11))
    assert torch.equal(back(ids).logits, small(ids).logits)
    assert m2.small_shapes == mapping.small_shapes
