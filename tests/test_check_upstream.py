"""tools/check_upstream.py's report, read from the junit xml of a real pytest run: one passing
test, a family whose analysis raises the registry's real UnsupportedOp, one failed assert.
(The venv and the install are not tested here: minutes of downloads.)"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tools import check_upstream

REPO = Path(__file__).resolve().parents[1]

# an op defined here has no vcyclefx rule now and never will (an aten op might get one)
DEMO = textwrap.dedent('''
    import pytest
    import torch
    from torch.fx import Graph

    from vcyclefx.analysis.registry import rule_for

    _LIB = torch.library.Library("check_upstream_demo", "DEF")
    _LIB.define("mystery(Tensor x) -> Tensor")


    def test_passes():
        assert sum([1, 1]) == 2


    @pytest.mark.parametrize("name", ["mamba2"])
    def test_family_analysis(name):
        graph = Graph()
        node = graph.call_function(torch.ops.check_upstream_demo.mystery.default,
                                   (graph.placeholder("x"),))
        rule_for(node)  # raises vcyclefx.errors.UnsupportedOp naming the op


    @pytest.mark.parametrize("name", ["gpt2"])
    def test_family_size(name):
        assert len(name) == 3
''')


def test_report_of_a_real_pytest_run_names_the_op_without_a_rule_the_families_and_counts(tmp_path):
    (tmp_path / "test_demo.py").write_text(DEMO)
    junit = tmp_path / "junit.xml"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "pytest", "test_demo.py",
                           *check_upstream.pytest_options(junit)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr  # 1: tests failed (not a usage error)

    results = check_upstream.parse_junit(junit)
    by_name = {r.test: r for r in results}
    assert sorted(by_name) == ["test_demo.py::test_family_analysis[mamba2]",
                               "test_demo.py::test_family_size[gpt2]", "test_demo.py::test_passes"]
    unsupported = by_name["test_demo.py::test_family_analysis[mamba2]"]
    assert (unsupported.outcome, unsupported.family, unsupported.error_type, unsupported.op) == (
        "failed", "mamba2", "UnsupportedOp", "check_upstream_demo.mystery.default")
    asserted = by_name["test_demo.py::test_family_size[gpt2]"]
    assert (asserted.outcome, asserted.family, asserted.error_type, asserted.op) == (
        "failed", "gpt2", "AssertionError", "")
    assert by_name["test_demo.py::test_passes"].outcome == "passed"

    text = check_upstream.report(results, {"transformers": ("5.24.0", "5.25.0"),
                                           "timm": ("1.0.31", "1.0.31")})
    lines = text.splitlines()
    assert "ops without a rule: check_upstream_demo.mystery.default (families: mamba2)" in lines
    assert "family gpt2: 1 failing (AssertionError)" in lines
    assert "family mamba2: 1 failing (UnsupportedOp (check_upstream_demo.mystery.default))" in lines
    assert "passed 1, failed 2, errors 0, skipped 0 (3 tests)" in lines
    assert "moved since constraints/ci.txt: transformers 5.24.0 -> 5.25.0" in lines
    # the table is printed last: its total row has the counts and the failing families
    assert lines[-1].split() == ["total", "1", "2", "0", "0", "gpt2,", "mamba2"]
