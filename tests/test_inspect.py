"""``inspect`` uses the capture ``coalesce`` uses, so its report describes the graph a resize
rewrites; the FX settings that make every capture faster do not change the graph."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import pytest
import torch

import vcyclefx as vf
from vcyclefx import zoo
from vcyclefx.analysis.analyze import analyze
from vcyclefx.analysis.report import Report
from vcyclefx.capture.frontend import _auto_dims, export_program, quick_fx


def _comparable(report: Report | dict) -> str:
    """The report without its timing and model name (only ``inspect`` fills that in)."""
    d = dict(report.to_dict() if isinstance(report, Report) else report)
    del d["analysis_seconds"], d["model"]
    return json.dumps(d, sort_keys=True, default=str)


@pytest.mark.parametrize("name", ["gpt2", pytest.param("bert", marks=pytest.mark.slow),
                                  pytest.param("llama", marks=pytest.mark.slow)])
def test_inspect_reports_the_graph_that_coalesce_rewrites(name):
    model, x = getattr(zoo, name)()
    level = vf.capture(model, x)
    report = vf.inspect(model, x)
    assert report.to_dict()["nodes"] == len(level.graph.nodes)
    assert _comparable(report) == _comparable(Report(analyze(level)))
    # the resizable spaces the report lists are the ones coalesce resizes
    resizable = {s["key"] for s in report.to_dict()["spaces"] if s["resizable"]}
    _, mapping = vf.coalesce(model, x, width=0.5)
    assert {sm.key for sm in mapping.spaces} <= resizable and mapping.spaces


def test_the_quick_fx_settings_do_not_change_the_graph_and_are_restored():
    model, x = zoo.llama()
    shapes = _auto_dims(x)
    before = torch.fx.config.do_not_emit_stack_traces
    with torch.no_grad():
        quick = export_program(model, x, shapes)
        assert torch.fx.config.do_not_emit_stack_traces == before
        plain = torch.export.export(model, x, dynamic_shapes=shapes, strict=False)
    assert quick.graph_module.code == plain.graph_module.code
    assert str(quick.range_constraints) == str(plain.range_constraints)
    # what the setting saves: a stack trace recorded per node (a few size nodes still get one)
    traced = sum(bool(n.meta.get("stack_trace")) for n in quick.graph.nodes)
    assert 10 * traced < sum(bool(n.meta.get("stack_trace")) for n in plain.graph.nodes)
    with quick_fx():
        assert torch.fx.config.do_not_emit_stack_traces is True
    assert torch.fx.config.do_not_emit_stack_traces == before


def _imported(stderr: str) -> set[str]:
    """The modules a ``python -X importtime`` process imported, from its stderr."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines()
            if line.startswith("import time:") and line.count("|") == 2}


def test_inspect_program_prints_the_whole_report_and_exits_zero():
    """`vcyclefx inspect` leaves without interpreter teardown; its output must be complete. It
    captures (torch.export, which imports torch._dynamo) without importing triton, which
    torch._dynamo imports in any other process where triton is installed."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "vcyclefx.cli", "inspect",
                          "vcyclefx.zoo:bert", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    imported = _imported(out.stderr)
    # (a refused `import triton` is listed too: its compiled library tells whether it loaded)
    assert "torch._dynamo" in imported and "triton._C.libtriton" not in imported
    if importlib.util.find_spec("triton") is not None:  # the CUDA builds of torch install it
        plain = subprocess.run([sys.executable, "-X", "importtime", "-c", "import torch._dynamo"],
                               capture_output=True, text=True, timeout=300)
        assert "triton._C.libtriton" in _imported(plain.stderr)
    model, x = zoo.bert()
    shown = re.sub(r'"analysis_seconds": [0-9.e-]+', "", out.stdout)
    assert _comparable(json.loads(out.stdout)) == _comparable(vf.inspect(model, x)), shown[:200]


def test_inspect_of_a_checkpoint_without_its_weights_reports_what_a_loaded_one_does(tmp_path, capsys, monkeypatch):
    """`inspect --stream always` (the default for a checkpoint larger than a quarter of memory)
    captures on the meta device as the streamed coalesce does, reading no weight: the same
    spaces, chains, ties, parameter count, notes and node count as inspecting the loaded model
    (the meta-device model is traced with fake CPU weights); a second run
    reads the capture cache; a level directory gives the same report either way."""
    import transformers

    from vcyclefx.cli import main
    from vcyclefx.export.shards import ShardReader

    monkeypatch.setenv("VCYCLEFX_CAPTURE_CACHE", str(tmp_path / "captures"))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=96, use_cache=False)).to(torch.bfloat16)
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(tmp_path / "llama", max_shard_size="40KB")

    def report(*args) -> dict:
        assert main(["inspect", *args, "--json"]) == 0
        out = capsys.readouterr()
        d = json.loads(out.out)
        d.pop("analysis_seconds")
        return d, out.err

    loaded, _ = report(str(tmp_path / "llama"), "--stream", "never")
    reads = []
    real_get = ShardReader.get
    monkeypatch.setattr(ShardReader, "get", lambda self, names: reads.append(names) or real_get(self, names))
    streamed, err = report(str(tmp_path / "llama"), "--stream", "always")
    assert reads == [] and "on the meta device" in err
    assert loaded.pop("nodes") == streamed.pop("nodes")  # traced as on a CPU: the same graph
    assert streamed == loaded and streamed["chains"][0]["blocks"] == 4
    again, err = report(str(tmp_path / "llama"), "--stream", "always")
    again.pop("nodes")
    assert again == streamed and "from the capture cache" in err
    # a level directory: its graph either way (level.pt2), its weights read only in memory
    assert main(["coalesce", str(tmp_path / "llama"), "-o", str(tmp_path / "small")]) == 0
    capsys.readouterr()
    reads.clear()  # the coalesce of the sharded checkpoint streamed it
    assert report(str(tmp_path / "small"), "--stream", "always")[0] == \
        report(str(tmp_path / "small"), "--stream", "never")[0]
    assert reads == []
