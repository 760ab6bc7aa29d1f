"""Resume after SIGKILL gives the same run as no interruption (CPU, eager, fixed seeds).

A real subprocess is killed with SIGKILL once it has written a checkpoint (and has usually
logged past it), then continued with --resume; every training loss, every validation loss and
the summary must equal those of an uninterrupted run with the same options. (More cases: FSDP
and a kill in the last stage in test_driver_slow.py; sharded checkpoints resumed on one or two
processes in test_driver_fsdp.py.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import kill_after_checkpoint as kill_run

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--seq-len", "32",
        "--batch-size", "8", "--eval-every", "20", "--eval-batches", "2", "--log-every", "1",
        "--warmup", "5", "--vcycle-budget", "1", "--quiet"]


def corpus(tmp: Path) -> Path:
    import argparse, collections, json as j, typing  # noqa: E401 - just their source files

    path = tmp / "corpus.txt"
    path.write_bytes(b"".join(Path(m.__file__).read_bytes() for m in (argparse, collections, j, typing)))
    return path


def train_cmd(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "tools" / "train.py"), *args]


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    e.pop("RANK", None)
    e.pop("WORLD_SIZE", None)
    return e


def records(out: Path, event: str) -> list[tuple]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    key = "loss" if event == "train" else "val_loss"
    return [(r["schedule"], r["step"], r[key], r["tokens"], r["flops"]) for r in rows
            if r["event"] == event]


def kill_after_checkpoint(cmd: list[str], out: Path, schedule: str, min_step: int,
                          timeout: float = 300) -> int:
    """Start ``cmd``, SIGKILL it as soon as a checkpoint of ``schedule`` at step >= min_step
    exists."""
    return kill_run(cmd, out, env(), min_step, schedule, timeout)


def test_resume_after_sigkill_in_the_vcycle_of_a_compare_run_matches_an_uninterrupted_run(tmp_path):
    """compare = baseline (200 steps), then the V-cycle: 10 steps of level 0, 90 of level 1, 100
    of level 0. The kill comes inside the coarse stage, so resuming needs the finished baseline
    left alone, the driver's checkpoint of the coarse level, and the VCycle's own checkpoint
    (the level-0 weights kept for the interpolation after the coarse stage)."""
    data = corpus(tmp_path)
    common = [*TINY, "--schedule", "compare", "--steps", "200", "--ckpt-every", "25",
              "--frontier-budgets", "1",  # one baseline keeps the test short
              "--coarse-budgets", "",  # and no coarse architecture trained alone
              "--data", str(data), "--cache-dir", str(tmp_path / "cache")]
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run(train_cmd(*common, "-o", str(full)), env=env(), check=True,
                   stdout=subprocess.DEVNULL)

    rc = kill_after_checkpoint(train_cmd(*common, "-o", str(cut)), cut, "vcycle", min_step=50)
    assert rc == -signal.SIGKILL, "the run ended before it could be killed; make it longer"
    assert not (cut / "summary.json").exists()
    killed_at = [r for r in records(cut, "train") if r[0] == "vcycle"][-1][1]
    assert 50 <= killed_at < 100  # inside the coarse stage (steps 10-100)

    subprocess.run(train_cmd("--resume", str(cut), "--quiet"), env=env(), check=True,
                   stdout=subprocess.DEVNULL)
    a, b = records(full, "train"), records(cut, "train")
    assert len(a) == len(b) == 400  # nothing logged twice, nothing missing
    assert [r[:2] for r in a] == [r[:2] for r in b]
    assert max(abs(x[2] - y[2]) for x, y in zip(a, b)) <= 1e-6
    assert records(full, "eval") == records(cut, "eval")
    sa = json.loads((full / "summary.json").read_text())["schedules"]
    sb = json.loads((cut / "summary.json").read_text())["schedules"]
    for name in ("baseline", "vcycle"):
        assert sa[name]["final_val_loss"] == sb[name]["final_val_loss"]
        assert sa[name]["total_flops"] == sb[name]["total_flops"]
        assert sa[name]["stages"] == sb[name]["stages"]
    assert len(sb["vcycle"]["stages"]) == 3
