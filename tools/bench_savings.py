"""Does the V-cycle save training compute? A frontier study against a tuned baseline.

Runs ``tools/train.py`` (this checkout's driver) as subprocesses, at most ``--jobs`` at a time
with ``OMP_NUM_THREADS = cores // jobs``; a run directory that already has ``summary.json`` is
reused, so an interrupted study continues where it stopped. Every run uses the options after
``--`` (e.g. ``--eval-batches 40``) on top of ``--preset``. The study, in order:

1. **baseline learning rate**: the baseline at 1x ``--steps`` for every ``--lrs`` value (min_lr =
   lr / 10, its own warm-up and full cosine) and seed; the best median final loss wins;
2. **frontier**: the baseline at every ``--budgets`` multiple of the steps with that lr, per seed;
   the frontier L(C) is piecewise linear in log C (``vcyclefx/driver/saving.py``);
3. **V-cycle rates**, for every variant in ``--tune`` on ``--tune-seeds``: level 0's peak lr over
   ``--vcycle-lr-factors`` x the baseline's (coarse scale fixed at the middle of
   ``--coarse-scales``), then the coarse level's lr scale over ``--coarse-scales`` at the best
   of those; the lowest final loss wins. Variants not in ``--tune`` use the first tuned one's;
4. every variant at its rates on every seed.

A run's **effective saving** is ``1 - C / C_frontier(L)`` against its own seed's frontier (same
initial weights, data order and validation batches), in FLOPs, and in wall seconds: ``wall`` uses
steady wall times (``vcyclefx.driver.saving.steady_wall``: per stage its steps x the median
seconds per step, plus capture and transitions as measured, so the load spikes of a shared
machine drop out) with the frontier priced at the run's own steady level-0 seconds per step, so
that sustained load, which differs between separate runs, cancels too; ``wall (base rate)``
prices it at that seed's baselines' steady seconds per step instead, and ``raw wall`` uses the
measured totals as they are. Outside the frontier's bracket the figure is extrapolated from the
nearest segment and marked ``~``. Also kept, labelled: the saving to reach the 1x baseline's final
loss (``reach 1x``), and, when reference variants (``small-alone+xF``, the coarse architecture
trained alone) are among ``--variants``, the **envelope saving** against the cheaper of the full
model's frontier and theirs at each run's loss (``vcyclefx.driver.saving.Envelope``), with tokens
per parameter. The table printed last gives medians over seeds and [min, max]; the study
directory gets ``table.json`` and ``frontier.png`` (loss against FLOPs and wall seconds).

    python tools/bench_savings.py --out runs/frontier --seeds 1337,4242,7 --jobs 1 \\
        --variants paper,id+a0.75+carry+x1.5 -- --eval-every 100 --eval-batches 40
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
from vcyclefx.driver.saving import (envelope_against, saving_against,  # noqa: E402
                                    steady_seconds_per_step, steady_wall)

# Every variant starts from the paper's recipe, spelled out so that a change of the driver's
# defaults does not change what a stored run means; a variant's options override it. A step
# count written "xF" is F times the baseline's steps.
PAPER = ["--depth-init", "copy", "--alpha", "0.25", "--no-carry-optimizer",
         "--fractions", "0.05,0.45,0.5", "--vcycle-steps", "x1", "--lr-schedule", "stage",
         "--stage-warmup", "0"]
ID = ["--depth-init", "identity"]
CARRY = ["--carry-optimizer"]
X15 = ["--vcycle-steps", "x1.5"]
VARIANTS: dict[str, list[str]] = {
    "paper": [],
    "paper+x1.5": X15,
    "carry+x1.5": [*CARRY, *X15],  # gradient-following AdamW moments through the transitions
    "id+x1.5": [*ID, *X15],  # function-preserving growth instead of block copies
    "id+a0.75+x1.5": [*ID, "--alpha", "0.75", *X15],
    "id+a0.5+carry+x1.5": [*ID, "--alpha", "0.5", *CARRY, *X15],
    "id+a0.75+carry+x1.5": [*ID, "--alpha", "0.75", *CARRY, *X15],
    "id+a0.9+carry+x1.5": [*ID, "--alpha", "0.9", *CARRY, *X15],
    "id+a1+carry+x1.5": [*ID, "--alpha", "1.0", *CARRY, *X15],
    # the V-cycle's step budget (its FLOPs are counted in full, so any budget is fair)
    "id+a0.75+carry": [*ID, "--alpha", "0.75", *CARRY],
    "id+a0.75+carry+x1.25": [*ID, "--alpha", "0.75", *CARRY, "--vcycle-steps", "x1.25"],
    "id+a0.75+carry+x2": [*ID, "--alpha", "0.75", *CARRY, "--vcycle-steps", "x2"],
    # share of the steps per stage (down, bottom, up)
    "id+a0.75+carry+x1.5+f.05/.30/.65": [*ID, "--alpha", "0.75", *CARRY, *X15,
                                         "--fractions", "0.05,0.3,0.65"],
    "id+a0.75+carry+x1.5+f.05/.60/.35": [*ID, "--alpha", "0.75", *CARRY, *X15,
                                         "--fractions", "0.05,0.6,0.35"],
    "id+a0.75+carry+x1.5+f.15/.45/.40": [*ID, "--alpha", "0.75", *CARRY, *X15,
                                         "--fractions", "0.15,0.45,0.4"],
    # learning-rate envelope of the later stages
    "id+a0.75+carry+x1.5+warm50": [*ID, "--alpha", "0.75", *CARRY, *X15, "--stage-warmup", "50"],
    "id+a0.75+carry+x1.5+global": [*ID, "--alpha", "0.75", *CARRY, *X15,
                                   "--lr-schedule", "global"],
    # combinations of the levers that paid alone (more coarse steps, one lr envelope)
    "id+a0.75+carry+x1.5+f.05/.60/.35+global": [*ID, "--alpha", "0.75", *CARRY, *X15,
                                                "--fractions", "0.05,0.6,0.35",
                                                "--lr-schedule", "global"],
    "id+a0.75+carry+x1.5+f.05/.70/.25": [*ID, "--alpha", "0.75", *CARRY, *X15,
                                         "--fractions", "0.05,0.7,0.25"],
    "id+a0.75+carry+x1.5+f.05/.70/.25+global": [*ID, "--alpha", "0.75", *CARRY, *X15,
                                                "--fractions", "0.05,0.7,0.25",
                                                "--lr-schedule", "global"],
    "id+a0.75+carry+x1.5+f.05/.80/.15+global": [*ID, "--alpha", "0.75", *CARRY, *X15,
                                                "--fractions", "0.05,0.8,0.15",
                                                "--lr-schedule", "global"],
    "id+a0.75+carry+x1.5+f.05/.90/.05+global": [*ID, "--alpha", "0.75", *CARRY, *X15,
                                                "--fractions", "0.05,0.9,0.05",
                                                "--lr-schedule", "global"],
    "id+a0.75+carry+x2+f.05/.80/.15+global": [*ID, "--alpha", "0.75", *CARRY,
                                              "--vcycle-steps", "x2", "--fractions",
                                              "0.05,0.8,0.15", "--lr-schedule", "global"],
    "id+a0.75+carry+x2+f.05/.60/.35+global": [*ID, "--alpha", "0.75", *CARRY,
                                              "--vcycle-steps", "x2", "--fractions",
                                              "0.05,0.6,0.35", "--lr-schedule", "global"],
    "id+a1+carry+x1.5+f.05/.90/.05+global": [*ID, "--alpha", "1.0", *CARRY, *X15,
                                             "--fractions", "0.05,0.9,0.05",
                                             "--lr-schedule", "global"],
    "id+a0.75+carry+f.05/.90/.05+global": [*ID, "--alpha", "0.75", *CARRY, "--fractions",
                                           "0.05,0.9,0.05", "--lr-schedule", "global"],
    "id+a0.75+carry+x2+f.05/.90/.05+global": [*ID, "--alpha", "0.75", *CARRY,
                                              "--vcycle-steps", "x2", "--fractions",
                                              "0.05,0.9,0.05", "--lr-schedule", "global"],
    # three levels (the coarsest 1 block x 32 wide), most steps at the bottom
    "3lvl+id+a0.75+carry+x1.5+f.05/.05/.80/.05/.05+global": [
        *ID, "--alpha", "0.75", *CARRY, *X15, "--levels", "3",
        "--fractions", "0.05,0.05,0.8,0.05,0.05", "--lr-schedule", "global"],
    # a reference, not a V-cycle: the coarse level's architecture (2 blocks x 64 wide, 2 heads)
    # trained alone from scratch; it ends with the smaller model, so it answers "would training
    # a smaller model have done as well?"
    "small-alone+x1.5": ["--schedule", "baseline", "--n-layer", "2", "--n-head", "2",
                         "--n-embd", "64", "--steps", "x1.5"],
    "small-alone+x3": ["--schedule", "baseline", "--n-layer", "2", "--n-head", "2",
                       "--n-embd", "64", "--steps", "x3"],
    # which dimension the coarse level shrinks
    "id+a0.75+carry+x1.5+d-only": [*ID, "--alpha", "0.75", *CARRY, *X15, "--width", "1.0"],
    "id+a0.75+carry+x1.5+w-only": [*ID, "--alpha", "0.75", *CARRY, *X15, "--depth", "1.0"],
}


# ----------------------------------------------------------------------------- running


def start(cmd: list[str], out: Path, threads: int) -> subprocess.Popen | None:
    if (out / "summary.json").exists():
        return None
    if out.exists():  # an unfinished run: start it again from nothing
        import shutil

        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = open(out.parent / f"{out.name}.log", "w")
    # the child imports this checkout's vcyclefx (tools/train.py puts ROOT first on sys.path)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    print(f"start {out.name}: {' '.join(cmd[2:])}", flush=True)
    return subprocess.Popen(cmd + ["-o", str(out)], stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=ROOT)


def run_all(jobs: list[tuple[list[str], Path]], parallel: int, threads: int) -> None:
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < parallel:
            cmd, out = pending.pop(0)
            p = start(cmd, out, threads)
            if p is not None:
                running.append((p, out, time.monotonic()))
        time.sleep(1)
        for item in list(running):
            p, out, t0 = item
            if p.poll() is not None:
                running.remove(item)
                status = "ok" if p.returncode == 0 else f"FAILED rc={p.returncode}"
                print(f"done  {out.name}: {status} in {time.monotonic() - t0:.0f}s", flush=True)


# ----------------------------------------------------------------------------- measuring


def _after(records: list[dict], phase: str, n: int = 20) -> float | None:
    """Mean training loss over the first ``n`` steps of the first stage of ``phase``."""
    stage = next((r for r in records if r["event"] == "stage" and r["phase"] == phase), None)
    if stage is None:
        return None
    losses = [r["loss"] for r in records if r["event"] == "train" and r["stage"] == stage["stage"]
              and r["step"] <= stage["step"] + n]
    return statistics.fmean(losses) if losses else None


def result(out: Path) -> dict:
    """Final loss, FLOPs, wall, steps and level-0 seconds per step of one finished run."""
    records = read_metrics(out / "metrics.jsonl")
    end = next(r for r in records if r["event"] == "end")
    params = next((r["params"] for r in records if r["event"] == "stage" and r["level"] == 0), None)
    return {"loss": end["val_loss"], "flops": end["flops"], "raw_wall": end["wall"],
            "tokens": end["tokens"], "params": params,
            "wall": steady_wall(records, end["schedule"]), "steps": end["step"],
            "level0_sps": steady_seconds_per_step(records, end["schedule"], 0),
            "after_down": _after(records, "bottom"), "after_up": _after(records, "up"),
            "evals": [r for r in records if r["event"] == "eval"]}


def score(run: dict, frontier: list[dict], base_1x: dict) -> dict:
    """The effective savings of ``run`` on its seed's ``frontier`` (module docstring)."""
    eff = saving_against(frontier, dict(flops=run["flops"], wall=run["wall"], loss=run["loss"]))
    raw = saving_against([dict(b, wall=b["raw_wall"]) for b in frontier],
                         dict(flops=run["flops"], wall=run["raw_wall"], loss=run["loss"]))
    own = saving_against(frontier, dict(flops=run["flops"], wall=run["wall"], loss=run["loss"]),
                         seconds_per_step=run["level0_sps"])
    hit = reach(run["evals"], base_1x["loss"])
    return {"flops_saving": eff["flops"], "wall_saving": own["wall"],
            "base_rate_wall_saving": eff["wall"],
            "raw_wall_saving": raw["wall"], "extrapolated": bool(eff["flops_extrapolated"]),
            "reach_flops_saving": 1 - hit["flops"] / base_1x["flops"] if hit else None}


def spread(values) -> tuple[float | None, float | None, float | None]:
    """(median, min, max) of the values that are not None."""
    vs = [v for v in values if v is not None]
    if not vs:
        return None, None, None
    return statistics.median(vs), min(vs), max(vs)


# ----------------------------------------------------------------------------- the study


class Study:
    def __init__(self, a: argparse.Namespace):
        self.a, self.root = a, Path(a.out)
        self.seeds = [int(s) for s in a.seeds.split(",")]
        self.tune_seeds = ([int(s) for s in a.tune_seeds.split(",")] if a.tune_seeds
                           else self.seeds[:1])
        self.steps = _baseline_steps(a.preset, a.extra)
        self.threads = max(1, (os.cpu_count() or 1) // a.jobs)
        self.train = [sys.executable, str(ROOT / "tools" / "train.py"), "--preset", a.preset,
                      "--quiet", *a.extra]

    def run(self, jobs) -> None:
        run_all(jobs, self.a.jobs, self.threads)

    @staticmethod
    def _rates(lr: float) -> list[str]:
        return ["--lr", f"{lr:g}", "--min-lr", f"{lr / 10:g}"]

    def baseline(self, lr: float, budget: float, seed: int) -> tuple[list[str], Path]:
        cmd = [*self.train, "--seed", str(seed), "--schedule", "baseline", *self._rates(lr),
               "--steps", str(round(budget * self.steps))]
        return cmd, self.root / f"base-lr{lr:g}-x{budget:g}-s{seed}"

    def vcycle(self, name: str, lr: float, scale: float, seed: int) -> tuple[list[str], Path]:
        opts = [str(round(float(o[1:]) * self.steps)) if re.fullmatch(r"x[0-9.]+", o) else o
                for o in [*PAPER, *VARIANTS[name]]]
        levels = int(opts[opts.index("--levels") + 1]) if "--levels" in opts else 2
        cmd = [*self.train, "--seed", str(seed), "--schedule", "vcycle", "--log-every", "2",
               "--steps", str(self.steps), *opts, *self._rates(lr),
               "--lr-scales", ",".join(["1"] + [f"{scale:g}"] * (levels - 1))]
        return cmd, self.root / f"{name.replace('/', '_')}-lr{lr:g}-c{scale:g}-s{seed}"

    def best_lr(self) -> tuple[float, dict]:
        lrs = [float(x) for x in self.a.lrs.split(",")]
        self.run([self.baseline(lr, 1.0, s) for s in self.seeds for lr in lrs])
        losses = {lr: [result(self.baseline(lr, 1.0, s)[1])["loss"] for s in self.seeds]
                  for lr in lrs}
        return min(lrs, key=lambda lr: statistics.median(losses[lr])), losses

    def frontiers(self, lr: float) -> dict[int, list[dict]]:
        budgets = [float(x) for x in self.a.budgets.split(",")]
        self.run([self.baseline(lr, b, s) for s in self.seeds for b in budgets])
        return {s: [dict(result(self.baseline(lr, b, s)[1]), budget=b) for b in budgets]
                for s in self.seeds}

    def tune(self, name: str, base_lr: float) -> tuple[float, float, list[tuple]]:
        """Coordinate search: level-0 lr at the middle coarse scale, then the coarse scale."""
        scales = [float(x) for x in self.a.coarse_scales.split(",")]
        factors = [float(x) for x in self.a.vcycle_lr_factors.split(",")]
        mid = scales[len(scales) // 2]
        tried: list[tuple] = []

        def loss(lr, scale):
            self.run([self.vcycle(name, lr, scale, s) for s in self.tune_seeds])
            value = statistics.median(result(self.vcycle(name, lr, scale, s)[1])["loss"]
                                      for s in self.tune_seeds)
            if (name, lr, scale, value) not in tried:
                tried.append((name, lr, scale, value))
            return value

        lr = min((base_lr * f for f in factors), key=lambda x: loss(x, mid))
        scale = min(scales, key=lambda c: loss(lr, c))
        return lr, scale, tried


def _is_reference(name: str) -> bool:
    """A variant that trains one model (``--schedule baseline``), not a V-cycle."""
    return "--schedule" in VARIANTS[name]


def _baseline_steps(preset_name: str, extra: list[str]) -> int:
    """The baseline's optimizer steps: ``--steps`` among the extra options, else the preset's."""
    for i, o in enumerate(extra):
        if o == "--steps" and i + 1 < len(extra):
            return int(extra[i + 1])
        if o.startswith("--steps="):
            return int(o.split("=", 1)[1])
    return preset(preset_name).steps


# ----------------------------------------------------------------------------- reporting


def _pct(v, extrapolated=False) -> str:
    return "-" if v is None else f"{100 * v:.1f}%" + ("~" if extrapolated else "")


def _range(m, lo, hi, fmt) -> str:
    if m is None:
        return "-"
    return f"{fmt(m)} [{fmt(lo)}, {fmt(hi)}]" if lo != hi else fmt(m)


def _grid(head, rows) -> list[str]:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def report(data: dict) -> str:
    loss = lambda v: f"{v:.4f}"  # noqa: E731
    pct = lambda v: _pct(v)  # noqa: E731
    out = [f"baseline peak lr at 1x ({data['steps']} steps), final val loss over seeds "
           f"{data['seeds']}:"]
    out += _grid(("lr", "median [min, max]"),
                 [(f"{lr:g}" + (" (best)" if lr == data["lr"] else ""), _range(*spread(v), loss))
                  for lr, v in data["lr_tuning"]])
    out.append(f"\nfrontier at lr {data['lr']:g} (min_lr lr/10):")
    out += _grid(("budget", "steps", "final val loss", "FLOPs", "steady wall s", "s/step"),
                 [(f"{b['budget']:g}x", b["steps"], _range(*b["loss"], loss), f"{b['flops']:.3e}",
                   f"{b['wall']:.0f}", f"{b['sps']:.4f}") for b in data["frontier"]])
    out.append(f"\nV-cycle rates tuned on seeds {data['tune_seeds']} (lr of level 0, coarse scale):")
    out += _grid(("variant", "lr", "coarse x", "final val loss"),
                 [(n, f"{lr:g}", f"{c:g}", loss(v)) for n, lr, c, v in data["vcycle_tuning"]])
    out.append("\neffective saving against each seed's frontier, median [min, max] over seeds "
               "(~ = some seeds extrapolated beyond the frontier; wall: steady wall "
               "seconds, the frontier priced at the run's own level-0 s/step, a reference's at "
               "the baselines'; base rate: at the baselines' s/step; raw: measured totals; "
               "reach 1x = the older figure, FLOPs to the 1x baseline's loss):")
    rows = []
    for v in data["variants"]:
        rows.append((v["name"], f"{v['lr']:g}", f"{v['scale']:g}", v["runs"],
                     _range(*v["loss"], loss), f"{v['flops']:.3e}",
                     "-" if v.get("tokens_per_param") is None else f"{v['tokens_per_param']:.1f}",
                     _range(*v["flops_saving"], pct) + ("~" if v["extrapolated"] else ""),
                     _range(*v.get("envelope_saving", (None, None, None)), pct),
                     _range(*v["wall_saving"], pct), _range(*v["base_rate_wall_saving"], pct),
                     _range(*v["raw_wall_saving"], pct),
                     _range(*v["reach_flops_saving"], pct),
                     "-" if v["after_up"] is None else f"{v['after_up']:.3f}"))
    out += _grid(("variant", "lr", "coarse x", "runs", "final val loss", "FLOPs", "tokens/param",
                  "FLOPs saving", "envelope saving", "wall saving", "wall (base rate)", "raw wall", "reach 1x", "after up"), rows)
    return "\n".join(out)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key, label in zip(axes, ("flops", "wall"), ("training FLOPs", "training wall s")):
        f = data["frontier"]
        ax.errorbar([b[key] for b in f], [b["loss"][0] for b in f],
                    yerr=[[b["loss"][0] - b["loss"][1] for b in f],
                          [b["loss"][2] - b["loss"][0] for b in f]],
                    fmt="s-", color="black", capsize=3, label=f"baseline frontier (lr {data['lr']:g})")
        for b in f:
            ax.annotate(f"{b['budget']:g}x", (b[key], b["loss"][0]), fontsize=8,
                        textcoords="offset points", xytext=(4, 4))
        for v in data["variants"]:
            m, lo, hi = v["loss"]
            ax.errorbar([v[key]], [m], yerr=[[m - lo], [hi - m]], fmt="o", capsize=3,
                        label=f"{v['name']} ({_pct(v['flops_saving'][0])} FLOPs)")
        ax.set_xscale("log")
        ax.set_xlabel(label + " (log)")
        ax.set_ylabel("final validation loss (median, range over seeds)")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/frontier", help="study directory (runs are reused)")
    p.add_argument("--variants", default="paper", help="comma-separated names (--list)")
    p.add_argument("--tune", default=None,
                   help="variants whose V-cycle rates are tuned (default: all of --variants)")
    p.add_argument("--seeds", default="1337,4242,7", help="comma-separated seeds")
    p.add_argument("--tune-seeds", default="", help="seeds of the V-cycle rate search "
                                                    "(default: the first seed)")
    p.add_argument("--lrs", default="0.002,0.004,0.008", help="baseline peak lrs tried at 1x")
    p.add_argument("--budgets", default="0.5,0.75,1,1.5", help="frontier budgets (x --steps)")
    p.add_argument("--vcycle-lr-factors", default="0.5,1,2",
                   help="level-0 lrs of the V-cycle tried, x the tuned baseline lr")
    p.add_argument("--coarse-scales", default="1,2,4", help="coarse-level lr scales tried")
    p.add_argument("--jobs", type=int, default=1, help="training processes at once")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--list", action="store_true", help="print the variants and exit")
    p.add_argument("extra", nargs="*", help="options for every run (after --)")
    a = p.parse_args(argv)
    if a.list:
        print(f"{'(every variant)':28s} {' '.join(PAPER)}")
        for name, opts in VARIANTS.items():
            print(f"{name:28s} {' '.join(opts)}")
        return 0
    names = [v for v in a.variants.split(",") if v]
    tune = names if a.tune is None else [v for v in a.tune.split(",") if v]
    unknown = [v for v in names + tune if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; see --list")
    st = Study(a)
    lr, lr_losses = st.best_lr()
    fronts = st.frontiers(lr)
    rates, tried = {}, []
    for name in [n for n in tune if n in names]:
        got = st.tune(name, lr)
        rates[name] = got[:2]
        tried += got[2]
    scales = [float(x) for x in a.coarse_scales.split(",")]
    first = next(iter(rates.values())) if rates else (lr, scales[len(scales) // 2])
    st.run([st.vcycle(n, *rates.get(n, first), s) for n in names for s in st.seeds])

    base_1x = {s: next(b for b in fronts[s] if b["budget"] == 1.0) for s in st.seeds}
    # the envelope: the full model's frontier and the coarse architecture alone (the reference
    # variants, "small-alone+xF", at their own tuned lr), per seed
    alone = {s: [result(st.vcycle(n, *rates.get(n, first), s)[1]) for n in names
                 if _is_reference(n)] for s in st.seeds}
    variants = []
    for name in names:
        vlr, scale = rates.get(name, first)
        runs = {s: result(st.vcycle(name, vlr, scale, s)[1]) for s in st.seeds}
        scores = {s: score(runs[s], fronts[s], base_1x[s]) for s in st.seeds}
        for s, sc in scores.items():
            sizes = {"full": fronts[s], **({"coarse": alone[s]} if alone[s] else {})}
            sc["envelope_saving"] = envelope_against(sizes, runs[s])["flops"]
        tpp = [r["tokens"] / r["params"] for r in runs.values() if r.get("params")]
        if _is_reference(name):  # its own s/step is the smaller model's: price at the baselines'
            for sc in scores.values():
                sc["wall_saving"] = sc["base_rate_wall_saving"]
        variants.append({
            "name": name, "lr": vlr, "scale": scale, "runs": len(runs),
            "loss": spread(r["loss"] for r in runs.values()),
            "flops": statistics.median(r["flops"] for r in runs.values()),
            "wall": statistics.median(r["wall"] for r in runs.values()),
            "after_up": spread(r["after_up"] for r in runs.values())[0],
            "tokens_per_param": statistics.median(tpp) if tpp else None,
            "extrapolated": any(sc["extrapolated"] for sc in scores.values()),
            **{k: spread(sc[k] for sc in scores.values())
               for k in ("flops_saving", "wall_saving", "base_rate_wall_saving",
                         "raw_wall_saving", "reach_flops_saving", "envelope_saving")},
            "per_seed": {s: {**{k: v for k, v in runs[s].items() if k != "evals"}, **scores[s]}
                         for s in st.seeds},
        })
    budgets = sorted({b["budget"] for bs in fronts.values() for b in bs})
    frontier = []
    for b in budgets:
        pts = [x for s in st.seeds for x in fronts[s] if x["budget"] == b]
        frontier.append({"budget": b, "steps": pts[0]["steps"],
                         "loss": spread(x["loss"] for x in pts),
                         "flops": statistics.median(x["flops"] for x in pts),
                         "wall": statistics.median(x["wall"] for x in pts),
                         "sps": statistics.median(x["wall"] / x["steps"] for x in pts)})
    data = {"steps": st.steps, "seeds": st.seeds, "tune_seeds": st.tune_seeds, "lr": lr,
            "lr_tuning": [[k, v] for k, v in lr_losses.items()], "frontier": frontier, "vcycle_tuning": tried,
            "variants": variants, "extra": a.extra, "preset": a.preset}
    st.root.mkdir(parents=True, exist_ok=True)
    (st.root / "table.json").write_text(json.dumps(data, indent=1, default=str))
    plot(data, st.root / "frontier.png")
    print(report(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
