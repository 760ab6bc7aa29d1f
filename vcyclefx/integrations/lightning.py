"""The V-cycle inside Lightning: one ``Trainer.fit()`` per stage of a LightningModule whose
network is an attribute (``self.net``).

Lightning cannot change a module's shapes in the middle of a fit, so each stage sets the
attribute to ``stage.module()`` (the user's class at the stage's sizes, holding the level's own
tensors) and fits it once::

    import lightning as L
    from vcyclefx.integrations.lightning import fit_vcycle

    def make_trainer(run):           # run.steps, run.dir, run.level, run.phase, ...
        return L.Trainer(max_steps=run.steps, default_root_dir=run.dir, gradient_clip_val=1.0)

    net = fit_vcycle(lit, "net", example_inputs, make_trainer, lambda run: loader, "out",
                     warmup=20, min_lr_ratio=0.1, levels=2, width=0.5, depth=0.5, total_steps=1000)

A callback the integration adds to each stage's Trainer
- at ``on_fit_start`` (the optimizers of ``configure_optimizers`` exist, a checkpoint's state is
  not yet restored) records each param group's learning rate as its peak and loads the previous
  stage's AdamW moments mapped through the transition by parameter name
  (``Stage.map_optimizer_state``; ``vcyclefx.train.optim_state`` translates the positional
  state, finding each optimizer parameter's name in the stage's model by identity);
- before every batch sets each group's learning rate to its peak x the stage's ``lr_scale`` x the
  driver's ``--lr-schedule global`` factor (one warm-up of ``warmup`` steps, one cosine decay
  to ``min_lr_ratio`` x the peak over the whole cycle; ``configure_optimizers`` must return no
  scheduler);
- logs ``vcycle/level``, ``vcycle/phase`` (0 down, 1 bottom, 2 up), ``vcycle/stage``,
  ``vcycle/tokens``, ``vcycle/flops`` and ``vcycle/lr`` to the Trainer's loggers at the cycle's
  global step every ``log_every_n_steps``, and appends every step (with the loss
  ``training_step`` returned) to ``<output_dir>/metrics.jsonl``.
Resuming (``resume=True``) continues from the cycle's stage checkpoint and the newest ``*.ckpt``
under the stage's ``run.dir`` (give it to the Trainer as ``default_root_dir``). Returns the
trained network (the user's class at the original sizes), also left in ``module.<attr>``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from vcyclefx.driver.logger import MetricLogger
from vcyclefx.errors import VCycleError
from vcyclefx.integrations._cycle import StageRun, open_cycle, run_stages
from vcyclefx.train.optim_state import load_optimizer_state_by_name, optimizer_state_by_name

_PEAK = "vcyclefx_peak_lr"  # kept in each param group (saved and restored with checkpoints)


def _first_tensor_numel(batch) -> int:
    """Tokens of a batch: the elements of its first tensor (token ids ``(B, T)``)."""
    if isinstance(batch, torch.Tensor):
        return batch.numel()
    items = batch.values() if isinstance(batch, dict) else batch
    for item in items:
        n = _first_tensor_numel(item)
        if n:
            return n
    return 0


def _newest_checkpoint(folder: Path) -> str | None:
    found = sorted(folder.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    return str(found[-1]) if found else None


def _stage_callback(run: StageRun, carried, log: MetricLogger, schedule: dict, tokens_in):
    from lightning.pytorch.callbacks import Callback

    class VCycleStage(Callback):
        """The cycle's optimizer state, learning rate and counts in one stage's fit."""

        def __init__(self):
            self.tokens = 0
            self.final: dict | None = None

        def on_fit_start(self, trainer, pl_module):
            if trainer.lr_scheduler_configs:
                raise VCycleError("configure_optimizers returns a learning-rate scheduler: the "
                                  "V-cycle sets the learning rate of every step itself (one "
                                  "schedule over all stages); return the optimizer only")
            if len(trainer.optimizers) != 1:
                raise VCycleError(f"configure_optimizers returns {len(trainer.optimizers)} "
                                  "optimizers; the V-cycle carries the state of exactly one")
            opt = trainer.optimizers[0]
            for group in opt.param_groups:
                group[_PEAK] = group["lr"]
            if carried:
                load_optimizer_state_by_name(opt, run.stage.model, carried)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            factor = run.lr_factor(trainer.global_step, **schedule) * run.lr_scale
            for group in trainer.optimizers[0].param_groups:
                group["lr"] = group[_PEAK] * factor

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.tokens += tokens_in(batch)
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            step = trainer.global_step
            fields = run.fields(step, self.tokens)
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            log.log_dict({**fields, "loss": float(loss), "lr": lr})
            if step % max(1, trainer.log_every_n_steps) == 0:
                numbers = {f"vcycle/{k}": v for k, v in fields.items()
                           if k not in ("phase", "global_step")}
                numbers.update({"vcycle/phase": run.phase_index(), "vcycle/lr": lr})
                for logger in trainer.loggers:
                    logger.log_metrics(numbers, step=fields["global_step"])

        def on_train_end(self, trainer, pl_module):
            self.final = optimizer_state_by_name(trainer.optimizers[0], run.stage.model)

        def state_dict(self):
            return {"tokens": self.tokens}

        def load_state_dict(self, state_dict):  # a resumed stage's tokens so far
            self.tokens = state_dict["tokens"]

    return VCycleStage()


def fit_vcycle(module, attr: str, example_inputs, make_trainer, train_dataloaders, output_dir,
               *, warmup: int = 0, min_lr_ratio: float = 0.0, stage_warmup: int = 0,
               resume: bool = False, tokens_in=_first_tensor_numel, **cycle_options):
    """Train ``getattr(module, attr)`` (the LightningModule ``module``'s network) with the
    V-cycle, one ``make_trainer(run).fit(module, train_dataloaders(run))`` per stage (module
    docstring). ``warmup``: warm-up steps at the start of the cycle; ``min_lr_ratio``: the floor
    of the cosine as a fraction of each group's peak (the learning rate ``configure_optimizers``
    gives it; the driver's ``--min-lr / --lr``); ``stage_warmup``: ramp steps at the start of
    every later stage; ``tokens_in(batch)``: the tokens of a batch (default: the elements of its
    first tensor). ``cycle_options`` are ``vf.VCycle``'s. Returns the trained network."""
    root = Path(output_dir)
    net = getattr(module, attr, None)
    if not isinstance(net, torch.nn.Module):
        raise VCycleError(f"{type(module).__name__}.{attr} is not an nn.Module: name the attribute "
                          "that holds the network (e.g. attr='net' for self.net)")
    writer = int(os.environ.get("RANK", 0)) == 0  # one process writes the cycle's files
    cycle = open_cycle(net, example_inputs, root, resume, cycle_options, writer)
    log = MetricLogger(root / "metrics.jsonl" if writer else None)

    def train_stage(run: StageRun, carried: dict | None) -> tuple[dict, int]:
        mine = run.stage.module()
        setattr(module, attr, mine)
        schedule = dict(warmup=warmup, min_lr_ratio=min_lr_ratio, stage_warmup=stage_warmup)
        trainer = make_trainer(run)
        if trainer.max_steps != run.steps:
            raise VCycleError(f"make_trainer(run) made a Trainer with max_steps="
                              f"{trainer.max_steps} for stage {run.index}, which trains "
                              f"{run.steps} steps: pass max_steps=run.steps")
        cb = _stage_callback(run, carried, log, schedule, tokens_in)
        trainer.callbacks.insert(0, cb)  # before ModelCheckpoint: a checkpoint has its counts
        ckpt = _newest_checkpoint(run.dir) if run.resume else None
        trainer.fit(module, train_dataloaders=train_dataloaders(run), ckpt_path=ckpt)
        return cb.final, cb.tokens

    try:
        run_stages(cycle, root, resume, train_stage, writer)
    finally:
        log.close()
    final = cycle.result(as_module=True)
    setattr(module, attr, final)
    return final

