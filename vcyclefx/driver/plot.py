"""The end of a training run: summary.json, the table on stdout, and the PNG plot.

Everything is computed from ``metrics.jsonl`` alone, so a resumed run and ``vcyclefx train``'s
caller see the same numbers, and a finished run can be summarised again (``finish(out)``).

Two measures of the saving, labelled as such wherever they are printed or saved:

- **effective saving** (``effective_saving`` in summary.json; the one that counts): against the
  frontier of the baselines a ``--schedule compare`` run trains (``--frontier-budgets``, 0.75x,
  1x and 1.5x of ``--steps`` by default, each fully decayed), ``1 - C / C_frontier(L)`` for the
  schedule's final level-0 loss L, in FLOPs and in wall seconds, the wall frontier priced at the
  baselines' own seconds per step in this run (``vcyclefx/driver/saving.py``). Outside the
  frontier's bracket the figure is extrapolated from its nearest segment and says so.
- **to reach the 1x baseline's final loss** (``vcycle_saving``): the older, single-budget figure.

"Reached the baseline" = where the validation loss **of level 0** (the model the user wants)
first falls to the baseline's final validation loss; coarse levels are different, smaller models
and do not count. FLOPs and wall seconds there are interpolated linearly between the two
consecutive level-0 evaluations of one stage that bracket the target (evaluations are
``--eval-every`` steps apart, so taking the later one would overstate the cost by up to that
many steps); when the first evaluation at or below the target opens a stage (right after a
de-coalesce and interpolation) or is the very first one, its own FLOPs and seconds are taken.
"""

from __future__ import annotations

from pathlib import Path

from vcyclefx.driver.logger import read_metrics
from vcyclefx.driver.regime import size_label
from vcyclefx.driver.saving import describe, envelope_against, saving_against, steady_wall
from vcyclefx.driver.schedule import parse_alone, size_key
from vcyclefx.store import atomic_path, atomic_write_json

REACH = "to reach the 1x baseline's final loss (one budget, not the frontier)"


def reach(evals: list[dict], target: float | None) -> dict | None:
    """Steps, FLOPs and wall seconds at which level 0's validation loss first reaches
    ``target`` (module docstring), with the evaluation that got there; None if it never does."""
    if target is None:
        return None
    prev = None
    for r in evals:
        if r["level"] != 0:
            prev = None
            continue
        if r["val_loss"] <= target:
            out = {k: r[k] for k in ("step", "flops", "wall")}
            if (prev is not None and prev["stage"] == r["stage"] and r["val_loss"] < target
                    and prev["val_loss"] > target):
                f = (prev["val_loss"] - target) / (prev["val_loss"] - r["val_loss"])
                out = {k: prev[k] + f * (r[k] - prev[k]) for k in ("step", "flops", "wall")}
            return {**out, "eval_step": r["step"], "interpolated": out["step"] != r["step"]}
        prev = r
    return None


def summarize(records: list[dict]) -> dict:
    """The summary of a run (or of several runs' records put together: a baseline run's and a
    V-cycle run's give what one ``--schedule compare`` run would)."""
    ends = {r["schedule"]: r for r in records if r["event"] == "end"}
    base = ends.get("baseline")
    target = base["val_loss"] if base else None
    out: dict = {"baseline_final_val_loss": target, "schedules": {}}
    for name, end in ends.items():
        evals = [r for r in records if r["event"] == "eval" and r["schedule"] == name]
        hit = reach(evals, target)
        stages = [r for r in records if r["event"] == "stage" and r["schedule"] == name]
        out["schedules"][name] = {
            "final_val_loss": end["val_loss"],
            "total_flops": end["flops"],
            "wall_seconds": end["wall"],
            "steady_wall_seconds": steady_wall(records, name),
            "tokens": end["tokens"],
            "steps": end["step"],
            "params": _params(stages),
            "tokens_per_param": None if not _params(stages) else end["tokens"] / _params(stages),
            "flops_to_baseline_loss": hit["flops"] if hit else None,
            "wall_to_baseline_loss": hit["wall"] if hit else None,
            "steps_to_baseline_loss": hit["step"] if hit else None,
            "stages": [{k: s.get(k) for k in ("stage", "level", "phase", "step", "steps", "lr_scale",
                                              "params", "flops_per_token", "optimizer")}
                       for s in stages],
        }
    if base and "vcycle" in out["schedules"]:
        v = out["schedules"]["vcycle"]
        out["vcycle_saving"] = {
            "flops": None if v["flops_to_baseline_loss"] is None
            else 1 - v["flops_to_baseline_loss"] / base["flops"],
            "wall": None if v["wall_to_baseline_loss"] is None
            else 1 - v["wall_to_baseline_loss"] / max(1e-9, base["wall"]),
            "measure": REACH,
        }
    frontier = {name: e for name, e in ends.items() if name.startswith("baseline")}
    if len(frontier) >= 2 and "vcycle" in out["schedules"]:
        v, s = out["schedules"]["vcycle"], out["schedules"]
        points = [dict(steps=e["step"], flops=e["flops"], loss=e["val_loss"],
                       wall=s[name]["steady_wall_seconds"]) for name, e in frontier.items()]
        eff = saving_against(points, dict(flops=v["total_flops"], wall=v["steady_wall_seconds"],
                                          loss=v["final_val_loss"]))
        eff["budgets"] = {name: {"steps": e["step"], "flops": e["flops"],
                                 "steady_wall": s[name]["steady_wall_seconds"],
                                 "final_val_loss": e["val_loss"]} for name, e in frontier.items()}
        eff["measure"] = ("effective saving: 1 - C / C_frontier(L) against the baselines above "
                          "(loss piecewise linear in log cost); wall: steady wall seconds (per "
                          "stage its steps x the median seconds per step, plus capture and "
                          "transitions as measured), the frontier priced at the baselines' "
                          "steady seconds per step in this run")
        eff["envelope"] = _envelope(out, frontier, v)
        out["effective_saving"] = eff
    return out


def _params(stages: list[dict]) -> int | None:
    """Parameters of the model a schedule ends with (its first level-0 stage's)."""
    return next((st["params"] for st in stages if st["level"] == 0), None)


def _envelope(out: dict, frontier: dict, v: dict) -> dict:
    """``effective_saving.envelope``: the V-cycle against the lower hull of the full model's
    baselines and every coarser level's architecture trained alone (``alone-L<k>-x<F>``)."""
    s = out["schedules"]
    sizes = {"level0": [dict(flops=e["flops"], loss=e["val_loss"]) for e in frontier.values()]}
    params = {"level0": v["params"]}
    for name, sch in s.items():
        alone = parse_alone(name)
        if alone:
            sizes.setdefault(size_key(alone[0]), []).append(
                dict(flops=sch["total_flops"], loss=sch["final_val_loss"]))
            params[size_key(alone[0])] = sch["params"]
    env = envelope_against(sizes, dict(flops=v["total_flops"], loss=v["final_val_loss"]))
    env["params"] = params
    env["measure"] = ("effective saving against the envelope: 1 - C / C_env(L), C_env(L) the "
                      "cheapest, in training FLOPs, of the full model's baselines and each "
                      "coarser level's architecture (and --alone-sizes size) trained alone "
                      "(each frontier piecewise "
                      "linear in log FLOPs; a size counts only inside its measured bracket "
                      "unless none holds L, then extrapolated)")
    return env


def verdict(summary: dict) -> str | None:
    """Plain sentences: does the V-cycle pay against the full model's baselines, and against the
    envelope (every size measured)? Where it beats the same-size model but not the envelope,
    the honest advice is to train the size that is the envelope there."""
    eff = summary.get("effective_saving")
    if not eff or eff.get("flops") is None:
        return None
    f, w = eff["flops"], eff.get("wall")
    figures = f"{100 * f:.1f}% in training FLOPs" + ("" if w is None else
                                                     f", {100 * w:.1f}% in wall time")
    where = (" (extrapolated beyond the measured baselines)" if eff.get("flops_extrapolated")
             else "")
    env = eff.get("envelope") or {}
    e, params = env.get("flops"), env.get("params", {})
    v = summary["schedules"]["vcycle"]
    tpp = v.get("tokens_per_param")
    regime = "" if tpp is None else f" at {tpp:.1f} tokens per parameter"
    lines = []
    if f > 0 and (w is None or w > 0):
        lines.append(f"Verdict: against the same-size model's baselines the V-cycle saves "
                     f"{figures}{where}{regime}.")
    elif f > 0:
        lines.append(f"Verdict: the V-cycle saves training FLOPs but not wall time against the "
                     f"same-size model{where}: {figures} (the coarse level runs fewer FLOPs per "
                     "second, and capture and transitions cost time that FLOPs do not show).")
    else:
        lines.append(f"Verdict: the V-cycle does not pay against the same-size model{where}: "
                     f"{figures} (negative: the plain baseline reaches the V-cycle's loss for less).")
    if e is not None and len(env.get("sizes", {})) > 1:
        approx = " (extrapolated)" if env.get("flops_extrapolated") else ""
        size = env.get("size_at_loss")
        n = params.get(size)
        label = (f"the {n:,}-parameter model ({size_label(size, None)})" if n
                 else size_label(size, None) if size else "?")
        if e > 0:
            lines.append(f"Against the envelope (the cheapest of the sizes measured) it saves "
                         f"{100 * e:.1f}% of the FLOPs{approx}: it pays.")
        else:
            lines.append(f"Against the envelope it costs {-100 * e:.1f}% more FLOPs{approx}: it does "
                         f"not pay. Train {label} instead: it reaches the V-cycle's loss "
                         f"{v['final_val_loss']:.4f} for {env['flops_frontier']:.3e} FLOPs "
                         f"(the V-cycle spent {v['total_flops']:.3e}).")
        best = env.get("best_size_at_cost")
        if best and best["size"] != "level0":
            lines.append(f"At the V-cycle's budget ({v['total_flops']:.3e} FLOPs) the "
                         f"compute-efficient size measured here is "
                         f"{size_label(best['size'], params.get(best['size']))} (loss "
                         f"{best['loss']:.4f}), not the {params.get('level0') or 0:,}-parameter "
                         "model asked for.")
    return " ".join(lines)


def _fmt(x, spec, target):
    if target is None:
        return "n/a (no baseline)"
    return "never" if x is None else format(x, spec)


def table(summary: dict) -> str:
    head = ("schedule", "params", "tokens/param", "final val loss", "train FLOPs", "wall s",
            "FLOPs to baseline loss", "wall s to baseline loss")
    rows, target = [head], summary["baseline_final_val_loss"]
    for name, s in summary["schedules"].items():
        tpp = s.get("tokens_per_param")
        rows.append((name, "-" if s.get("params") is None else f"{s['params']:,}",
                     "-" if tpp is None else f"{tpp:.1f}",
                     f"{s['final_val_loss']:.4f}", f"{s['total_flops']:.3e}",
                     f"{s['wall_seconds']:.1f}", _fmt(s["flops_to_baseline_loss"], ".3e", target),
                     _fmt(s["wall_to_baseline_loss"], ".1f", target)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    eff = summary.get("effective_saving")
    if eff:
        budgets = ", ".join(f"{n} {b['steps']} steps" for n, b in eff["budgets"].items())
        sps = eff.get("baseline_seconds_per_step")
        lines.append(f"V-cycle effective saving against the baseline frontier ({budgets}; log-"
                     f"linear in cost): FLOPs {describe(eff['flops'], eff['flops_extrapolated'])}, "
                     f"wall {describe(eff['wall'], eff['wall_extrapolated'])}"
                     + (f" (steady wall, the baselines at {sps:.4f} s/step)" if sps else ""))
        env = eff.get("envelope")
        if env and len(env.get("sizes", {})) > 1:
            sizes = ", ".join(size_label(n, env["params"].get(n)) for n in env["sizes"])
            lines.append(f"V-cycle effective saving against the envelope (lowest FLOPs of {sizes} "
                         f"at its loss; the envelope there: "
                         f"{size_label(env['size_at_loss'], env['params'].get(env['size_at_loss'])) if env.get('size_at_loss') else 'n/a'}): "
                         f"FLOPs {describe(env['flops'], env['flops_extrapolated'])}")
    saving = summary.get("vcycle_saving")
    if saving:
        pct = {k: "never reached" if saving[k] is None else f"{100 * saving[k]:.1f}%"
               for k in ("flops", "wall")}
        lines.append(f"V-cycle saving {REACH}: FLOPs {pct['flops']}, wall {pct['wall']} "
                     "(interpolated between evaluations)")
    said = verdict(summary)
    if said:
        lines.append(said)
    return "\n".join(lines)


def plot(records: list[dict], path: Path, target: float | None = None) -> None:
    """Validation loss against training FLOPs and against wall seconds, one line per schedule,
    dotted vertical lines where a schedule enters a new stage (labelled with its level)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(dict.fromkeys(r["schedule"] for r in records))
    for color, name in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], names):
        evals = [r for r in records if r["event"] == "eval" and r["schedule"] == name]
        stages = [r for r in records if r["event"] == "stage" and r["schedule"] == name]
        for ax, key in zip(axes, ("flops", "wall")):
            ax.plot([r[key] for r in evals], [r["val_loss"] for r in evals], "o-", ms=3,
                    color=color, label=name)
            for s in stages[1:]:
                ax.axvline(s[key], color=color, ls=":", lw=1)
                ax.annotate(f"L{s['level']}", (s[key], 1.0), xycoords=("data", "axes fraction"),
                            color=color, fontsize=8, ha="left", va="top")
    ends = sorted((r for r in records if r["event"] == "end" and r["schedule"].startswith("baseline")),
                  key=lambda r: r["flops"])
    if len(ends) >= 2:  # the frontier: the baselines' final points
        for ax, key in zip(axes, ("flops", "wall")):
            ax.plot([r[key] for r in ends], [r["val_loss"] for r in ends], "s--", color="black",
                    lw=1, ms=5, label="baseline frontier")
    keys = sorted({parse_alone(r["schedule"])[0] for r in records
                   if r["event"] == "end" and parse_alone(r["schedule"])}, key=str)
    for k in keys:  # each architecture trained alone: its frontier
        alone = sorted((r for r in records if r["event"] == "end" and parse_alone(r["schedule"])
                        and parse_alone(r["schedule"])[0] == k), key=lambda r: r["flops"])
        for ax, key in zip(axes, ("flops", "wall")):
            ax.plot([r[key] for r in alone], [r["val_loss"] for r in alone], "^:",
                    color="gray" if isinstance(k, int) else "tab:brown", lw=1, ms=5,
                    label=f"{size_label(size_key(k), None)}")
    for ax, xlabel in zip(axes, ("training FLOPs", "wall seconds (training)")):
        if target is not None:
            ax.axhline(target, color="gray", lw=0.8, ls="--", label="baseline final")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)


def finish(out: Path, cfg=None) -> dict:
    """Write summary.json and loss.png for the run in ``out`` and print the table."""
    records = read_metrics(Path(out) / "metrics.jsonl")
    summary = summarize(records)
    if cfg is not None:
        summary["config"] = cfg.to_dict()
    atomic_write_json(Path(out) / "summary.json", summary, indent=1)
    plot(records, Path(out) / "loss.png", summary["baseline_final_val_loss"])
    print(table(summary), flush=True)
    return summary
