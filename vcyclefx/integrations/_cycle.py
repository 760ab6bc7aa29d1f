"""What every integration shares: one library run per V-cycle stage, glued into one training run.

``run_stages(cycle, root, train_stage)`` iterates a :class:`~vcyclefx.train.vcycle.VCycle` whose
stage checkpoints are in ``root/vcycle``. For each stage it hands ``train_stage`` a
:class:`StageRun` (the stage, its folder ``root/stage-NNN`` for the library's own checkpoints and
logs, the global step/token/FLOP count before it, the learning-rate factor of the driver's
``--lr-schedule global``) and the AdamW state of the previous stage mapped through the
transition by ``Stage.map_optimizer_state`` (keyed by the parameter names of the stage's model).
``train_stage`` returns the optimizer's final state by name and the tokens the stage trained on.
At the end of a stage its weights, that optimizer state and the running totals are written to
``root/stage-NNN/end`` (atomically), before the cycle writes its own stage checkpoint.

Resuming (``resume=True``): the cycle continues after its last checkpointed stage; the optimizer
state to carry and the totals come from that stage's ``end``; a stage whose ``end`` exists (it
finished, the cycle's checkpoint of it was not yet written) is taken from there instead of being
trained again; a stage in progress continues from the library's own latest checkpoint in its
folder (``StageRun.resume``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from vcyclefx.driver.schedule import global_lr
from vcyclefx.errors import ScheduleError
from vcyclefx.store import atomic_directory, load_tensors, save_tensors
from vcyclefx.train.vcycle import PHASES, Stage, VCycle

_END = "end"


@dataclass(frozen=True)
class Totals:
    """The cycle's global counts after a stage."""

    step: int = 0
    tokens: int = 0
    flops: float = 0.0


@dataclass
class StageRun:
    """One stage as a library run sees it."""

    stage: Stage
    dir: Path  # the library's output folder for this stage (checkpoints, logs)
    before: Totals  # global step, tokens and FLOPs of the stages before this one
    flops_per_token: float  # training FLOPs per token of this stage's level (VCycle.flops_per_token)
    total_steps: int  # of the whole cycle
    first: bool  # the cycle's first stage (no ramp)
    resume: bool  # continue from the library's latest checkpoint in ``dir``, if any

    index = property(lambda self: self.stage.index)
    level = property(lambda self: self.stage.level)
    phase = property(lambda self: self.stage.phase)
    steps = property(lambda self: self.stage.steps)
    lr_scale = property(lambda self: self.stage.lr_scale)

    def lr_factor(self, stage_step: int, *, warmup: int, min_lr_ratio: float,
                  stage_warmup: int = 0) -> float:
        """The factor on the stage's peak learning rate (base lr x ``lr_scale``) at
        ``stage_step``: the driver's ``--lr-schedule global`` (``driver.schedule.global_lr``):
        one warm-up of ``warmup`` steps and one cosine decay to ``min_lr_ratio`` over the whole
        cycle, and a ramp over the first ``stage_warmup`` steps of every later stage."""
        return global_lr(self.before.step + stage_step, stage_step, self.first,
                         steps=self.total_steps, warmup=warmup, stage_warmup=stage_warmup,
                         lr=1.0, min_lr=min_lr_ratio)

    def fields(self, stage_step: int, stage_tokens: int) -> dict:
        """What every log entry of the stage carries: where in the cycle it is and the global
        counts after ``stage_step`` steps and ``stage_tokens`` tokens of this stage."""
        return {"level": self.level, "phase": self.phase, "stage": self.index,
                "global_step": self.before.step + stage_step,
                "tokens": self.before.tokens + stage_tokens,
                "flops": self.before.flops + self.flops_per_token * stage_tokens}

    def phase_index(self) -> int:
        """``phase`` as a number for loggers that take numbers only: 0 down, 1 bottom, 2 up."""
        return PHASES.index(self.phase)


def stage_dir(root: Path, index: int) -> Path:
    return Path(root) / f"stage-{index:03d}"


def open_cycle(model, example_inputs, root: Path, resume: bool, options: dict,
               writer: bool = True) -> VCycle:
    """The VCycle of an integration run in ``root`` (stage checkpoints in ``root/vcycle``, written
    by the ``writer`` process only: rank 0 of a multi-process run). A fresh run refuses a folder
    that already holds one (pass ``resume=True`` to continue it)."""
    root = Path(root)
    vdir = root / "vcycle"
    for bad in ("checkpoint_dir", "resume", "write_checkpoints"):
        if bad in options:
            raise ScheduleError(f"VCycle option {bad}= is set by the integration (checkpoints in "
                                f"{vdir}); pass resume=True to continue a run instead")
    if not resume and (vdir.exists() or any(root.glob("stage-*"))):
        raise ScheduleError(f"{root} already holds a V-cycle run: pass resume=True to continue it, "
                            "or choose another output folder")
    return VCycle(model, example_inputs, checkpoint_dir=vdir, resume=vdir if resume else None,
                  write_checkpoints=writer, **options)


def _save_end(where: Path, stage: Stage, named: dict | None, totals: Totals) -> None:
    with atomic_directory(where) as tmp:
        save_tensors(tmp / "model.safetensors", stage.model.state_dict(keep_vars=True))
        torch.save(named or {}, tmp / "optimizer.pt")
        (tmp / "totals.json").write_text(json.dumps(vars(totals)))


def _load_end(where: Path) -> tuple[dict, Totals]:
    if not (where / "totals.json").is_file():
        raise ScheduleError(f"{where}: the end of this stage was not saved, so the run cannot be "
                            "resumed after it (the folder was changed by hand?)")
    named = torch.load(where / "optimizer.pt", weights_only=True, map_location="cpu")
    return named, Totals(**json.loads((where / "totals.json").read_text()))


def run_stages(cycle: VCycle, root: Path, resume: bool,
               train_stage: Callable[[StageRun, dict | None], tuple[dict, int]],
               writer: bool = True) -> Totals:
    """Train every remaining stage of ``cycle`` with ``train_stage`` (module docstring); only
    the ``writer`` process writes the stage ends."""
    root = Path(root)
    start = cycle.next_stage
    previous, totals = (None, Totals()) if start == 0 else _load_end(stage_dir(root, start - 1) / _END)
    for stage in cycle:
        carried = None
        if previous:
            device = next(stage.model.parameters()).device
            carried = stage.map_optimizer_state(
                {n: {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in e.items()}
                 for n, e in previous.items()})
        folder = stage_dir(root, stage.index)
        end = folder / _END
        if resume and (end / "totals.json").is_file():  # trained; the cycle had not saved it
            stage.model.load_state_dict(load_tensors(end / "model.safetensors"), strict=True)
            previous, totals = _load_end(end)
            continue
        run = StageRun(stage, folder, totals, cycle.flops_per_token(stage.level),
                       cycle.schedule.total_steps, stage.index == 0, resume)
        named, tokens = train_stage(run, carried)
        totals = Totals(totals.step + stage.steps, totals.tokens + tokens,
                        totals.flops + run.flops_per_token * tokens)
        if writer:
            _save_end(end, stage, named, totals)
        previous = named
    return totals
