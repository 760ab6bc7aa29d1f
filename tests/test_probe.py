"""The probe capture that ``inspect`` uses: two static exports whose sizes are compared give
exactly the analysis of one export with symbolic batch and sequence sizes, or step aside."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import sympy
import torch

import vcyclefx as vf
from vcyclefx import zoo
from vcyclefx.analysis.analyze import analyze
from vcyclefx.analysis.dims import SIZES
from vcyclefx.level import level_info
from vcyclefx.capture.probe import _can_fork, probe_capture
from vcyclefx.analysis.report import Report


def _comparable(report: Report | dict) -> str:
    """The report without what differs by construction: node count, timing, node names (and
    the model name, which only ``inspect`` fills in)."""
    d = dict(report.to_dict() if isinstance(report, Report) else report)
    del d["nodes"], d["analysis_seconds"], d["model"]
    return re.sub(r"node \S+ \(", "node _ (", json.dumps(d, sort_keys=True, default=str))


# bert: a position-id buffer sliced to the sequence length (static slicing would make a bogus
# "positions 16..63" space); llama: rotary tables and grouped heads; gpt2: tied head
@pytest.mark.parametrize("name", ["gpt2", "bert", "llama"])
def test_probe_analysis_equals_the_symbolic_capture_analysis(name):
    model, x = getattr(zoo, name)()
    probed = probe_capture(model, x)
    assert probed is not None
    symbolic = vf.capture(model, x)
    assert _comparable(Report(analyze(probed))) == _comparable(Report(analyze(symbolic)))
    # the labels name batch and sequence: every input is (s0, s1)
    inputs = [n for n in probed.graph.nodes if n.op == "placeholder"]
    b, s = (sympy.Symbol(f"s{k}", integer=True, positive=True) for k in range(2))
    assert all(n.meta[SIZES] == (b, s) for n in inputs)
    assert level_info(probed).dynamic_dims == tuple((i, d) for i in range(len(x)) for d in (0, 1))


def _family(name):
    from tests.test_families import FAMILIES, SLOW_FAMILIES

    if hasattr(zoo, name):
        return getattr(zoo, name)()
    return {**FAMILIES, **SLOW_FAMILIES}[name]()


_ALL = ["gpt2", "bert", "llama", "deit", "vit", "resnet18", "nanogpt", "gpt_neox", "qwen2", "opt",
        "phi3", "roberta", "timm_convnext", "timm_swin", "mistral", "phi", "bloom", "distilbert",
        "gptj", "falcon_mqa", "starcoder2", "gemma2", "hf_vit", "clip_vision", "tv_mobilenet_v2",
        "tv_resnet50", "tv_efficientnet_b0", "tv_swin_t"]


@pytest.mark.slow
@pytest.mark.parametrize("name", _ALL)
def test_inspect_equals_the_symbolic_capture_analysis_on_every_family(name):
    """28 families: inspect (probed where the inputs have a sequence axis) reports what the
    symbolic capture's analysis finds."""
    model, x = _family(name)
    level = vf.capture(model, x)
    symbolic = Report(analyze(level), capture_notes=level_info(level).notes)
    assert _comparable(vf.inspect(model, x)) == _comparable(symbolic)


def test_probe_labels_products_and_multiples_of_batch_and_sequence():
    model, x = zoo.gpt2(n_head=4, n_embd=64)
    probed = probe_capture(model, x)
    b, s = (sympy.Symbol(f"s{k}", integer=True, positive=True) for k in range(2))
    labels = {n.meta[SIZES] for n in probed.graph.nodes if isinstance(n.meta.get(SIZES), tuple)}
    assert (b, s, 64) in labels  # hidden states
    assert (b, 4, s, 16) in labels  # heads
    assert (b * s, 64) in labels  # the flattened rows of an addmm


class _LabelsShifted(torch.nn.Module):
    """Next-token targets: the sequence minus one, which is not a monomial of the sizes."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(32, 8)
        self.out = torch.nn.Linear(8, 32)

    def forward(self, ids):
        return self.out(self.emb(ids[:, :-1]))


class _BranchOnLength(torch.nn.Module):
    """Python control flow on the sequence length: the two captures differ in structure."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(32, 8)
        self.a = torch.nn.Linear(8, 8)

    def forward(self, ids):
        h = self.emb(ids)
        return self.a(h) if ids.shape[1] > 14 else h


class _FirstTokenEverywhere(torch.nn.Module):
    """``repeat_interleave`` by the sequence length: a SymInt count when captured symbolically,
    the literal 16 in a static capture (whose output the probe labels ``s1``)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(32, 8)
        self.out = torch.nn.Linear(8, 32)

    def forward(self, ids):
        first = self.emb(ids[:, :1]).repeat_interleave(ids.shape[1], dim=1)
        return self.out(self.emb(ids) + first)


def test_a_literal_count_that_makes_a_sequence_axis_is_read_as_symbolic():
    model = _FirstTokenEverywhere()
    x = (torch.randint(0, 32, (2, 16)),)
    probed = probe_capture(model, x)
    assert probed is not None
    assert _comparable(Report(analyze(probed))) == _comparable(Report(analyze(vf.capture(model, x))))


@pytest.mark.parametrize("cls", [_LabelsShifted, _BranchOnLength])
def test_probe_steps_aside_where_it_cannot_explain_the_sizes(cls):
    model = cls()
    x = (torch.randint(0, 32, (2, 16)),)
    assert probe_capture(model, x) is None
    # and inspect still reports, from the symbolic capture
    report = vf.inspect(model, x)
    assert report.to_dict()["nodes"] == len(vf.capture(model, x).graph.nodes)


def test_images_are_captured_symbolically_not_probed():
    model, x = zoo.resnet18()
    assert probe_capture(model, x) is None


@pytest.mark.skipif(not _can_fork(), reason="the forked probe runs on Linux in one thread only")
def test_forked_probe_gives_the_labels_of_the_sequential_probe():
    model, x = zoo.llama()
    forked = probe_capture(model, x, parallel=True)
    serial = probe_capture(model, x, parallel=False)
    assert forked is not None and serial is not None
    assert [n.meta.get(SIZES) for n in forked.graph.nodes] == [n.meta.get(SIZES) for n in serial.graph.nodes]
    assert sum(n.meta.get(SIZES) is not None for n in forked.graph.nodes) > 50


def test_inspect_program_prints_the_whole_report_and_exits_zero():
    """`vcyclefx inspect` leaves without interpreter teardown; its output must be complete."""
    out = subprocess.run([sys.executable, "-m", "vcyclefx.cli", "inspect", "vcyclefx.zoo:bert", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    model, x = zoo.bert()
    assert _comparable(json.loads(out.stdout)) == _comparable(vf.inspect(model, x))
