"""Long driver runs (``-m slow``): the tiny preset's compare, resume under FSDP and across the
schedules of a compare run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import kill_after_checkpoint as kill_run

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "tools" / "train.py")
SMALL = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--seq-len", "32",
         "--batch-size", "4", "--grad-accum", "2", "--warmup", "1", "--log-every", "1",
         "--eval-every", "50", "--eval-batches", "3", "--ckpt-every", "20", "--vcycle-budget", "1",
         "--quiet"]


def env() -> dict:
    e = {k: v for k, v in os.environ.items()
         if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return dict(e, OMP_NUM_THREADS="1")


def corpus(tmp: Path) -> Path:
    path = tmp / "corpus.txt"
    path.write_bytes(b"".join(Path(m.__file__).read_bytes() for m in (json, os, subprocess)))
    return path


def records(out: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["event"], r["schedule"], r["step"], r["loss"], r["val_loss"], r["flops"])
            for r in rows]


def kill_tree_after_checkpoint(cmd: list[str], out: Path, schedule: str, min_step: int) -> int:
    """SIGKILL ``cmd`` and its children (torchrun's workers) once a checkpoint of ``schedule``
    at step >= min_step exists."""
    return kill_run(cmd, out, env(), min_step, schedule, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("launcher,extra,schedule,kill_in", [
    ("torchrun", ["--fsdp"], "vcycle", ("vcycle", 40)),   # FSDP, inside the coarse stage
    ("python", [], "compare", ("vcycle", 140)),            # compare, in the V-cycle's last stage
])
def test_sigkill_and_resume_equals_an_uninterrupted_run(tmp_path, launcher, extra, schedule,
                                                         kill_in):
    run = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "2", TRAIN] if launcher == "torchrun" else [sys.executable, TRAIN])
    common = [*SMALL, *extra, "--schedule", schedule, "--steps", "200", "--data",
              str(corpus(tmp_path)), "--cache-dir", str(tmp_path / "cache")]
    subprocess.run(run + common + ["-o", str(tmp_path / "full")], env=env(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rc = kill_tree_after_checkpoint(run + common + ["-o", str(tmp_path / "cut")], tmp_path / "cut",
                                    *kill_in)
    assert rc == -signal.SIGKILL
    subprocess.run(run + ["--resume", str(tmp_path / "cut"), "--quiet"], env=env(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    a, b = records(tmp_path / "full"), records(tmp_path / "cut")
    assert [r[:3] for r in a] == [r[:3] for r in b]
    assert max(abs((x[3] or 0) - (y[3] or 0)) + abs((x[4] or 0) - (y[4] or 0))
               for x, y in zip(a, b)) <= 1e-6


def readme_train_command() -> list[str]:
    """The README's first command, after its ``pip install -e . &&``: ``vcyclefx train ...``."""
    import shlex

    text = (ROOT / "README.md").read_text()
    block = text[text.index("```bash") + len("```bash"):]
    line = block[:block.index("```")].strip()
    cmd = shlex.split(line.split("&&", 1)[1])
    assert cmd[:2] == ["vcyclefx", "train"], line
    return cmd[2:]


@pytest.mark.slow
def test_the_readme_first_command_finishes_within_15_minutes_and_prints_both_savings(tmp_path):
    out = tmp_path / "run"
    t = time.monotonic()
    res = subprocess.run([sys.executable, TRAIN, *readme_train_command(), "--quiet", "-o", str(out)],
                         env={**env(), "OMP_NUM_THREADS": "2"}, capture_output=True, text=True,
                         timeout=15 * 60)
    seconds = time.monotonic() - t
    assert res.returncode == 0, res.stderr[-2000:]
    print(res.stdout, f"\nwhole run: {seconds:.0f}s")
    summary = json.loads((out / "summary.json").read_text())
    base, vc = summary["schedules"]["baseline"], summary["schedules"]["vcycle"]
    assert 23 <= base["tokens_per_param"] <= 27  # the regime the README promises
    assert base["final_val_loss"] < 2.2 and vc["final_val_loss"] < 2.2  # from 5.5 at step 0
    eff = summary["effective_saving"]  # both measures, against this run's own frontiers
    assert set(eff["budgets"]) == {"baseline-x0.75", "baseline", "baseline-x1.5"}
    # the envelope: the full model, level 1 (1 x 16) and --alone-sizes 1x32x2 alone
    assert eff["envelope"]["flops"] is not None and set(eff["envelope"]["sizes"]) == {
        "level0", "level1", "1x32x2"}
    stages = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["steps"] for r in stages if r["event"] == "stage" and r["schedule"] == "vcycle"]
    assert abs(steps[1] / sum(steps) - 0.08) < 0.01  # the regime's default: a short coarse phase
    assert "envelope" in res.stdout and "Verdict:" in res.stdout


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_vcycle_on_two_processes_equals_the_one_process_vcycle(tmp_path, parallel):
    """DDP wraps each level; FSDP2 shards it at the root (a GraphModule reads its weights
    straight from the graph) and copies the weights back into the VCycle's module after every
    stage."""
    common = [*SMALL, "--ckpt-every", "0", "--eval-every", "10", "--schedule", "vcycle",
              "--steps", "40", "--data", str(corpus(tmp_path)), "--cache-dir", str(tmp_path / "c")]
    subprocess.run([sys.executable, TRAIN, *common, "-o", str(tmp_path / "one")], env=env(),
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", "2", TRAIN, *common, *parallel, "-o", str(tmp_path / "two")],
                   env=env(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    a, b = records(tmp_path / "one"), records(tmp_path / "two")
    assert [r[:3] for r in a] == [r[:3] for r in b]
    assert {r[1] for r in a} == {"vcycle"} and len([r for r in a if r[0] == "stage"]) == 3
    assert max(abs((x[3] or 0) - (y[3] or 0)) + abs((x[4] or 0) - (y[4] or 0))
               for x, y in zip(a, b)) < 1e-4
