"""The training recipe: ``main(cfg)`` -> setup -> train -> cleanup (nanoGPT loop, torchtune shape).

``train(rt)`` runs the schedules of the run in order (``driver.schedule``): the baseline is one
stage of the plain model, the V-cycle every stage of a ``vf.VCycle`` over it; each stage is
trained by ``run_stage`` (``driver.stage``), after restoring a checkpoint's weights, optimizer
state and RNG when the run resumes. The trained level-0 weights of each schedule end as
``<schedule>.safetensors``; ``main`` writes the summary, table and plot (``driver.plot``).

Where things are: start-up and clean-up in ``driver.startup``, the learning rates in
``driver.schedule``, one stage's loop, FLOPs per token and evaluation in ``driver.stage``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from vcyclefx.driver.checkpoint import load_weights, restore_rng, saved_optimizer_by_name
from vcyclefx.driver.config import ConfigError, TrainConfig
from vcyclefx.driver.logger import MetricLogger, ProgressBar, read_metrics
from vcyclefx.driver.models import save_hf
from vcyclefx.driver.parallel import optimizer_state_by_name, optimizer_state_from_names
from vcyclefx.driver.plot import finish
from vcyclefx.driver.runtime import Point, RunState, Runtime
from vcyclefx.driver.growth import load_frontier, should_grow
from vcyclefx.driver.logger import read_metrics
from vcyclefx.driver.regime import coarse_params, regime_note
from vcyclefx.driver.saving import Frontier
from vcyclefx.driver.schedule import (lr_at, parse_alone, schedule_order, schedule_steps,
                                     stage_lr, steps_at_loss)
from vcyclefx.driver.sharded import ShardedLevels
from vcyclefx.driver.stage import (lm_training_flops_per_token, make_optimizer, record,
                                   run_stage)
from vcyclefx.driver.startup import _autocast_dtype, _device, cleanup, new_model, setup
from vcyclefx.store import save_tensors
from vcyclefx.train.flops import training_flops_per_token
from vcyclefx.train.vcycle import VCycle

# names other modules and tests import from here, besides those defined below
__all__ = ["cycle_options", "load_weights", "lr_at", "make_cycle", "make_optimizer", "main",
           "optimizer_state_by_name", "optimizer_state_from_names", "RunState", "run_stage", "setup", "stage_lr",
           "training_flops_per_token", "train", "train_vcycle_on"]


def _restore(rt: Runtime, point: Point | None, module: torch.nn.Module, state: RunState):
    """Weights, optimizer state and RNG of ``point`` (if any); returns (state, optim_state).
    A ``--fsdp`` checkpoint's weights and optimizer state are loaded by ``run_stage`` once the
    module is sharded: ``optim_state`` is then the path of its ``dcp/``."""
    if point is None:
        torch.manual_seed(rt.cfg.seed + 1 + rt.rank)  # dropout stream, per rank
        return state, None
    if point.sharded:
        optim_state = point.dir / "dcp"
    else:
        load_weights(module, point.dir / "model.safetensors")
        optim_state = torch.load(point.dir / "optim.pt", weights_only=True,
                                 map_location="cpu" if rt.cfg.fsdp else rt.device)
    restore_rng(rt, point)
    return point.state, optim_state


def run_baseline(rt: Runtime, point: Point | None, bar: ProgressBar | None,
                 name: str = "baseline") -> RunState:
    """The plain model for the steps of the baseline ``name`` (its own warm-up and cosine); for
    ``alone-L<k>-x<F>`` level k's architecture alone, freshly initialised, at ``--lr`` times
    that level's lr scale (the rate its V-cycle stages train at); for ``alone-1x32x2-x<F>`` that
    ``--alone-sizes`` architecture at the coarse lr scale."""
    alone = parse_alone(name)
    key = alone[0] if alone else 0
    model = new_model(rt, key)
    scale = rt.cfg.alone_lr_scale(key) if alone else 1.0
    state, optim_state = _restore(rt, point, model, RunState(name))
    state, _ = run_stage(rt, model, schedule_steps(rt.cfg, name), scale, 0, state, optim_state, bar)
    _save_final(rt, model, name)
    return state


@dataclass
class Cycle:
    """A :class:`~vcyclefx.train.vcycle.VCycle` made before any training (so a V-cycle that cannot be planned fails at
    start-up, not after the baseline of a compare run) and the seconds it took."""

    cycle: object
    seconds: float
    frontier: object = None  # the full model's Frontier (--grow-when slope, --lr-at-growth same-loss)
    window: int = 4
    slope: bool = False  # --grow-when slope

    def grow_stop(self, start: RunState):
        """The ``stop`` of the bottom stage under ``--grow-when slope`` (``driver.growth``):
        True once its evaluations' slope per FLOP is shallower than the full frontier's."""
        if not self.slope or self.frontier is None:
            return None
        points: list[tuple[float, float]] = []

        def stop(state: RunState) -> bool:
            points.append((state.flops, state.val_loss))
            return should_grow(points, self.frontier, self.window)

        return stop


def cycle_options(cfg: TrainConfig, params: int | None = None) -> dict:
    """The ``vf.VCycle`` keyword options of the run's V-cycle (levels, factors, steps per stage,
    learning-rate scales, pairings): what an integration gives its VCycle to run this recipe.
    ``params``: level 0's parameter count, which with ``--steps`` picks the default
    ``--fractions`` of the regime (``TrainConfig.vcycle_fractions``)."""
    return dict(levels=cfg.levels, width=cfg.width, depth=cfg.depth, alpha=cfg.alpha,
                total_steps=cfg.vcycle_total_steps, fractions=cfg.vcycle_fractions(params),
                lr_scales=cfg.vcycle_lr_scales(), pairing=cfg.pairing,
                depth_pairing=cfg.depth_pairing, depth_init=cfg.depth_init)


def make_cycle(rt: Runtime, model: torch.nn.Module | None = None) -> Cycle:
    """The V-cycle over the run's level 0 (``model``, else a new one), captured on the training
    device (a captured graph keeps the device of its position ids). Its stage checkpoints go to
    ``<out>/vcycle``, written by rank 0; resuming continues after its last completed stage."""
    cfg = rt.cfg
    t0 = time.perf_counter()
    model = (model if model is not None else new_model(rt)).to(rt.device)
    example = (rt.train_batches.get(0, 0)[0][:2],)  # (2, T): batch 2 keeps the batch dim dynamic
    vdir = rt.out / "vcycle"
    params = sum(p.numel() for p in model.parameters())
    cycle = VCycle(model, example, **cycle_options(cfg, params), checkpoint_dir=vdir,
                   resume=vdir if cfg.resume else None,
                   write_checkpoints=rt.master)  # one writer; every rank rebuilds the same levels
    # --grow-when slope: the file's frontier now (a bad file fails at start-up); a compare
    # run's own when its baselines are done (train)
    reads = cfg.grow_when == "slope" or cfg.lr_at_growth == "same-loss"
    frontier = load_frontier(cfg.grow_frontier) if reads and cfg.grow_frontier else None
    return Cycle(cycle, time.perf_counter() - t0, frontier, cfg.grow_window,
                 cfg.grow_when == "slope")


def _own_frontier(rt: Runtime):
    """The full model's frontier from this compare run's finished baselines (metrics.jsonl)."""
    ends = [r for r in read_metrics(rt.out / "metrics.jsonl")
            if r["event"] == "end" and r["schedule"].startswith("baseline")]
    front = Frontier.from_points([(r["flops"], r["val_loss"]) for r in ends])
    if len(front.points) < 2:
        raise ConfigError(f"--grow-when slope / --lr-at-growth same-loss: the baselines of {rt.out} give "
                          f"{len(front.points)} usable frontier point(s) (each costlier one must "
                          "end lower); add --frontier-budgets or give --grow-frontier FILE")
    return front


def run_vcycle(rt: Runtime, made: Cycle, point: Point | None, bar: ProgressBar | None) -> RunState:
    """Every stage of the V-cycle trained by ``run_stage``: the previous stage's AdamW state sent
    through the stage's transition by ``Stage.map_optimizer_state`` (the default; timed as
    training, like the transition), or a fresh optimizer per stage (``--no-carry-optimizer``, the
    paper). Under ``--fsdp`` the state is gathered whole for the transition and resharded by the
    next stage (``Trainee.state_by_name`` / ``load_by_name``), the same computation as on one
    process.

    Resuming: the VCycle continues after its last completed stage c; the driver's checkpoint is
    either inside stage c + 1 (load its weights into that stage's model and go on) or at the
    end of stage c + 1, when rank 0 was stopped before the VCycle saved that stage (run its
    remaining 0 steps; the VCycle then saves it). Nothing else can happen (a stage's VCycle
    checkpoint is written only after the driver's stage-end checkpoint). A carried optimizer
    state needs nothing more: it is in the driver's checkpoint of the stage it was carried into,
    or, at a stage end, the checkpoint's optimizer state is carried into the next stage.
    """
    cycle, carry = made.cycle, rt.cfg.carries_optimizer
    if rt.master and point is None:
        _print(bar, str(cycle.schedule))
    state, optim_state = _restore(rt, None, cycle.level0, RunState("vcycle", wall=made.seconds))
    levels = _sharded_levels(rt, cycle)
    stages = iter(cycle)
    previous = None  # what the last stage handed on (its optimizer state), when carrying
    while True:
        t0 = time.perf_counter()
        stage = next(stages, None)  # coalescing / de-coalescing happens here: it counts as training
        carried = None
        if stage is not None and point is None and previous is not None:
            carried = (levels.carry(stage, previous) if levels is not None
                       else stage.map_optimizer_state(previous))
        previous = None
        if levels is not None and point is None:
            levels.release()
        state.wall += time.perf_counter() - t0
        if stage is None:
            break
        if point is not None:
            state, optim_state, carried = _resume_in(rt, point, stage, cycle, state, levels)
            point = None
        else:
            state.stage, state.stage_step, state.lr_from, optim_state = stage.index, 0, 0, None
        last = stage.index == len(cycle.schedule) - 1
        stop = made.grow_stop(state) if stage.phase == "bottom" and not last else None
        grown = None
        if rt.cfg.lr_at_growth == "same-loss" and last and stage.index > 0 and stage.level == 0:
            grown = partial(steps_at_loss, made.frontier)
        held = {} if levels is None else dict(sharded=levels.sharded(stage.model),
                                               fpt=levels.fpt[stage.level])
        state, final_optim = run_stage(rt, stage.model, stage.steps, stage.lr_scale, stage.level,
                                       state, optim_state, bar, phase=stage.phase, carried=carried,
                                       hand_on=carry and not last, stop=stop, grown=grown, **held)
        if state.stage_step < stage.steps:  # --grow-when slope ended it: the rest goes up
            cycle.end_stage_early(stage.index, state.stage_step)
            _print(bar, f"grew after {state.stage_step} of {stage.steps} steps at the coarse "
                        f"level (--grow-when slope); the way up trains the rest")
        previous = final_optim
    if point is not None:  # every stage was complete: resumed after the very end
        state = point.state
    _save_final(rt, cycle.result() if levels is None else levels.materialize(cycle.result()),
                "vcycle")
    return state


def _sharded_levels(rt: Runtime, cycle) -> ShardedLevels | None:
    """Under ``--fsdp`` on several processes with ``--fsdp-transitions tensor``: the cycle's
    levels moved to the meta device, their weights sharded (``driver.sharded``)."""
    if not (rt.cfg.fsdp and rt.distributed and rt.cfg.fsdp_transitions == "tensor"):
        return None
    ids = rt.train_batches.get(0, 0)[0][:1]

    def flops_of(level):
        return lm_training_flops_per_token(level, ids.to(next(level.parameters()).device))

    return ShardedLevels(rt, cycle, flops_of)


def _resume_in(rt: Runtime, point: Point, stage, cycle, state: RunState,
               levels: ShardedLevels | None = None):
    """The first stage a resumed V-cycle runs, from the driver checkpoint ``point`` (see
    :func:`run_vcycle`): (state, optimizer state, carried optimizer state by name)."""
    at = point.state.stage
    if stage.index == at:  # inside the stage: its weights and optimizer are in the checkpoint
        state, optim_state = _restore(rt, point, stage.model, state)
        return state, optim_state, None
    if stage.index == at + 1 and point.state.stage_step == cycle.schedule[at].steps:
        carried = None
        if rt.cfg.carries_optimizer and levels is not None:  # sharded, as the run saved it
            carried = levels.carry(stage, levels.saved_optimizer(stage.transition[2],
                                                                 point.dir / "dcp"))
        elif rt.cfg.carries_optimizer:  # the optimizer of the stage that ended, saved at its end
            carried = stage.map_optimizer_state(
                saved_optimizer_by_name(rt, point, stage.transition[2]))
        if levels is not None:
            levels.release()
        state = point.state
        restore_rng(rt, point)
        state.stage, state.stage_step = stage.index, 0
        return state, None, carried
    raise ConfigError(f"--resume {rt.out}: the driver checkpoint is in stage {at} but "
                      f"the V-cycle checkpoint in {rt.out / 'vcycle'} continues at "
                      f"stage {stage.index}; the run directory was changed by hand")


def _save_final(rt: Runtime, module: torch.nn.Module, schedule: str) -> None:
    """The trained level-0 weights (they load with strict=True into vcyclefx.zoo.gpt.GPT, or into
    the ``--model`` class); a Hugging Face ``--model`` is also written as ``<schedule>-hf/``,
    what ``from_pretrained`` loads."""
    if rt.master:
        save_tensors(rt.out / f"{schedule}.safetensors", module.state_dict(keep_vars=True))
        if rt.cfg.model:
            save_hf(module, rt.out / f"{schedule}-hf")


def _print(bar: ProgressBar | None, text: str) -> None:
    """Print above the progress bar (or plainly when there is none)."""
    if bar is not None and bar.active:
        bar.write(text)
    else:
        print(text, flush=True)


def train(rt: Runtime) -> None:
    cfg = rt.cfg
    order = schedule_order(cfg)
    point = rt.resume_point
    made = make_cycle(rt) if "vcycle" in order and "vcycle" not in rt.done else None
    for name in order:
        if name in rt.done:
            continue
        here = point if point is not None and point.state.schedule == name else None
        bar = ProgressBar(schedule_steps(cfg, name), here.state.step if here else 0, name,
                          enabled=rt.master and not cfg.quiet)
        try:
            if name.startswith("baseline") or parse_alone(name):
                state = run_baseline(rt, here, bar, name)
            else:
                if ((cfg.grow_when == "slope" or cfg.lr_at_growth == "same-loss")
                        and made.frontier is None):
                    made.frontier = _own_frontier(rt)
                state = run_vcycle(rt, made, here, bar)
        finally:
            bar.close()
        rt.done[name] = state.val_loss
        record(rt, state, 0, "end", val_loss=state.val_loss)


def train_vcycle_on(cfg: TrainConfig, model: torch.nn.Module, train_batches, out: Path,
                    val_batches=None) -> tuple[torch.nn.Module, list[dict]]:
    """The driver's V-cycle recipe (``run_vcycle``: its optimizer, learning rates, clipping,
    carried moments, stages) on ``model`` and the batches of ``train_batches`` (anything with
    ``.get(step, micro) -> (inputs (B, T), targets (B, T))``, like ``driver.data.Batches``), in
    this process on ``cfg.device`` (``auto``: CUDA if present). Metrics, checkpoints and the
    result are written under ``out``. Returns (the trained level 0, the metrics records). The
    integrations' tests train the same model on the same batches and compare."""
    cfg = cfg.replace(schedule="vcycle", out=str(out), resume="")
    dev = _device(cfg, 0)
    out.mkdir(parents=True, exist_ok=True)
    rt = Runtime(cfg=cfg, out=out, device=dev, autocast_dtype=_autocast_dtype(cfg, dev),
                 compile=bool(cfg.compile), rank=0, world=1, local_rank=0, data=None,
                 train_batches=train_batches, val_batches=val_batches or train_batches,
                 logger=MetricLogger(out / "metrics.jsonl"))
    made = make_cycle(rt, model)
    try:
        run_vcycle(rt, made, None, None)
    finally:
        rt.logger.close()
    return made.cycle.result(), read_metrics(out / "metrics.jsonl")


def main(cfg: TrainConfig) -> dict | None:
    """Run the recipe; returns the summary on rank 0 (None on other ranks)."""
    rt = None
    try:
        rt = setup(cfg)
        if rt.master:
            print(f"vcyclefx train: {rt.data.source}; {len(rt.data.train):,} train / "
                  f"{len(rt.data.val):,} val tokens; device {rt.device}, world {rt.world}, "
                  f"compile {rt.compile}, out {rt.out}", flush=True)
            note = regime_note(rt.cfg, sum(p.numel() for p in new_model(rt).parameters()),
                               coarse_params(rt.cfg))
            if note:
                print(note, flush=True)
        train(rt)
        rt.logger.close()
        if torch.distributed.is_initialized():
            # every rank's collectives (FSDP2's last reduce-scatters) done before any rank tears
            # its process group down: a rank that destroyed it with gloo work in flight was seen
            # to abort at exit ("terminate called without an active exception")
            torch.distributed.barrier()
        return finish(rt.out, rt.cfg) if rt.master else None
    finally:
        cleanup(rt)
