"""tools/bench_savings.py's frontier study end to end on a micro model (subprocess runs)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tools import bench_savings


@pytest.mark.slow
def test_frontier_study_tunes_the_lr_builds_the_frontier_and_scores_a_variant(tmp_path, capsys):
    data = tmp_path / "corpus.txt"
    data.write_bytes(b"".join(Path(m.__file__).read_bytes() for m in (json, subprocess, pytest)))
    micro = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--seq-len", "32",
             "--batch-size", "4", "--steps", "24", "--warmup", "2", "--eval-every", "12",
             "--eval-batches", "2", "--ckpt-every", "0", "--data", str(data),
             "--cache-dir", str(tmp_path / "cache")]
    rc = bench_savings.main(["--out", str(tmp_path / "study"), "--seeds", "1", "--lrs",
                             "0.003,0.006", "--budgets", "0.5,1", "--vcycle-lr-factors", "1",
                             "--coarse-scales", "2", "--variants", "id+a0.75+carry+x1.5", "--", *micro])
    assert rc == 0
    table = json.loads((tmp_path / "study" / "table.json").read_text())
    assert [lr for lr, _ in table["lr_tuning"]] == [0.003, 0.006]
    assert [(b["budget"], b["steps"]) for b in table["frontier"]] == [(0.5, 12), (1.0, 24)]
    (v,) = table["variants"]
    assert v["name"] == "id+a0.75+carry+x1.5" and v["runs"] == 1 and v["scale"] == 2.0
    seed = v["per_seed"]["1"]
    assert seed["flops_saving"] is not None and seed["wall_saving"] is not None and seed["raw_wall_saving"] is not None
    assert (tmp_path / "study" / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("id+a0.75+carry+x1.5")  # the table is printed last
