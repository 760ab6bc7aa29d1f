"""How much does the V-cycle save to reach the baseline's final validation loss? A study runner.

Runs ``vcyclefx train`` as subprocesses: the baseline once per seed (``--schedule baseline``; it
does not depend on any V-cycle option), then every chosen V-cycle variant per seed (``--schedule
vcycle``, the same data order and initial weights), at most ``--jobs`` at a time, each with
``OMP_NUM_THREADS = cores // jobs``. A run directory that already has ``summary.json`` is reused,
so an interrupted study continues where it stopped. The table printed last has, per variant
(medians over seeds and repeats):

- final val loss, total training FLOPs, training wall seconds of the run;
- FLOPs / wall seconds at which level 0 first reaches the baseline's final val loss (linear
  interpolation between evaluations, ``vcyclefx.driver.plot.reach``) and the saving against
  the baseline of the same seed (``1 - reach / baseline total``);
- ``wall* %``: the wall saving against the baseline's wall estimated from this run's own
  level-0 seconds per step (baseline steps x that), which cancels the load difference between
  two runs on a shared machine; the measured one is ``wall %``;
- ``after up``: mean training loss over the first 20 steps after the de-coalesce (the level-0
  stage after the coarsest one), and ``after down`` the same after coalescing, to see whether
  carrying the AdamW moments helps (run with ``--log-every 2``).

    python tools/bench_savings.py --out runs/savings --variants default,short-first,carry
    python tools/bench_savings.py --list
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vcyclefx.driver.config import preset  # noqa: E402
from vcyclefx.driver.logger import read_metrics  # noqa: E402
from vcyclefx.driver.plot import reach  # noqa: E402

# name -> extra options of `vcyclefx train --schedule vcycle` (on top of --preset and the common
# options). A variant whose options contain "--schedule baseline" is a plain run (a control).
# A step count written "xF" is F times the baseline's steps (the preset's, or --steps in extra).
VARIANTS: dict[str, list[str]] = {
    "default": [],
    # schedule shape: the first level-0 stage and the coarse stage's share
    "f.02/.20/.78": ["--fractions", "0.02,0.2,0.78"],
    "f.02/.40/.58": ["--fractions", "0.02,0.4,0.58"],
    "f.05/.20/.75": ["--fractions", "0.05,0.2,0.75"],
    "f.05/.30/.65": ["--fractions", "0.05,0.3,0.65"],
    "f.05/.60/.35": ["--fractions", "0.05,0.6,0.35"],
    "f.10/.30/.60": ["--fractions", "0.1,0.3,0.6"],
    "f.20/.30/.50": ["--fractions", "0.2,0.3,0.5"],
    # step budget of the V-cycle (the paper's GPT recipe: 1.05x)
    "steps1.05": ["--vcycle-steps", "x1.05"],
    "steps1.25": ["--vcycle-steps", "x1.25"],
    "steps1.5": ["--vcycle-steps", "x1.5"],
    "steps2": ["--vcycle-steps", "x2"],
    # learning rate of the coarse level
    "lr1": ["--lr-scales", "1,1"],
    "lr2": ["--lr-scales", "1,2"],
    # interpolation weight of the de-coalesced model
    "alpha0.5": ["--alpha", "0.5"],
    "alpha1.0": ["--alpha", "1.0"],
    # which dimension shrinks
    "w0.5/d1.0": ["--depth", "1.0"],
    "w1.0/d0.5": ["--width", "1.0"],
    # pairing
    "adjacent": ["--pairing", "adjacent"],
    "similarity": ["--pairing", "similarity"],
    "depth-strided": ["--depth-pairing", "strided"],
    # new blocks of the de-coalesced level: exact identities, and how much of it is kept
    "identity": ["--depth-init", "identity"],
    "id+a0.5": ["--depth-init", "identity", "--alpha", "0.5"],
    "id+a0.75": ["--depth-init", "identity", "--alpha", "0.75"],
    "id+a0.9": ["--depth-init", "identity", "--alpha", "0.9"],
    "id+a1.0": ["--depth-init", "identity", "--alpha", "1.0"],
    "id+a0.9+steps2": ["--depth-init", "identity", "--alpha", "0.9", "--vcycle-steps", "x2"],
    "id+a0.9+f.05/.20/.75": ["--depth-init", "identity", "--alpha", "0.9",
                             "--fractions", "0.05,0.2,0.75"],
    "id+a0.75+steps1.5": ["--depth-init", "identity", "--alpha", "0.75", "--vcycle-steps", "x1.5"],
    "carry+steps1.5": ["--carry-optimizer", "--vcycle-steps", "x1.5"],
    "id+a0.75+carry+steps1.5": ["--depth-init", "identity", "--alpha", "0.75",
                                "--carry-optimizer", "--vcycle-steps", "x1.5"],
    # optimizer state through the transitions
    "carry": ["--carry-optimizer"],
    # learning-rate envelope
    "lr-global": ["--lr-schedule", "global"],
    "warm50": ["--stage-warmup", "50"],
    # combinations
    "a0.5+global": ["--alpha", "0.5", "--lr-schedule", "global"],
    "a0.5+steps1.25": ["--alpha", "0.5", "--vcycle-steps", "x1.25"],
    "a1.0+steps1.25": ["--alpha", "1.0", "--vcycle-steps", "x1.25"],
    # controls: the plain model trained for fewer steps (its own cosine)
    "baseline-0.7": ["--schedule", "baseline", "--steps", "x0.7"],
    "baseline-0.8": ["--schedule", "baseline", "--steps", "x0.8"],
}


def run(cmd: list[str], out: Path, threads: int) -> subprocess.Popen | None:
    if (out / "summary.json").exists():
        return None
    if out.exists():  # an unfinished run: start it again from nothing
        import shutil

        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = open(out.parent / f"{out.name}.log", "w")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    print(f"start {out.name}: {' '.join(cmd[2:])}", flush=True)
    return subprocess.Popen(cmd + ["-o", str(out)], stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=ROOT)


def run_all(jobs: list[tuple[list[str], Path]], parallel: int, threads: int) -> None:
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < parallel:
            cmd, out = pending.pop(0)
            p = run(cmd, out, threads)
            if p is not None:
                running.append((p, out, time.monotonic()))
        time.sleep(1)
        for item in list(running):
            p, out, t0 = item
            if p.poll() is not None:
                running.remove(item)
                status = "ok" if p.returncode == 0 else f"FAILED rc={p.returncode}"
                print(f"done  {out.name}: {status} in {time.monotonic() - t0:.0f}s", flush=True)


def _transition_loss(records: list[dict], phase: str, n: int = 20) -> float | None:
    """Mean training loss over the first ``n`` steps of the first stage of ``phase``."""
    stage = next((r for r in records if r["event"] == "stage" and r["phase"] == phase), None)
    if stage is None:
        return None
    losses = [r["loss"] for r in records if r["event"] == "train" and r["stage"] == stage["stage"]
              and r["step"] <= stage["step"] + n]
    return statistics.fmean(losses) if losses else None


def _level0_seconds_per_step(records: list[dict]) -> float | None:
    """Training seconds per step of level 0 inside the run (its last level-0 stage, first to
    last training record, so transitions and the first step are left out)."""
    last = max((r["stage"] for r in records if r["event"] == "train" and r["level"] == 0),
               default=None)
    tr = [r for r in records if r["event"] == "train" and r["stage"] == last]
    if len(tr) < 2:
        return None
    return (tr[-1]["wall"] - tr[0]["wall"]) / max(1, tr[-1]["step"] - tr[0]["step"])


def measure(out: Path, base: dict) -> dict:
    records = read_metrics(out / "metrics.jsonl")
    end = next(r for r in records if r["event"] == "end")
    evals = [r for r in records if r["event"] == "eval"]
    hit = reach(evals, base["loss"])
    sps = _level0_seconds_per_step(records)
    own_base_wall = sps * base["steps"] if sps else None
    return {
        "loss": end["val_loss"], "flops": end["flops"], "wall": end["wall"],
        "flops_reach": hit["flops"] if hit else None, "wall_reach": hit["wall"] if hit else None,
        "flops_saving": 1 - hit["flops"] / base["flops"] if hit else None,
        "wall_saving": 1 - hit["wall"] / base["wall"] if hit else None,
        "wall_saving_own": 1 - hit["wall"] / own_base_wall if hit and own_base_wall else None,
        "after_down": _transition_loss(records, "bottom"),
        "after_up": _transition_loss(records, "up"),
    }


def baseline_of(out: Path) -> dict:
    records = read_metrics(out / "metrics.jsonl")
    end = next(r for r in records if r["event"] == "end")
    return {"loss": end["val_loss"], "flops": end["flops"], "wall": end["wall"],
            "steps": end["step"]}


def _median(values, worst: float = float("inf")):
    """Median where None ("never reached") counts as ``worst``; None if the median is one."""
    m = statistics.median([worst if v is None else v for v in values])
    return None if m in (float("inf"), float("-inf")) else m


def _summary(ms: list[dict]) -> dict:
    low_is_bad = ("flops_saving", "wall_saving", "wall_saving_own")
    return {k: _median([m[k] for m in ms], float("-inf") if k in low_is_bad else float("inf"))
            for k in ms[0]}


def _fmt(v, spec, scale=1.0):
    return "never" if v is None else format(v * scale, spec)


def table(rows: list[tuple[str, int, dict]], base: dict) -> str:
    head = ("variant", "runs", "final val", "FLOPs", "wall s", "FLOPs to base", "FLOPs %",
            "wall to base", "wall %", "wall* %", "after down", "after up")
    out = [head]
    for name, n, m in rows:
        out.append((name, str(n), _fmt(m["loss"], ".4f"), _fmt(m["flops"], ".3e"),
                    _fmt(m["wall"], ".0f"), _fmt(m["flops_reach"], ".3e"),
                    _fmt(m["flops_saving"], ".1f", 100), _fmt(m["wall_reach"], ".0f"),
                    _fmt(m["wall_saving"], ".1f", 100), _fmt(m["wall_saving_own"], ".1f", 100),
                    _fmt(m["after_down"], ".3f"), _fmt(m["after_up"], ".3f")))
    widths = [max(len(r[i]) for r in out) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in out]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"baseline: final val loss {base['loss']:.4f}, {base['flops']:.3e} FLOPs, "
                 f"{base['wall']:.0f} s (median over seeds/repeats), {base['steps']} steps")
    return "\n".join(lines)


def _baseline_steps(preset_name: str, extra: list[str]) -> int:
    """The baseline's optimizer steps: ``--steps`` among the extra options, else the preset's."""
    for i, o in enumerate(extra):
        if o == "--steps" and i + 1 < len(extra):
            return int(extra[i + 1])
        if o.startswith("--steps="):
            return int(o.split("=", 1)[1])
    return preset(preset_name).steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/savings", help="study directory (runs are reused)")
    p.add_argument("--variants", default="default", help="comma-separated names (--list)")
    p.add_argument("--seeds", default="1337", help="comma-separated seeds")
    p.add_argument("--repeats", type=int, default=1, help="runs per variant and seed")
    p.add_argument("--baseline-repeats", type=int, default=1, help="baseline runs per seed")
    p.add_argument("--jobs", type=int, default=2, help="training processes at once")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--list", action="store_true", help="print the variants and exit")
    p.add_argument("extra", nargs="*", help="options for every run (after --), e.g. --steps 1600")
    a = p.parse_args(argv)
    if a.list:
        for name, opts in VARIANTS.items():
            print(f"{name:16s} {' '.join(opts)}")
        return 0
    names = [v for v in a.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; see --list")
    seeds = [int(s) for s in a.seeds.split(",")]
    root = Path(a.out)
    threads = max(1, (os.cpu_count() or 1) // a.jobs)
    train = [sys.executable, str(ROOT / "tools" / "train.py"), "--preset", a.preset, "--quiet",
             *a.extra]
    steps = _baseline_steps(a.preset, a.extra)
    jobs = []
    for seed in seeds:
        for r in range(a.baseline_repeats):
            jobs.append(([*train, "--seed", str(seed), "--schedule", "baseline"],
                         root / f"baseline-s{seed}-r{r}"))
    for name in names:
        opts = [str(round(float(o[1:]) * steps)) if re.fullmatch(r"x[0-9.]+", o) else o
                for o in VARIANTS[name]]
        schedule = [] if "--schedule" in opts else ["--schedule", "vcycle", "--log-every", "2"]
        for seed in seeds:
            for r in range(a.repeats):
                jobs.append(([*train, "--seed", str(seed), *schedule, *opts],
                             root / f"{name.replace('/', '_')}-s{seed}-r{r}"))
    print(f"{len(jobs)} runs, {a.jobs} at a time, OMP_NUM_THREADS={threads}", flush=True)
    run_all(jobs, a.jobs, threads)

    bases = {seed: [baseline_of(root / f"baseline-s{seed}-r{r}") for r in range(a.baseline_repeats)]
             for seed in seeds}
    base_med = {seed: {k: _median([b[k] for b in bs]) for k in bs[0]} for seed, bs in bases.items()}
    rows = []
    for name in names:
        ms = [measure(root / f"{name.replace('/', '_')}-s{seed}-r{r}", base_med[seed])
              for seed in seeds for r in range(a.repeats)]
        rows.append((name, len(ms), _summary(ms)))
        if len(ms) > 1:
            for seed in seeds:
                for r in range(a.repeats):
                    m = measure(root / f"{name.replace('/', '_')}-s{seed}-r{r}", base_med[seed])
                    rows.append((f"  s{seed} r{r}", 1, m))
    all_base = {k: _median([b[k] for bs in bases.values() for b in bs]) for k in base_med[seeds[0]]}
    (root / "table.json").write_text(json.dumps({"rows": rows, "baseline": base_med}, indent=1))
    print(table(rows, all_base))
    return 0


if __name__ == "__main__":
    sys.exit(main())
