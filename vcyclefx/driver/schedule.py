"""Schedules of a training run: which ones it trains, their steps and their learning rates.

A run trains ``--schedule``: ``baseline``, ``vcycle``, or ``compare`` = every frontier baseline
(``baseline`` at 1x ``--steps`` first, then ``baseline-x1.5`` and the like), each coarser level's
architecture alone (``alone-L1-x2`` = level 1's sizes, 2x ``--steps``, its own warm-up and
cosine at ``--lr`` x that level's lr scale; ``alone-1x32x2-x2`` = an ``--alone-sizes``
architecture) and the V-cycle.

Learning rate with ``--lr-schedule global`` at optimizer step ``s`` of a schedule, counted over
all its stages::

    lr(s) = lr_scale(stage) * ramp(stage step) * cosine(s; steps of the schedule, warmup)
    cosine(s; n, w) = lr * (s+1)/(w+1)                                  while s < w
                    = min_lr + (lr - min_lr) * (1 + cos(pi * (s - w) / (n - w))) / 2
    ramp(k) = min(1, (k+1)/(stage_warmup+1)) for stages after the first, else 1

so baseline and V-cycle share one envelope and a coarse stage runs at ``lr_scale`` times it
(``global`` is the default). ``--lr-schedule wsd`` is the same with warm-up, stable, decay in
place of the cosine (``--decay-fraction`` f of the steps at the end)::

    wsd(s; n, w) = lr * (s+1)/(w+1)                                     while s < w
                 = lr                                                   while s < n - d
                 = min_lr + (lr - min_lr) * (n - s) / d                 after, d = max(1, round(f n))

With ``--lr-schedule stage`` every stage restarts, as if each were its own run
(the authors' recipe runs each stage as a separate job with a fresh optimizer):
``lr = lr_scale * cosine(k; stage steps, warmup if first stage else stage_warmup)`` at stage
step ``k``. A baseline is one stage, so both give it the same schedule. Measured final
validation losses of the V-cycle (800 steps, stdlib corpus): 2 x 64 GPT 2.266 (stage) vs 2.304
(global), baseline 2.179; tiny preset 2.103 (stage) vs 2.083 (global), baseline 1.905 - no
clear winner at this scale (later studies chose ``global``, BENCHMARKS.md).

``--lr-at-growth same-loss`` (staged training's rule, Shen et al., ICML 2022) replaces the
learning rate of the V-cycle's last stage, the full model grown back: at its start the grown
model's validation loss L is read off the full model's frontier, C_full(L) FLOPs, i.e.
``n = C_full(L) / (FLOPs of one full-model step)`` steps of a from-scratch full model; the stage's
R steps then follow ``shape(n + k; n + R, warmup)`` at stage step k (``RunState.lr_from`` = n), as
if the grown model were that model, trained on for R more steps and fully decayed.
"""

from __future__ import annotations

import math

from vcyclefx.driver.config import TrainConfig
from vcyclefx.driver.runtime import RunState


def baseline_name(budget: float) -> str:
    """The schedule name of the baseline at ``budget`` x ``--steps``: ``baseline`` at 1x (the one
    the "reach the baseline's final loss" figures use), else ``baseline-x1.5`` and the like."""
    return "baseline" if budget == 1.0 else f"baseline-x{budget:g}"


def alone_name(key: int | str, budget: float) -> str:
    """The schedule name of an architecture trained alone at ``budget`` x ``--steps``: level
    ``key``'s (``alone-L1-x2``) or an ``--alone-sizes`` one (``alone-1x32x2-x2``)."""
    return f"alone-{f'L{key}' if isinstance(key, int) else key}-x{budget:g}"


def parse_alone(schedule: str) -> tuple[int | str, float] | None:
    """(key, budget) of an ``alone-...-x<F>`` schedule name (key: the level, an int, or the
    ``--alone-sizes`` entry, ``"1x32x2"``), else None."""
    if not schedule.startswith("alone-"):
        return None
    key, budget = schedule[len("alone-"):].rsplit("-x", 1)
    return (int(key[1:]) if key.startswith("L") else key), float(budget)


def size_key(key: int | str) -> str:
    """The envelope's name of an architecture trained alone: ``level1`` or ``1x32x2``."""
    return f"level{key}" if isinstance(key, int) else key


def schedule_steps(cfg: TrainConfig, schedule: str) -> int:
    """Optimizer steps of a whole schedule: ``--vcycle-steps`` (or ``--steps``) for the V-cycle,
    ``round(F * --steps)`` for the baseline ``baseline-xF``."""
    if schedule == "vcycle":
        return cfg.vcycle_total_steps
    if schedule.startswith("baseline-x"):
        return max(1, round(float(schedule[len("baseline-x"):]) * cfg.steps))
    if parse_alone(schedule):
        return max(1, round(parse_alone(schedule)[1] * cfg.steps))
    return cfg.steps


def schedule_order(cfg: TrainConfig) -> list[str]:
    """What a run trains, in order: compare = every frontier baseline (1x first), each coarser
    level's architecture alone at every ``--coarse-budgets`` budget (built-in GPT only: a
    ``--model``'s coarse sizes have no config to build them from), then the V-cycle."""
    if cfg.schedule != "compare":
        return [cfg.schedule]
    budgets = sorted(cfg.frontier_budgets, key=lambda b: (b != 1.0, b))
    keys = [*range(1, cfg.levels), *(k for k, _ in cfg.alone_size_list())]
    alone = [] if cfg.model else [alone_name(k, b) for k in keys for b in sorted(cfg.coarse_budgets)]
    return [baseline_name(b) for b in budgets] + alone + ["vcycle"]


def cosine_lr(step: int, steps: int, warmup: int, lr: float, min_lr: float) -> float:
    """``cosine(step; steps, warmup)`` of the module docstring, peak ``lr``, floor ``min_lr``."""
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def wsd_lr(step: int, steps: int, warmup: int, lr: float, min_lr: float,
           decay_fraction: float) -> float:
    """``wsd(step; steps, warmup)`` of the module docstring: warm-up, ``lr``, then a linear decay
    to ``min_lr`` over the last ``decay_fraction`` of ``steps``."""
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    decay = max(1, round(decay_fraction * steps))
    if step < steps - decay:
        return lr
    return min_lr + (lr - min_lr) * max(0.0, steps - step) / decay


def shape_lr(cfg: TrainConfig, step: int, steps: int, warmup: int) -> float:
    """The run's lr shape at ``step`` of ``steps``: wsd under ``--lr-schedule wsd``, else the
    cosine."""
    if cfg.lr_schedule == "wsd":
        return wsd_lr(step, steps, warmup, cfg.lr, cfg.min_lr, cfg.decay_fraction)
    return cosine_lr(step, steps, warmup, cfg.lr, cfg.min_lr)


def global_lr(step: int, stage_step: int, first_stage: bool, *, steps: int, warmup: int,
              stage_warmup: int, lr: float, min_lr: float) -> float:
    """``--lr-schedule global`` without the stage's lr scale: ``ramp(stage_step) * cosine(step;
    steps, warmup)`` (module docstring). The integrations (``vcyclefx.integrations``) run their
    stages with this function, so a Trainer's or Lightning's stages follow the driver's envelope."""
    return stage_ramp(stage_step, first_stage, stage_warmup) * cosine_lr(step, steps, warmup, lr,
                                                                         min_lr)


def stage_ramp(stage_step: int, first_stage: bool, stage_warmup: int) -> float:
    """``--lr-schedule global``'s re-warm-up of every stage after the first:
    ``min(1, (stage_step + 1) / (stage_warmup + 1))``; 1 in the first stage."""
    return 1.0 if first_stage else min(1.0, (stage_step + 1) / (stage_warmup + 1))


def lr_at(cfg: TrainConfig, step: int, steps: int | None = None, warmup: int | None = None) -> float:
    """``cosine(step; steps, warmup)`` of the module docstring (default: the baseline's steps)."""
    steps = cfg.steps if steps is None else steps
    warmup = cfg.warmup if warmup is None else warmup
    return shape_lr(cfg, step, steps, warmup)


def stage_lr(cfg: TrainConfig, state: RunState, steps: int, lr_scale: float) -> float:
    """The learning rate of the next step of the stage ``state`` is in (module docstring)."""
    first = state.stage == 0
    if state.lr_from:  # --lr-at-growth same-loss: the grown model as a full model lr_from steps in
        return lr_scale * lr_at(cfg, state.lr_from + state.stage_step, state.lr_from + steps)
    if cfg.lr_schedule == "stage":
        warmup = cfg.warmup if first else cfg.stage_warmup
        return lr_scale * lr_at(cfg, state.stage_step, steps, warmup)
    ramp = stage_ramp(state.stage_step, first, cfg.stage_warmup)
    return lr_scale * ramp * lr_at(cfg, state.step, schedule_steps(cfg, state.schedule))


def steps_at_loss(frontier, loss: float, flops_per_step: float) -> int:
    """``--lr-at-growth same-loss``: the steps a from-scratch full model needs to reach ``loss``
    (its frontier's FLOPs at that loss, extrapolated outside the bracket, over one step's
    FLOPs); at least 1."""
    need = frontier.cost_at(loss, extrapolate=True)
    return max(1, round(need.value / flops_per_step))
