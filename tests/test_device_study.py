"""tools/device_study.py (the GPU regime study) end to end on CPU at toy sizes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tools import device_study
from vcyclefx.driver.data import python_site_files


@pytest.mark.slow  # six training subprocesses: 249 s on the shared 2-core machine under load
def test_the_device_study_runs_at_toy_size_and_prints_both_savings_last(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for m in (json, subprocess, pytest):  # a folder: split by file, as python-site is
        (corpus / Path(m.__file__).name).write_bytes(Path(m.__file__).read_bytes())
    assert device_study.main(["--toy", "--out", str(tmp_path / "study"), "--",
                              "--data", str(corpus), "--cache-dir", str(tmp_path / "cache")]) == 0
    data = json.loads((tmp_path / "study" / "regime.json").read_text())
    (regime,) = data["regimes"]
    (row,) = regime["recipes"]
    seed = row["seeds"]["1"]
    assert seed["same_size"] is not None and seed["envelope"] is not None
    assert seed["envelope_size"] in ("full", "coarse")
    front = regime["frontiers"]["1"]
    assert [b["steps"] for b in front["full"]] == [round(0.25 * regime["steps"]), regime["steps"]]
    assert (tmp_path / "study" / "regime.png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("1 ") and "f.05/.20/.75" in out[-1]  # the table is printed last


def test_python_site_is_every_py_file_of_the_interpreters_path_once():
    root, files = python_site_files()
    assert files == sorted(set(files)) and all(p.suffix == ".py" for p in files)
    assert Path(json.__file__) in files and Path(pytest.__file__) in files  # stdlib and site
    assert all(root in p.parents for p in files[:100])
