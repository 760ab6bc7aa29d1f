"""One stage of training: ``run_stage(rt, module, steps, lr_scale, level, state)`` trains any
module, the plain GPT (baseline) or a V-cycle stage's level (nanoGPT's loop).

Per stage it makes an AdamW that carries the previous stage's moments mapped through the
transition as the gradients move (the default; ``--no-carry-optimizer`` starts each stage fresh,
as the paper does), measures the training FLOPs per token of that module from its graph
(:func:`lm_training_flops_per_token`), compiles it on CUDA, wraps it in DDP (or shards it with
FSDP2) when several processes run (``Trainee``), and steps it with the learning rate of
``driver.schedule``, gradient accumulation and clipping.

MFU (per device) = training FLOPs per token * tokens/s over all processes
                   / (world size * --peak-flops).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from vcyclefx.driver.checkpoint import load_sharded, save_checkpoint
from vcyclefx.driver.config import TrainConfig
from vcyclefx.driver.logger import ProgressBar
from vcyclefx.driver.models import lm_loss
from vcyclefx.driver.parallel import Trainee, _optimized
from vcyclefx.driver.runtime import RunState, Runtime
from vcyclefx.driver.schedule import stage_lr
from vcyclefx.train.flops import training_flops_per_token


def _loss_on_inputs(out, inputs: tuple) -> torch.Tensor:
    return lm_loss(out, inputs[0])  # the ids as targets: only the shapes matter for counting


def lm_training_flops_per_token(module: torch.nn.Module, ids: torch.Tensor) -> float:
    """What the driver records as ``flops_per_token``: ``vcyclefx.train.flops`` on token ids
    ``(B, T)`` with the training loss (cross-entropy; it adds no counted FLOPs)."""
    return training_flops_per_token(module, (ids,), loss=_loss_on_inputs)


def make_optimizer(module: torch.nn.Module, cfg: TrainConfig, lr: float,
                   device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (nanoGPT); fused on CUDA (not with
    ``--cpu-offload``, whose optimizer steps on the CPU)."""
    matrices, vectors = _optimized(module)
    groups = [{"params": matrices, "weight_decay": cfg.weight_decay},
              {"params": vectors, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type == "cuda" and not cfg.cpu_offload)


@torch.no_grad()
def evaluate(rt: Runtime, module: torch.nn.Module) -> float:
    """Mean validation loss over the same ``eval_batches`` batches every time (shared by ranks).

    The uncompiled module is used. With dropout 0 a GPT computes the same function in train and
    eval mode, and switching a level's mode regenerates its code (which would make
    torch.compile recompile after every evaluation), so the mode is switched only when
    dropout > 0.
    """
    switch = rt.cfg.dropout > 0
    if switch:
        module.eval()
    total = torch.zeros((), device=rt.device, dtype=torch.float64)
    # every rank runs the same number of forwards (FSDP gathers weights in each one); a rank
    # with no batch left repeats its first one and does not count it
    for k in range(math.ceil(rt.cfg.eval_batches / rt.world)):
        i = k * rt.world + rt.rank
        x, y = rt.val_batches.get(0, i if i < rt.cfg.eval_batches else rt.rank)
        with rt.autocast():
            out = module(x)  # logits (B, T, vocab)
        if i < rt.cfg.eval_batches:
            total += lm_loss(out, y).double()
    if rt.distributed:
        dist.all_reduce(total)
    if switch:
        module.train()
    return total.item() / rt.cfg.eval_batches


class _Clock:
    """Seconds spent training. Read (after a device sync, so queued GPU work is counted) only
    when the loop stops for an event; evaluation and checkpoints happen while it is stopped."""

    def __init__(self, device: torch.device):
        self.device, self._t = device, time.perf_counter()

    def restart(self) -> None:
        self._t = time.perf_counter()

    def lap(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - self._t


class _Window:
    """The training loss and throughput since the last ``train`` record."""

    def __init__(self, rt: Runtime, state: RunState):
        self.loss_sum, self.n = torch.zeros((), device=rt.device), 0
        self.tokens, self.wall = state.tokens, state.wall

    def take(self, rt: Runtime, state: RunState) -> tuple[float, float]:
        """(mean loss over every micro-batch on every rank, tokens/s); starts a new window."""
        if rt.distributed:
            dist.all_reduce(self.loss_sum)
        loss = self.loss_sum.item() / self.n
        self.loss_sum.zero_()
        self.n = 0
        tok_s = (state.tokens - self.tokens) / max(1e-9, state.wall - self.wall)
        self.tokens, self.wall = state.tokens, state.wall
        return loss, tok_s


def record(rt, state, level, event, **values) -> dict:
    """One metrics record: the run's position and totals, then ``values``."""
    base = dict(event=event, schedule=state.schedule, stage=state.stage, level=level,
                step=state.step, loss=None, val_loss=None, lr=None, tokens=state.tokens,
                flops=state.flops, wall=round(state.wall, 4), tok_per_s=None, mfu=None)
    base.update(values)
    rt.logger.log_dict(base)
    return base


def _optimizer(rt: Runtime, t: Trainee, lr_scale: float, optim_state, carried):
    """A fresh AdamW for the stage (paper), loaded from a checkpoint's ``optim_state`` (a
    state_dict, or the path of a ``--fsdp`` checkpoint's ``dcp/``) or from ``carried``."""
    opt = make_optimizer(t.local, rt.cfg, rt.cfg.lr * lr_scale, rt.device)
    if isinstance(optim_state, Path):
        load_sharded(t, opt, optim_state)
    elif optim_state is not None:
        t.load_optimizer(opt, optim_state)
    elif carried is not None:
        t.load_by_name(opt, carried)
    return opt


def _step(rt: Runtime, t: Trainee, opt, state: RunState, lr: float, window: _Window) -> None:
    """One optimizer step at ``lr``: this rank's micro-batches (their losses added to
    ``window``), gradients synchronised on the last only, clipping."""
    cfg = rt.cfg
    for g in opt.param_groups:
        g["lr"] = lr
    local_accum = cfg.grad_accum // rt.world
    for micro in range(local_accum):
        x, y = rt.train_batches.get(state.step, rt.rank * local_accum + micro)  # (B, T) each
        with t.grad_sync(micro == local_accum - 1):
            with rt.autocast():
                out = t.model(x)  # logits (B, T, vocab)
            loss = lm_loss(out, y)
            (loss / local_accum).backward()
        window.loss_sum += loss.detach()
    window.n += cfg.grad_accum  # micro-batches of every rank: the loss sum is all-reduced
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(t.local.parameters(), cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def run_stage(rt: Runtime, module: torch.nn.Module, steps: int, lr_scale: float, level: int,
              state: RunState, optim_state: dict | None = None, bar: ProgressBar | None = None,
              phase: str = "", carried: dict[str, dict] | None = None,
              hand_on: bool = False, stop=None, sharded: torch.nn.Module | None = None,
              fpt: float | None = None, grown=None) -> tuple[RunState, dict | None]:
    """Train ``module`` (GPT or a level) for the remaining steps of the stage ``state`` is in.

    The optimizer starts fresh, or from ``optim_state`` (a checkpoint's: a state_dict, or the
    path of a ``--fsdp`` checkpoint's ``dcp/``, which also holds the weights), or from
    ``carried`` (the previous stage's state mapped to this stage's parameters, keyed by name;
    ``--carry-optimizer``). Returns the state and, with ``hand_on`` (a next stage will carry
    it), the optimizer's final state by name, whole tensors on every rank
    (``Trainee.state_by_name``; under FSDP a gather, so only made when it is used), else None.
    ``module`` holds the trained weights when it returns (also under FSDP, which trains a
    sharded copy). Each step is followed by its log, eval and checkpoint events. ``stop``
    (``--grow-when slope``): called with the state after every evaluation; when it returns True
    the stage ends there (a ``grow`` record, then the stage-end log and checkpoint).
    ``sharded`` (``--fsdp-transitions tensor``): ``module`` is a level on the meta device and
    ``sharded`` the FSDP2 module holding its weights, trained in place (``module`` stays on the
    meta device); ``fpt`` its training FLOPs per token; the optimizer itself is handed on
    (``ShardedLevels.carry`` maps its moments). ``grown`` (``--lr-at-growth same-loss``, the
    last stage): called as ``grown(val_loss, flops_per_step)`` at the stage's start, it gives
    ``state.lr_from``, the steps a from-scratch full model needs to reach that loss
    (``driver.schedule``); recorded as a ``lr_at_growth`` event.
    """
    cfg = rt.cfg
    t = Trainee(rt, module, sharded)
    if fpt is None:
        fpt = lm_training_flops_per_token(t.raw, rt.train_batches.get(0, 0)[0][:1].to(t.raw_device))
    opt = _optimizer(rt, t, lr_scale, optim_state, carried)
    if state.stage_step == 0:
        record(rt, state, level, "stage", steps=steps, lr_scale=lr_scale, phase=phase,
               flops_per_token=fpt, optimizer="fresh" if carried is None else "carried",
               params=sum(p.numel() for p in t.raw.parameters()))
        state.val_loss = evaluate(rt, t.local)
        record(rt, state, level, "eval", val_loss=state.val_loss)
        if grown is not None:
            state.lr_from = grown(state.val_loss, fpt * cfg.tokens_per_step)
            record(rt, state, level, "lr_at_growth", lr_from=state.lr_from,
                   lr=stage_lr(cfg, state, steps, lr_scale))
    window, clock = _Window(rt, state), _Clock(rt.device)
    while state.stage_step < steps:
        lr = stage_lr(cfg, state, steps, lr_scale)
        _step(rt, t, opt, state, lr, window)
        state.step, state.stage_step = state.step + 1, state.stage_step + 1
        state.tokens += cfg.tokens_per_step
        state.flops += fpt * cfg.tokens_per_step
        end = state.stage_step == steps
        do_eval = (cfg.eval_every and state.step % cfg.eval_every == 0) or end
        do_ckpt = (cfg.ckpt_every and state.step % cfg.ckpt_every == 0) or end
        # a checkpoint step also logs, so no partial loss average has to be saved
        do_log = state.step % cfg.log_every == 0 or do_ckpt
        if not (do_log or do_eval or do_ckpt):
            continue
        state.wall += clock.lap()
        if do_log:
            loss, tok_s = window.take(rt, state)
            record(rt, state, level, "train", loss=loss, lr=lr, tok_per_s=tok_s,
                   mfu=fpt * tok_s / (rt.world * cfg.peak_flops))
            if bar is not None:
                bar.update(state.step, level, loss, tok_s)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {state.step} (level {level}): "
                                         "lower --lr, or use --dtype float32 to check")
        if do_eval:
            state.val_loss = evaluate(rt, t.local)
            record(rt, state, level, "eval", val_loss=state.val_loss)
            if not end and stop is not None and stop(state):
                record(rt, state, level, "grow", steps=state.stage_step, planned_steps=steps)
                steps, do_ckpt = state.stage_step, True  # the stage ends here
                if not do_log:  # a stage end logs, as a checkpoint step does
                    loss, tok_s = window.take(rt, state)
                    record(rt, state, level, "train", loss=loss, lr=lr, tok_per_s=tok_s,
                           mfu=fpt * tok_s / (rt.world * cfg.peak_flops))
        if do_ckpt:
            save_checkpoint(rt, t, opt, state)
        clock.restart()
    t.finish()
    if not hand_on:
        return state, None
    return state, (opt if sharded is not None else t.state_by_name(opt))
