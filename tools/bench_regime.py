"""Where does the V-cycle pay? A regime map: savings against the same-size frontier and the
envelope, against tokens per parameter.

For every ``--tpp`` (tokens per parameter of the full model's 1x baseline) and seed, this runs
``tools/train.py`` (this checkout's driver) as subprocesses, at most ``--jobs`` at a time, one
thread each (``OMP_NUM_THREADS=--threads``):

1. for every seed, the full model at every ``--budgets`` multiple of the regime's steps S for
   every ``--lrs``, and the coarse level's architecture alone at every ``--coarse-budgets``
   multiple for every ``--coarse-lrs``: each budget of each seed keeps its own best lr (the
   recipes run at the first seed's 1x lr, untuned per seed: the baselines are favoured);
2. the full model at every ``--budgets`` multiple of S, the coarse
   architecture alone at every ``--coarse-budgets`` multiple (its steps are cheaper), and every
   fixed recipe in ``--recipes`` (``--steps S``, the driver's V-cycle options of the recipe);
3. recipes that read the full model's frontier (``--grow-when slope``), from step 2's baselines.

``--sizes`` adds more architectures trained alone (``1x32x2``: 1 layer, width 32, 2 heads; at
``--coarse-budgets`` with ``--coarse-lrs``, each budget's lr tuned per seed) to every envelope:
a depth-only or three-level recipe's coarse architectures are sizes a user could train too.
``--recipes`` also takes ``full-wsd``, the full model alone at the V-cycle's 1.5 S steps with
``--lr-schedule wsd`` (does the schedule alone move the frontier?).

Every finished run leaves ``<name>.json`` (its final loss, FLOPs, tokens, parameters); a run
with one is never run again, so a killed study resumes where it stopped (a run killed midway
starts again from nothing). Each recipe run is scored against its own seed's frontiers: the
**same-size** saving ``1 - C / C_full(L)`` and the **envelope** saving ``1 - C / C_env(L)``,
C_env the cheapest of the full and the coarse architecture at loss L
(``vcyclefx.driver.saving.Envelope``; ``~`` = extrapolated beyond every measured bracket). The
table is printed last; ``NAME.json`` and ``NAME.png`` (both savings against tokens per
parameter) go to ``--out`` (``--name``, default ``regime``); ``--merge A.json B.json ...`` makes
one table and plot of studies run with different options per regime.

    python tools/bench_regime.py --out runs/regime --tpp 25 --seeds 1337 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vcyclefx.driver.logger import read_metrics  # noqa: E402
from vcyclefx.driver.saving import envelope_against, saving_against  # noqa: E402

# recipes: V-cycle options on top of the driver's defaults (``--steps S``, V-cycle 1.5 S)
RECIPES: dict[str, list[str]] = {
    "defaults": ["--fractions", "0.05,0.90,0.05"],  # the driver's defaults below 20 tokens/param
    "f.02/.08/.90": ["--fractions", "0.02,0.08,0.90"],
    "f.05/.20/.75": ["--fractions", "0.05,0.20,0.75"],
    "f.05/.45/.50": ["--fractions", "0.05,0.45,0.50"],
    # grow when the coarse level's loss falls more slowly per FLOP than the full frontier's
    # (cap: 45% of the steps at the coarse level)
    "slope": ["--fractions", "0.02,0.45,0.53", "--grow-when", "slope"],
    "slope-cap20": ["--fractions", "0.02,0.20,0.78", "--grow-when", "slope"],
    # levers (issue 26, item 3): a shorter coarse phase (G_stack spends 1-3% small), smaller
    # growth factors (width only, depth only), a re-warm-up of the learning rate at growth
    "f.01/.04/.95": ["--fractions", "0.01,0.04,0.95"],
    "width-only": ["--depth", "1", "--fractions", "0.02,0.08,0.90"],
    "depth-only": ["--width", "1", "--fractions", "0.02,0.08,0.90"],
    "rewarm": ["--fractions", "0.02,0.08,0.90", "--stage-warmup", "25"],
    # the learning rate at growth: staged training's same-loss rule (reads the full frontier),
    # on the short coarse phase and on a long one (where the rule moves the lr most); and a
    # warm-up-stable-decay schedule over the V-cycle in place of the cosine
    "same-loss": ["--fractions", "0.02,0.08,0.90", "--lr-at-growth", "same-loss"],
    "same-loss-f.05/.45/.50": ["--fractions", "0.05,0.45,0.50", "--lr-at-growth", "same-loss"],
    "wsd": ["--fractions", "0.02,0.08,0.90", "--lr-schedule", "wsd"],
    # stacking with strided depth pairing (blocks i and i + n/2; needs 4 or more layers)
    "strided": ["--fractions", "0.02,0.08,0.90", "--depth-pairing", "strided"],
    # three levels, depth only (growth in two steps of x2 in depth: 1/4 depth -> 1/2 -> full)
    "3-levels-depth": ["--levels", "3", "--width", "1",
                       "--fractions", "0.01,0.01,0.04,0.04,0.90"],
    # three levels, depth then width (1/2 depth -> 1/2 width and depth -> ... ; 2 x parameters
    # per step at most): the same factors at each level
    "3-levels": ["--levels", "3", "--fractions", "0.01,0.01,0.04,0.04,0.90"],
    # the interpolation weight of the de-coalesced model (default 0.75) and the moments carried
    # through the transitions (default) against a fresh optimizer per stage
    "alpha.5": ["--fractions", "0.02,0.08,0.90", "--alpha", "0.5"],
    "alpha.9": ["--fractions", "0.02,0.08,0.90", "--alpha", "0.9"],
    "fresh-moments": ["--fractions", "0.02,0.08,0.90", "--no-carry-optimizer"],
}

# single-model runs beside the recipes, at the V-cycle's 1.5 S steps: the full model with the
# wsd schedule (does the schedule alone move the frontier?)
BASELINE_RECIPES: dict[str, list[str]] = {"full-wsd": ["--lr-schedule", "wsd"]}

# the two reuse cases (issue 26, item 2), each a V-cycle whose stages have their own warm-up and
# full cosine (``--lr-schedule stage``), so that the model handed over is a trained, decayed one:
#   reuse-grow:   1 step at full size, the coarse level for COARSE_X x S steps (a trained small
#                 model), identity growth, the full size for S steps; scored on the full model's
#                 frontier, with the small model's FLOPs counted and not counted;
#   reuse-shrink: the full size for S steps (a trained full model), coalesced, the coarse level
#                 for S steps, 1 step back at full size (unused); scored at the end of the coarse
#                 stage on the coarse architecture's frontier, with the full model's FLOPs counted
#                 and not counted.
REUSE = ("reuse-grow", "reuse-shrink")
REUSE_OPTIONS = ["--lr-schedule", "stage", "--stage-warmup", "50"]
COARSE_X = 3.0


def model_options(a) -> list[str]:
    return ["--n-layer", str(a.n_layer), "--n-head", str(a.n_head), "--n-embd", str(a.n_embd)]


def coarse_options(a) -> list[str]:
    """The coarse level's architecture (width and depth halved, heads with the width)."""
    return ["--n-layer", str(max(1, a.n_layer // 2)), "--n-head", str(max(1, a.n_head // 2)),
            "--n-embd", str(a.n_embd // 2)]


def parse_size(text: str) -> tuple[str, list[str]]:
    """``--sizes`` entry ``LxE`` or ``LxExH`` (layers, width, heads; heads default 1 per 16 of
    width, at least 1): its key and the driver's model options."""
    try:
        parts = [int(x) for x in text.lower().split("x")]
        n_layer, n_embd = parts[0], parts[1]
        n_head = parts[2] if len(parts) > 2 else max(1, n_embd // 16)
        if len(parts) > 3 or min(parts) < 1 or n_embd % n_head:
            raise ValueError
    except (ValueError, IndexError):
        raise SystemExit(f"--sizes {text!r}: give LAYERSxWIDTH or LAYERSxWIDTHxHEADS, e.g. 1x32x2 "
                         "(the width a multiple of the heads)") from None
    return f"{n_layer}x{n_embd}", ["--n-layer", str(n_layer), "--n-head", str(n_head),
                                   "--n-embd", str(n_embd)]


def reads_frontier(name: str) -> bool:
    """Whether the recipe reads its seed's full frontier (``--grow-frontier``)."""
    opts = RECIPES.get(name, [])
    return "--grow-when" in opts or "--lr-at-growth" in opts


def full_params(a) -> int:
    from vcyclefx.zoo.gpt import GPT, GPTConfig

    m = GPT(GPTConfig(block_size=a.seq_len, vocab_size=256, n_layer=a.n_layer, n_head=a.n_head,
                      n_embd=a.n_embd, dropout=0.0, bias=True))
    return sum(p.numel() for p in m.parameters())


# ----------------------------------------------------------------------------- running


def result(out: Path) -> dict:
    """What the study keeps of a finished run (``metrics.jsonl``)."""
    records = read_metrics(out / "metrics.jsonl")
    end = next(r for r in records if r["event"] == "end")
    stages = [r for r in records if r["event"] == "stage"]
    params0 = next((s["params"] for s in stages if s["level"] == 0), stages[0]["params"])
    evals = [r for r in records if r["event"] == "eval"]
    bounds = [{"stage": s["stage"], "level": s["level"], "flops_start": s["flops"],
               "flops_end": (stages[i + 1]["flops"] if i + 1 < len(stages) else end["flops"]),
               "val_loss_end": next((e["val_loss"] for e in reversed(evals)
                                     if e["stage"] == s["stage"]), None)}
              for i, s in enumerate(stages)]
    return {"loss": end["val_loss"], "flops": end["flops"], "steps": end["step"],
            "stage_ends": bounds,
            "tokens": end["tokens"], "params": params0, "wall": end["wall"],
            "tokens_per_param": end["tokens"] / params0,
            "stages": [{k: s.get(k) for k in ("level", "phase", "step", "steps", "params")}
                       for s in stages],
            "grow": next((r for r in records if r["event"] == "grow"), None)}


class Runner:
    """Runs training subprocesses, ``jobs`` at a time; a run with ``<name>.json`` is done."""

    def __init__(self, root: Path, jobs: int, threads: int, common: list[str],
                 dry: bool = False):
        self.root, self.jobs, self.threads, self.common = root, jobs, threads, common
        self.dry = dry  # report what is finished, start nothing

    def done(self, name: str) -> dict | None:
        path = self.root / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def _start(self, name: str, opts: list[str]) -> subprocess.Popen | None:
        out = self.root / name
        if out.exists():  # killed midway: start again from nothing
            shutil.rmtree(out)
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / f"{name}.log", "w")
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads),
                   MKL_NUM_THREADS=str(self.threads))
        cmd = [sys.executable, str(ROOT / "tools" / "train.py"), "--quiet", *self.common, *opts,
               "-o", str(out)]
        print(f"start {name}: {' '.join(opts)}", flush=True)
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    def run(self, runs: dict[str, list[str]]) -> dict[str, dict | None]:
        pending = [] if self.dry else [(n, o) for n, o in runs.items() if self.done(n) is None]
        running: list[tuple[str, subprocess.Popen, float]] = []
        while pending or running:
            while pending and len(running) < self.jobs:
                name, opts = pending.pop(0)
                running.append((name, self._start(name, opts), time.monotonic()))
            time.sleep(1)
            for item in list(running):
                name, p, t0 = item
                if p.poll() is None:
                    continue
                running.remove(item)
                if p.returncode == 0:
                    got = result(self.root / name)
                    (self.root / f"{name}.json").write_text(json.dumps(got, indent=1))
                    print(f"done  {name}: loss {got['loss']:.4f}, {got['flops']:.3e} FLOPs, "
                          f"{got['tokens_per_param']:.1f} tokens/param, "
                          f"{time.monotonic() - t0:.0f}s", flush=True)
                    shutil.rmtree(self.root / name, ignore_errors=True)  # keep the JSON only
                else:
                    print(f"done  {name}: FAILED rc={p.returncode} "
                          f"(see {self.root / name}.log)", flush=True)
        return {n: self.done(n) for n in runs}


# ----------------------------------------------------------------------------- the study


def rates(lr: float) -> list[str]:
    return ["--lr", f"{lr:g}", "--min-lr", f"{lr / 10:g}"]


def study(a, runner: Runner) -> dict:
    params = full_params(a)
    tps = a.batch_size * a.seq_len
    seeds = [int(s) for s in a.seeds.split(",")]
    lrs = [float(x) for x in a.lrs.split(",")]
    clrs = [float(x) for x in a.coarse_lrs.split(",")]
    budgets = [float(x) for x in a.budgets.split(",")]
    cbudgets = [float(x) for x in a.coarse_budgets.split(",")]
    recipes = [r for r in a.recipes.split(",") if r]
    full, coarse = model_options(a), coarse_options(a)
    sizes = [parse_size(x) for x in a.sizes.split(",") if x]
    out: dict = {"params": params, "tokens_per_step": tps, "regimes": []}
    for tpp in [float(x) for x in a.tpp.split(",")]:
        S = max(1, round(tpp * params / tps))
        tag = f"t{tpp:g}"

        def base(lr, b, s):
            return (f"{tag}-s{s}-full-lr{lr:g}-x{b:g}",
                    [*full, "--schedule", "baseline", "--seed", str(s), *rates(lr),
                     "--steps", str(max(1, round(b * S)))])

        def alone(lr, b, s):
            return (f"{tag}-s{s}-coarse-lr{lr:g}-x{b:g}",
                    [*coarse, "--schedule", "baseline", "--seed", str(s), *rates(lr),
                     "--steps", str(max(1, round(b * S)))])

        def sized(key, opts, lr, b, s):
            return (f"{tag}-s{s}-{key}-lr{lr:g}-x{b:g}",
                    [*opts, "--schedule", "baseline", "--seed", str(s), *rates(lr),
                     "--steps", str(max(1, round(b * S)))])

        def recipe(name, lr, s, extra=()):
            if name in BASELINE_RECIPES:
                return (f"{tag}-s{s}-{name}",
                        [*full, "--schedule", "baseline", "--seed", str(s), *rates(lr),
                         "--steps", str(round(1.5 * S)), *BASELINE_RECIPES[name]])
            return (f"{tag}-s{s}-{name.replace('/', '_')}",
                    [*full, "--schedule", "vcycle", "--seed", str(s), *rates(lr),
                     "--steps", str(S), "--eval-every", str(a.vcycle_eval_every),
                     *RECIPES[name], *extra])

        def reuse(name, lr, s):
            handed = max(1, round(COARSE_X * S)) if name == "reuse-grow" else S
            steps = [1, handed, S] if name == "reuse-grow" else [S, S, 1]
            total = sum(steps)
            return (f"{tag}-s{s}-{name}",
                    [*full, "--schedule", "vcycle", "--seed", str(s), *rates(lr), "--steps", str(S),
                     "--vcycle-steps", str(total),
                     "--fractions", ",".join(f"{x / total:.12g}" for x in steps),
                     "--eval-every", str(a.vcycle_eval_every), *REUSE_OPTIONS])

        # 1. learning rates (first seed, 1x)
        cmid = cbudgets[len(cbudgets) // 2]
        # every budget of both sizes at every lr, seed by seed: each budget of each seed's
        # frontiers gets its own best lr (a frontier tuned at 1x, or on one seed, is under-tuned
        # elsewhere: a lr on the edge of divergence for one seed cost that seed's baselines
        # 0.12-0.16 nats in the first study); the recipes run at the first seed's 1x lr
        got: dict = {}

        def tuned(s):
            got.update(runner.run(dict([base(x, b, s) for x in lrs for b in budgets]
                                       + [alone(x, b, s) for x in clrs for b in cbudgets]
                                       + [sized(k, o, x, b, s) for k, o in sizes for x in clrs
                                          for b in cbudgets])))
            return ({b: min(lrs, key=lambda x: _loss(got[base(x, b, s)[0]])) for b in budgets},
                    {b: min(clrs, key=lambda x: _loss(got[alone(x, b, s)[0]])) for b in cbudgets})

        def sized_front(s):
            """Every --sizes architecture's frontier of seed s, each budget at its best lr."""
            return {k: [min((got[sized(k, o, x, b, s)[0]] for x in clrs), key=_loss)
                        for b in cbudgets] for k, o in sizes}

        blrs = {seeds[0]: tuned(seeds[0])}
        lr = blrs[seeds[0]][0].get(1.0, blrs[seeds[0]][0][budgets[len(budgets) // 2]])
        clr = blrs[seeds[0]][1][cmid]
        # seed by seed, so that a study cut short has whole seeds:
        # 2. frontiers of both sizes and the fixed recipes
        # 3. recipes that read the full model's frontier (--grow-when slope)
        fixed = [r for r in recipes if not reads_frontier(r)]
        fronts = {}
        for s in seeds:
            blr, cblr = blrs[s] = blrs.get(s) or tuned(s)
            grid = dict([base(blr[b], b, s) for b in budgets] + [alone(cblr[b], b, s) for b in cbudgets]
                        + [recipe(r, lr, s) for r in fixed if r not in REUSE]
                        + [reuse(r, lr, s) for r in fixed if r in REUSE])
            got.update(runner.run(grid))
            fronts[s] = {"full": [got[base(blr[b], b, s)[0]] for b in budgets],
                         "coarse": [got[alone(cblr[b], b, s)[0]] for b in cbudgets],
                         **sized_front(s)}
            pts = [[r["flops"], r["loss"]] for r in fronts[s]["full"] if r]
            path = runner.root / f"{tag}-s{s}-full-frontier.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"points": pts}))
            got.update(runner.run(dict(recipe(r, lr, s, ["--grow-frontier", str(path)])
                                       for r in recipes if reads_frontier(r))))
        rows = []
        for r in recipes:
            for counted in ((True, False) if r in REUSE else (True,)):
                per = {}
                for s in seeds:
                    run = got.get((reuse if r in REUSE else recipe)(r, lr, s)[0])
                    if run is None or not all(all(v) for v in fronts[s].values()):
                        continue
                    own, point = scored(r, run, counted)
                    same = saving_against([dict(steps=b["steps"], flops=b["flops"], loss=b["loss"])
                                           for b in fronts[s][own]], point)
                    env = envelope_against({k: list(v) for k, v in fronts[s].items()}, point)
                    per[s] = {"loss": point["loss"], "flops": point["flops"],
                              "tokens_per_param": run["tokens_per_param"], "same_size": same["flops"],
                              "same_size_extrapolated": same["flops_extrapolated"],
                              "envelope": env["flops"],
                              "envelope_extrapolated": env["flops_extrapolated"],
                              "envelope_size": env["size_at_loss"],
                              "grow_step": (run.get("grow") or {}).get("step")}
                rows.append({"recipe": r if counted else f"{r} (handed-over model free)",
                             "seeds": per})
        out["regimes"].append({
            "tpp": tpp, "steps": S, "lr": lr, "coarse_lr": clr, "seeds": seeds,
            "lr_tuning": {f"{x:g}": _loss(got[base(x, 1.0, seeds[0])[0]]) for x in lrs},
            "coarse_lr_tuning": {f"{x:g}": _loss(got[alone(x, cmid, seeds[0])[0]]) for x in clrs},
            "budget_lrs": {str(s): {f"{b:g}": v[0][b] for b in budgets} for s, v in blrs.items()},
            "coarse_budget_lrs": {str(s): {f"{b:g}": v[1][b] for b in cbudgets}
                                  for s, v in blrs.items()},
            "budget_lr_tuning": {str(s): {f"{b:g}": {f"{x:g}": _loss(got.get(base(x, b, s)[0]))
                                                     for x in lrs} for b in budgets} for s in blrs},
            "coarse_budget_lr_tuning": {str(s): {f"{b:g}": {f"{x:g}": _loss(got.get(alone(x, b, s)[0]))
                                                            for x in clrs} for b in cbudgets}
                                        for s in blrs},
            "frontiers": {str(s): {k: [None if b is None else {q: b[q] for q in
                                   ("steps", "flops", "loss", "tokens_per_param")} for b in v]
                                   for k, v in f.items()} for s, f in fronts.items()},
            "recipes": rows})
    return out


def scored(name: str, run: dict, counted: bool = True) -> tuple[str, dict]:
    """Which frontier a run is scored on ("full" or "coarse") and its point (``flops``,
    ``loss``). A recipe: the run's end, on the full model's frontier. ``reuse-grow``: the end,
    on the full frontier; not ``counted``, without the FLOPs of the stages before growth (the
    trained small model is given). ``reuse-shrink``: the end of the coarse stage, on the coarse
    architecture's frontier; not ``counted``, without the full model's stage (it is given)."""
    if name not in REUSE:
        return "full", {"flops": run["flops"], "loss": run["loss"]}
    st = run["stage_ends"]
    if name == "reuse-grow":
        return "full", {"loss": run["loss"],
                        "flops": run["flops"] - (0 if counted else st[2]["flops_start"])}
    return "coarse", {"loss": st[1]["val_loss_end"],
                      "flops": st[1]["flops_end"] - (0 if counted else st[1]["flops_start"])}


def _loss(run: dict | None) -> float:
    return float("inf") if run is None else run["loss"]


# ----------------------------------------------------------------------------- reporting


def _spread(vals):
    vs = [v for v in vals if v is not None]
    if not vs:
        return None
    return statistics.median(vs), min(vs), max(vs)


def _pct(sp, approx=False) -> str:
    if sp is None:
        return "-"
    m, lo, hi = sp
    body = f"{100 * m:+.1f}%" + (f" [{100 * lo:+.1f}, {100 * hi:+.1f}]" if lo != hi else "")
    return body + ("~" if approx else "")


def report(data: dict) -> str:
    lines = [f"full model {data['params']:,} parameters, {data['tokens_per_step']} tokens/step"]
    rows = []
    for g in data["regimes"]:
        lines.append(f"{g['tpp']:g} tokens/param: S = {g['steps']} steps, lr {g['lr']:g} "
                     f"(tried {g['lr_tuning']}), coarse alone lr {g['coarse_lr']:g} "
                     f"(tried {g['coarse_lr_tuning']})")
        for s, tried in g.get("budget_lr_tuning", {}).items():
            lines.append(f"  seed {s} lr per budget: full {g['budget_lrs'][s]} (tried {tried}), "
                         f"coarse alone {g['coarse_budget_lrs'][s]} "
                         f"(tried {g['coarse_budget_lr_tuning'][s]})")
        for s, f in g["frontiers"].items():
            for size, pts in f.items():
                lines.append(f"  seed {s} {size:6s} " + ", ".join(
                    "-" if b is None else f"{b['steps']} st {b['flops']:.3e} -> {b['loss']:.4f} "
                    f"({b['tokens_per_param']:.0f} t/p)" for b in pts))
        for r in g["recipes"]:
            per = r["seeds"].values()
            if not per:
                rows.append((f"{g['tpp']:g}", r["recipe"], "0", "-", "-", "-", "-", "-", "-"))
                continue
            loss = _spread([p["loss"] for p in per])
            rows.append((f"{g['tpp']:g}", r["recipe"], str(len(per)),
                         f"{statistics.median(p['tokens_per_param'] for p in per):.1f}",
                         f"{loss[0]:.4f}" + (f" [{loss[1]:.4f}, {loss[2]:.4f}]" if loss[1] != loss[2] else ""),
                         f"{statistics.median(p['flops'] for p in per):.3e}",
                         _pct(_spread([p["same_size"] for p in per]),
                              any(p["same_size_extrapolated"] for p in per)),
                         _pct(_spread([p["envelope"] for p in per]),
                              any(p["envelope_extrapolated"] for p in per)),
                         "/".join(sorted({str(p["envelope_size"]) for p in per}))))
    head = ("t/p (1x)", "recipe", "seeds", "t/p run", "final val loss", "FLOPs",
            "same-size saving", "envelope saving", "envelope size")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    grid = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [head, *rows]]
    grid.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + ["", "effective FLOPs saving, median [min, max] over seeds "
                              "(~ = extrapolated for some seed):"] + grid)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    names = sorted({r["recipe"] for g in data["regimes"] for r in g["recipes"]})
    colors = plt.get_cmap("tab20").colors
    for i, name in enumerate(names):
        style = dict(color=colors[i % len(colors)], marker="osD^v<>"[i % 7])
        for ax, key in zip(axes, ("same_size", "envelope")):
            xs, ys, lo, hi = [], [], [], []
            for g in data["regimes"]:
                for r in g["recipes"]:
                    sp = _spread([p[key] for p in r["seeds"].values()]) if r["recipe"] == name else None
                    if sp:
                        xs.append(g["tpp"])
                        ys.append(100 * sp[0])
                        lo.append(100 * (sp[0] - sp[1]))
                        hi.append(100 * (sp[2] - sp[0]))
            if xs:
                ax.errorbar(xs, ys, yerr=[lo, hi], fmt="-", capsize=3, label=name, **style)
    for ax, title in zip(axes, ("against the same-size frontier", "against the envelope")):
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("tokens per parameter of the full model (1x baseline)")
        ax.set_title(f"effective FLOPs saving {title}")
        ax.set_ylim(-150, 100)  # below -150%: off the plot (the tables hold every value)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("saving, % (median, range over seeds; clipped at -150)")
    if axes[0].get_legend_handles_labels()[0]:
        fig.legend(*axes[0].get_legend_handles_labels(), fontsize=7, ncol=6, loc="lower center")
        fig.subplots_adjust(bottom=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/regime", help="study directory (finished runs are reused)")
    p.add_argument("--tpp", default="25", help="tokens per parameter of the 1x baseline, comma-separated")
    p.add_argument("--seeds", default="1337,4242,7")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lrs", default="0.006", help="full-model peak lrs tried at 1x (min_lr lr/10)")
    p.add_argument("--coarse-lrs", default="0.012", help="coarse-alone peak lrs tried")
    p.add_argument("--budgets", default="0.67,1,1.5", help="full-model budgets, x S")
    p.add_argument("--coarse-budgets", default="1,3", help="coarse-alone budgets, x S")
    p.add_argument("--recipes", default="defaults,f.02/.08/.90,f.05/.20/.75,slope",
                   help=f"comma-separated, of {', '.join([*RECIPES, *REUSE, *BASELINE_RECIPES])}")
    p.add_argument("--sizes", default="",
                   help="more architectures trained alone for the envelope, comma-separated "
                        "LxE or LxExH (e.g. 1x32x2: the coarse architecture of --width 1), at "
                        "--coarse-budgets with --coarse-lrs, each budget's lr tuned")
    p.add_argument("--vcycle-eval-every", type=int, default=50)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="threads per run")
    p.add_argument("--report-only", action="store_true",
                   help="start no run: the table and plot of the runs finished so far")
    p.add_argument("--name", default="regime",
                   help="the table and plot go to --out/NAME.json and NAME.png")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="start no run: one table and plot of the regimes of several studies' "
                        "NAME.json files (regimes run with different options each)")
    p.add_argument("extra", nargs="*", help="options for every run (after --)")
    a = p.parse_args(argv)
    if a.merge:
        parts = [json.loads(Path(f).read_text()) for f in a.merge]
        if len({d["params"] for d in parts}) != 1:
            p.error("--merge: the studies were run on models of different sizes")
        data = {**parts[0], "regimes": sorted((g for d in parts for g in d["regimes"]),
                                              key=lambda g: g["tpp"])}
        return _write(data, Path(a.out), a.name)
    unknown = [r for r in a.recipes.split(",")
               if r and r not in RECIPES and r not in REUSE and r not in BASELINE_RECIPES]
    if unknown:
        p.error(f"unknown recipes {unknown}; known: {', '.join(RECIPES)}")
    # --width 0.5: every recipe names its factors, whatever the driver's default becomes
    common = ["--seq-len", str(a.seq_len), "--batch-size", str(a.batch_size), "--ckpt-every", "0",
              "--eval-every", "250", "--width", "0.5", *a.extra]
    runner = Runner(Path(a.out), a.jobs, a.threads, common, dry=a.report_only)
    data = study(a, runner)
    return _write(data, runner.root, a.name)


def _write(data: dict, out: Path, name: str) -> int:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=1))
    plot(data, out / f"{name}.png")
    print(report(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
