"""The V-cycle inside a Hugging Face ``transformers.Trainer``: one Trainer run per stage.

A Trainer cannot change its model's shapes in the middle of a run, so every stage of the cycle
is its own ``Trainer.train()`` on ``stage.module()`` (the user's class at the stage's sizes,
holding the level's own tensors), glued into one training run::

    from transformers import Trainer, TrainingArguments
    from vcyclefx.integrations.hf import train_vcycle

    def make_trainer(model, args, run):        # run: the stage (run.level, run.phase, ...)
        return Trainer(model=model, args=args, train_dataset=data)

    args = TrainingArguments("out", learning_rate=1e-3, warmup_steps=20,
                             lr_scheduler_type="cosine", per_device_train_batch_size=8)
    final = train_vcycle(model, example_inputs, make_trainer, args,
                         levels=2, width=0.5, depth=0.5, total_steps=1000)

Per stage ``make_trainer`` gets a copy of ``args`` with ``output_dir=<output_dir>/stage-NNN``,
``max_steps`` = the stage's steps, ``learning_rate`` = ``args.learning_rate`` x the stage's
``lr_scale``, ``data_seed`` = ``args.data_seed`` (or ``args.seed``) + the stage index (each stage
draws a new shuffle instead of replaying the first batches) and the input tokens counted. The
integration then
- builds the Trainer's own optimizer (``Trainer.create_optimizer``: ``args.optim``, its weight
  decay groups, betas) and loads into it the previous stage's AdamW moments mapped through the
  transition by parameter name (``Stage.map_optimizer_state``; the Trainer's state is keyed by
  position, ``vcyclefx.train.optim_state`` translates);
- gives it the driver's ``--lr-schedule global`` learning rate: one warm-up of
  ``args.get_warmup_steps(total steps)`` and one decay over the whole cycle
  (``lr_scheduler_type`` cosine / cosine_with_min_lr: cosine to ``lr_scheduler_kwargs["min_lr"]``
  or ``min_lr_rate``; constant / constant_with_warmup: flat), ``stage_warmup`` ramp steps at the
  start of every later stage;
- adds to every log entry (what ``report_to`` receives, and ``state.log_history``) the stage's
  ``level``, ``phase``, ``stage`` and the cycle's ``global_step``, ``tokens`` and ``flops``
  (``VCycle.flops_per_token`` at the example inputs' length x tokens), and appends each entry to
  ``<output_dir>/metrics.jsonl``;
- resumes (``resume=True``) from the cycle's stage checkpoint (``<output_dir>/vcycle``) and the
  Trainer's latest ``checkpoint-N`` of the stage in progress (``save_strategy`` is yours);
- writes the final model with ``save_pretrained`` to ``<output_dir>/final`` and returns it (the
  user's class at the original sizes; ``from_pretrained`` loads it).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from vcyclefx.driver.logger import MetricLogger
from vcyclefx.errors import ScheduleError, VCycleError
from vcyclefx.integrations._cycle import StageRun, open_cycle, run_stages
from vcyclefx.store import atomic_directory
from vcyclefx.train.optim_state import load_optimizer_state_by_name, optimizer_state_by_name

_COSINE = ("cosine", "cosine_with_min_lr")
_CONSTANT = ("constant", "constant_with_warmup")


def _min_lr_ratio(args) -> float:
    """The floor of the decay as a fraction of the peak learning rate."""
    kind = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    if kind in _CONSTANT:
        return 1.0
    if kind not in _COSINE:
        raise ScheduleError(f"TrainingArguments.lr_scheduler_type={kind!r}: the V-cycle runs one "
                            "schedule over all its stages, a cosine (the driver's --lr-schedule "
                            f"global) or a constant; choose one of {', '.join(_COSINE + _CONSTANT)}")
    kw = args.lr_scheduler_kwargs or {}
    if "min_lr" in kw:
        return float(kw["min_lr"]) / args.learning_rate
    return float(kw.get("min_lr_rate", 0.0))


def _stage_args(args, run: StageRun):
    seed = args.data_seed if args.data_seed is not None else args.seed
    counted = args.include_num_input_tokens_seen
    return dataclasses.replace(
        args, output_dir=str(run.dir), max_steps=run.steps,
        learning_rate=args.learning_rate * run.lr_scale, data_seed=seed + run.index,
        include_num_input_tokens_seen="all" if counted in ("no", False) else counted)


def _fields_callback(run: StageRun, log: MetricLogger):
    from transformers import TrainerCallback

    class StageFields(TrainerCallback):
        """Adds the cycle's fields to every log entry before the reporting callbacks see it."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            fields = run.fields(state.global_step, state.num_input_tokens_seen)
            logs.update(fields)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(fields)
            log.log_dict(dict(logs))

    return StageFields()


def train_vcycle(model, example_inputs, make_trainer, args, *, resume: bool = False,
                 stage_warmup: int = 0, **cycle_options):
    """Train ``model`` (a Hugging Face ``PreTrainedModel``, or any module ``vf.to_module``
    rebuilds) with the V-cycle, one ``make_trainer(model, args, run)`` Trainer per stage (module
    docstring). ``cycle_options`` are ``vf.VCycle``'s (``levels``, ``width``, ``depth``,
    ``alpha``, ``total_steps`` or ``steps``, ``fractions``, ``lr_scales``, ...). Returns the
    trained model, an instance of the user's class at the original sizes."""
    import torch
    from transformers.trainer_utils import get_last_checkpoint

    root = Path(args.output_dir)
    min_ratio = _min_lr_ratio(args)
    writer = args.process_index == 0  # one process writes the cycle's files
    cycle = open_cycle(model, example_inputs, root, resume, cycle_options, writer)
    warmup = args.get_warmup_steps(cycle.schedule.total_steps)
    log = MetricLogger(root / "metrics.jsonl" if writer else None)

    def train_stage(run: StageRun, carried: dict | None) -> tuple[dict, int]:
        module = run.stage.module()
        trainer = make_trainer(module, _stage_args(args, run), run)
        if trainer.model is not module:
            raise VCycleError("make_trainer(model, args, run) must return a Trainer of the model it "
                              "is given (Trainer(model=model, args=args, ...)): that module holds "
                              f"stage {run.index}'s tensors")
        trainer.create_optimizer()
        if carried:
            load_optimizer_state_by_name(trainer.optimizer, run.stage.model, carried)
        trainer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            trainer.optimizer, lambda k: run.lr_factor(k, warmup=warmup,
                                                       min_lr_ratio=min_ratio,
                                                       stage_warmup=stage_warmup))
        # first, so that report_to's callbacks (TensorBoard, W&B, ...) see the fields
        trainer.callback_handler.callbacks.insert(0, _fields_callback(run, log))
        last = get_last_checkpoint(str(run.dir)) if run.resume and run.dir.is_dir() else None
        trainer.train(resume_from_checkpoint=last)
        return (optimizer_state_by_name(trainer.optimizer, run.stage.model),
                int(trainer.state.num_input_tokens_seen))

    try:
        run_stages(cycle, root, resume, train_stage, writer)
    finally:
        log.close()
    final = cycle.result(as_module=True)
    if writer and hasattr(final, "save_pretrained"):
        with atomic_directory(root / "final") as tmp:
            final.save_pretrained(str(tmp))
    return final
