"""Resume after SIGKILL gives the same run as no interruption (CPU, eager, fixed seeds).

A real subprocess is killed with SIGKILL once it has written a checkpoint (and has usually
logged past it), then continued with --resume; every training loss, every validation loss and
the summary must equal those of an uninterrupted run with the same options.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--seq-len", "32",
        "--batch-size", "8", "--eval-every", "20", "--eval-batches", "2", "--log-every", "1",
        "--warmup", "5", "--quiet"]


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


def kill_after_checkpoint(cmd: list[str], out: Path, min_step: int, timeout: float = 120) -> int:
    """Start ``cmd``, SIGKILL it as soon as a checkpoint of step >= min_step exists."""
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pointer = out / "ckpt" / "latest.json"
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if pointer.exists():
                name = json.loads(pointer.read_text())["dir"]
                if int(name.rsplit("-", 1)[1]) >= min_step:
                    proc.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.01)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode


# vcycle: 400 steps = stages of 20 (level 0), 180 (level 1), 200 (level 0); killed in the coarse
# stage, so resuming needs the VCycle's checkpoint (the level-0 weights kept for interpolation)
@pytest.mark.parametrize("schedule", ["baseline", "vcycle"])
def test_resume_after_sigkill_matches_uninterrupted_run_exactly(tmp_path, schedule):
    data = corpus(tmp_path)
    common = [*TINY, "--schedule", schedule, "--steps", "400", "--ckpt-every", "25",
              "--data", str(data), "--cache-dir", str(tmp_path / "cache")]
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run(train_cmd(*common, "-o", str(full)), env=env(), check=True,
                   stdout=subprocess.DEVNULL)

    rc = kill_after_checkpoint(train_cmd(*common, "-o", str(cut)), cut, min_step=50)
    assert rc == -signal.SIGKILL, "the run ended before it could be killed; make it longer"
    assert not (cut / "summary.json").exists()
    killed_at = len(records(cut, "train"))
    assert 50 <= killed_at < 400

    subprocess.run(train_cmd("--resume", str(cut), "--quiet"), env=env(), check=True,
                   stdout=subprocess.DEVNULL)
    a, b = records(full, "train"), records(cut, "train")
    assert len(a) == len(b) == 400  # nothing logged twice, nothing missing
    if schedule == "vcycle":
        assert killed_at < 200  # it was killed inside the coarse stage
    assert [r[:2] for r in a] == [r[:2] for r in b]
    assert max(abs(x[2] - y[2]) for x, y in zip(a, b)) <= 1e-6
    assert records(full, "eval") == records(cut, "eval")
    sa = json.loads((full / "summary.json").read_text())["schedules"][schedule]
    sb = json.loads((cut / "summary.json").read_text())["schedules"][schedule]
    assert sa["final_val_loss"] == sb["final_val_loss"]
    assert sa["total_flops"] == sb["total_flops"] and sa["tokens"] == sb["tokens"]
    assert (sb["wall_seconds"] or 0) > 0
