"""The training recipe: ``main(cfg)`` -> setup -> train -> cleanup (nanoGPT loop, torchtune shape).

One function trains any module, the plain GPT (baseline) or a V-cycle stage's level:
``run_stage(rt, module, steps, lr_scale, level, state)``. Per stage it makes an AdamW that
carries the previous stage's moments mapped through the transition as the gradients move (the
default; ``--no-carry-optimizer`` starts each stage fresh, as the paper does), measures the
training FLOPs per token of that module from its graph (``training_flops_per_token``), compiles
it on CUDA, wraps it in DDP (or shards it with FSDP2) when several processes run, and steps it
with cosine LR, gradient accumulation and clipping.

Learning rate with ``--lr-schedule global`` at optimizer step ``s`` of a schedule, counted over
all its stages::

    lr(s) = lr_scale(stage) * ramp(stage step) * cosine(s; steps of the schedule, warmup)
    cosine(s; n, w) = lr * (s+1)/(w+1)                                  while s < w
                    = min_lr + (lr - min_lr) * (1 + cos(pi * (s - w) / (n - w))) / 2
    ramp(k) = min(1, (k+1)/(stage_warmup+1)) for stages after the first, else 1

so baseline and V-cycle share one envelope and a coarse stage runs at ``lr_scale`` times it.
With ``--lr-schedule stage`` (the default) every stage restarts, as if each were its own run
(the authors' recipe runs each stage as a separate job with a fresh optimizer):
``lr = lr_scale * cosine(k; stage steps, warmup if first stage else stage_warmup)`` at stage
step ``k``. A baseline is one stage, so both give it the same schedule. Measured final
validation losses of the V-cycle (800 steps, stdlib corpus): 2 x 64 GPT 2.266 (stage) vs 2.304
(global), baseline 2.179; tiny preset 2.103 (stage) vs 2.083 (global), baseline 1.905 - no
clear winner at this scale; "stage" is the default because it is the authors' recipe.

MFU (per device) = training FLOPs per token * tokens/s over all processes
                   / (world size * --peak-flops).
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils import flop_counter

from vcyclefx.zoo.gpt import GPT, GPTConfig
from vcyclefx.driver.models import build_causal_lm, check_model, logits_of, save_hf
from vcyclefx.driver.runtime import Point, RunState, Runtime  # noqa: F401 (RunState re-exported)
from vcyclefx.driver.checkpoint import (load_sharded, load_weights, restore_rng, resume_config,
                                        save_checkpoint, saved_optimizer_by_name)
from vcyclefx.driver.config import ConfigError, TrainConfig, check_runtime
from vcyclefx.driver.data import Batches, TokenData, load_data
from vcyclefx.driver.logger import MetricLogger, ProgressBar
from vcyclefx.driver.parallel import (Trainee, _optimized, optimizer_state_by_name,  # noqa: F401 (re-exported)
                       optimizer_state_from_names)
from vcyclefx.store import atomic_write_text, save_tensors


# ----------------------------------------------------------------------------- FLOPs


def _sdpa_cpu_fwd(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _sdpa_cpu_bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


# FlopCounterMode knows the CUDA attention kernels but not the CPU flash kernel; without these
# two formulas attention would count as zero FLOPs on CPU.
_EXTRA_FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_fwd,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_bwd,
}


def training_flops_per_token(module: torch.nn.Module, example_input_ids: torch.Tensor) -> float:
    """FLOPs of one training step (forward, cross-entropy, backward) per input token, counted
    by ``torch.utils.flop_counter.FlopCounterMode`` on ``module`` itself.

    Pure: gradients are returned by ``torch.autograd.grad`` (``.grad`` is not touched) and the
    RNG state is restored, so calling it never changes a training run.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    devices = [example_input_ids.device] if example_input_ids.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), \
            flop_counter.FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS) as fc:
        logits = logits_of(module(example_input_ids))  # (B, T, vocab)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), example_input_ids.flatten())
        torch.autograd.grad(loss, params, allow_unused=True)
    return fc.get_total_flops() / example_input_ids.numel()


# ----------------------------------------------------------------------------- setup


def _device(cfg: TrainConfig, local_rank: int) -> torch.device:
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(want)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {cfg.device}: CUDA is not available here; use --device cpu")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise ConfigError(f"--device {cfg.device}: use cpu, cuda, cuda:N or auto")
    return dev


def _autocast_dtype(cfg: TrainConfig, dev: torch.device) -> torch.dtype | None:
    if cfg.dtype == "float32" or (cfg.dtype == "auto" and dev.type == "cpu"):
        return None
    if dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU has no bfloat16: use --dtype float32")
    return torch.bfloat16


def _out_dir(cfg: TrainConfig, rank: int, world: int) -> Path:
    name = cfg.resume or cfg.out or f"runs/{_dt.datetime.now():%Y%m%d-%H%M%S}"
    if world > 1:  # every rank must write to the directory rank 0 named
        box = [name]
        dist.broadcast_object_list(box, src=0)
        name = box[0]
    return Path(name)


def setup(cfg: TrainConfig) -> Runtime:
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = _device(cfg, local_rank)
    check_runtime(cfg, dev.type, world)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.enable_flash_sdp(True)  # bf16 SDPA dispatches to flash attention
    out = _out_dir(cfg, rank, world)
    point = None
    if cfg.resume:
        cfg, point = resume_config(cfg, out)
    else:
        if out.exists() and any(out.iterdir()):  # checked on every rank: none is left waiting
            raise ConfigError(f"output directory {out} exists and is not empty: choose another "
                              f"--out, or continue it with --resume {out}")
    # the inputs are checked (data read, vocabulary fits) before anything is written: a refused
    # run leaves no output directory behind
    data = _load_data_once(cfg, local_rank, world)
    vocab = cfg.vocab_size or data.vocab_size
    if cfg.vocab_size == 0:
        cfg = cfg.replace(vocab_size=vocab)
    if data.max_token >= vocab:
        raise ConfigError(f"--vocab-size {vocab} is too small for token id {data.max_token} in "
                          "the data: use --vocab-size 0 (from the data) or a larger one")
    check_model(cfg.model)
    train_batches = Batches(data.train, "train", cfg.batch_size, cfg.seq_len, cfg.seed, dev)
    val_batches = Batches(data.val, "val", cfg.batch_size, cfg.seq_len, cfg.seed, dev)
    if not cfg.resume:
        if world > 1:
            dist.barrier()  # every rank has looked before rank 0 writes
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "config.json", cfg.to_json())
    compile_ = cfg.compile if cfg.compile is not None else dev.type == "cuda"
    logger = MetricLogger(out / "metrics.jsonl" if rank == 0 else None,
                          truncate_to=point.metrics_offset if point else (0 if cfg.resume else None))
    return Runtime(
        cfg=cfg, out=out, device=dev, autocast_dtype=_autocast_dtype(cfg, dev), compile=compile_,
        rank=rank, world=world, local_rank=local_rank, data=data,
        train_batches=train_batches, val_batches=val_batches,
        logger=logger, resume_point=point, done=dict(point.done) if point else {},
    )


def _load_data_once(cfg: TrainConfig, local_rank: int, world: int) -> TokenData:
    """The first process of every node (LOCAL_RANK 0) builds the cache (written atomically, so
    nodes sharing one cache directory may race harmlessly); the others then only map it."""
    if world > 1 and local_rank != 0:
        dist.barrier()
    data = load_data(cfg.data, cfg.val_fraction, cfg.cache_dir, cfg.vocab_size)
    if world > 1 and local_rank == 0:
        dist.barrier()
    return data


def cleanup(rt: Runtime | None) -> None:
    if rt is not None:
        rt.logger.close()
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- the loop


def new_model(rt: Runtime) -> torch.nn.Module:
    """Level 0 with the run's initial weights (the same for every schedule of a run): the
    built-in GPT, or the ``--model`` architecture (``driver.models``)."""
    c = rt.cfg
    torch.manual_seed(c.seed)
    if c.model:
        return build_causal_lm(c.model, vocab_size=c.vocab_size, seq_len=c.seq_len, seed=c.seed)
    return GPT(GPTConfig(block_size=c.seq_len, vocab_size=c.vocab_size, n_layer=c.n_layer,
                         n_head=c.n_head, n_embd=c.n_embd, dropout=c.dropout, bias=c.bias))


def make_optimizer(module: torch.nn.Module, cfg: TrainConfig, lr: float,
                   device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (nanoGPT); fused on CUDA (not with
    ``--cpu-offload``, whose optimizer steps on the CPU)."""
    matrices, vectors = _optimized(module)
    groups = [{"params": matrices, "weight_decay": cfg.weight_decay},
              {"params": vectors, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type == "cuda" and not cfg.cpu_offload)


def baseline_name(budget: float) -> str:
    """The schedule name of the baseline at ``budget`` x ``--steps``: ``baseline`` at 1x (the one
    the "reach the baseline's final loss" figures use), else ``baseline-x1.5`` and the like."""
    return "baseline" if budget == 1.0 else f"baseline-x{budget:g}"


def schedule_steps(cfg: TrainConfig, schedule: str) -> int:
    """Optimizer steps of a whole schedule: ``--vcycle-steps`` (or ``--steps``) for the V-cycle,
    ``round(F * --steps)`` for the baseline ``baseline-xF``."""
    if schedule == "vcycle":
        return cfg.vcycle_total_steps
    if schedule.startswith("baseline-x"):
        return max(1, round(float(schedule[len("baseline-x"):]) * cfg.steps))
    return cfg.steps


def schedule_order(cfg: TrainConfig) -> list[str]:
    """What a run trains, in order: compare = every frontier baseline (1x first), then the V-cycle."""
    if cfg.schedule != "compare":
        return [cfg.schedule]
    budgets = sorted(cfg.frontier_budgets, key=lambda b: (b != 1.0, b))
    return [baseline_name(b) for b in budgets] + ["vcycle"]


def lr_at(cfg: TrainConfig, step: int, steps: int | None = None, warmup: int | None = None) -> float:
    """``cosine(step; steps, warmup)`` of the module docstring (default: the baseline's steps)."""
    steps = cfg.steps if steps is None else steps
    warmup = cfg.warmup if warmup is None else warmup
    if step < warmup:
        return cfg.lr * (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def stage_lr(cfg: TrainConfig, state: "RunState", steps: int, lr_scale: float) -> float:
    """The learning rate of the next step of the stage ``state`` is in (module docstring)."""
    first = state.stage == 0
    if cfg.lr_schedule == "stage":
        warmup = cfg.warmup if first else cfg.stage_warmup
        return lr_scale * lr_at(cfg, state.stage_step, steps, warmup)
    ramp = 1.0 if first else min(1.0, (state.stage_step + 1) / (cfg.stage_warmup + 1))
    return lr_scale * ramp * lr_at(cfg, state.step, schedule_steps(cfg, state.schedule))


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
            logits = logits_of(module(x))  # (B, T, vocab)
        if i < rt.cfg.eval_batches:
            total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()).double()
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


def _record(rt, state, level, event, **values) -> dict:
    base = dict(event=event, schedule=state.schedule, stage=state.stage, level=level,
                step=state.step, loss=None, val_loss=None, lr=None, tokens=state.tokens,
                flops=state.flops, wall=round(state.wall, 4), tok_per_s=None, mfu=None)
    base.update(values)
    rt.logger.log_dict(base)
    return base


def run_stage(rt: Runtime, module: torch.nn.Module, steps: int, lr_scale: float, level: int,
              state: RunState, optim_state: dict | None = None, bar: ProgressBar | None = None,
              phase: str = "", carried: dict[str, dict] | None = None,
              hand_on: bool = False) -> tuple[RunState, dict | None]:
    """Train ``module`` (GPT or a level) for the remaining steps of the stage ``state`` is in.

    The optimizer starts fresh, or from ``optim_state`` (a checkpoint's: a state_dict, or the
    path of a ``--fsdp`` checkpoint's ``dcp/``, which also holds the weights), or from
    ``carried`` (the previous stage's state mapped to this stage's parameters, keyed by name;
    ``--carry-optimizer``). Returns the state and, with ``hand_on`` (a next stage will carry
    it), the optimizer's final state by name, whole tensors on every rank
    (``Trainee.state_by_name``; under FSDP a gather, so only made when it is used), else None.

    Long because it is the whole nanoGPT step loop, kept in one piece so it reads top to
    bottom: micro-batches with gradient sync only on the last, clipping, the optimizer step,
    then the log, eval and checkpoint events of that step. ``module`` holds the trained weights
    when it returns (also under FSDP, which trains a sharded copy).
    """
    cfg = rt.cfg
    t = Trainee(rt, module)
    fpt = training_flops_per_token(t.raw, rt.train_batches.get(0, 0)[0][:1].to(t.raw_device))
    opt = make_optimizer(t.local, cfg, cfg.lr * lr_scale, rt.device)  # fresh per stage (paper)
    if isinstance(optim_state, Path):
        load_sharded(t, opt, optim_state)
    elif optim_state is not None:
        t.load_optimizer(opt, optim_state)
    elif carried is not None:
        t.load_by_name(opt, carried)
    if state.stage_step == 0:
        _record(rt, state, level, "stage", steps=steps, lr_scale=lr_scale, phase=phase,
                flops_per_token=fpt, optimizer="fresh" if carried is None else "carried",
                params=sum(p.numel() for p in t.raw.parameters()))
        state.val_loss = evaluate(rt, t.local)
        _record(rt, state, level, "eval", val_loss=state.val_loss)
    local_accum = cfg.grad_accum // rt.world
    loss_sum, n_losses = torch.zeros((), device=rt.device), 0
    last_tokens, last_wall = state.tokens, state.wall
    clock = _Clock(rt.device)
    while state.stage_step < steps:
        lr = stage_lr(cfg, state, steps, lr_scale)
        for g in opt.param_groups:
            g["lr"] = lr
        for micro in range(local_accum):
            x, y = rt.train_batches.get(state.step, rt.rank * local_accum + micro)  # (B, T) each
            last_micro = micro == local_accum - 1
            with t.grad_sync(last_micro):
                with rt.autocast():
                    logits = logits_of(t.model(x))  # (B, T, vocab)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
                (loss / local_accum).backward()
            loss_sum += loss.detach()
        n_losses += cfg.grad_accum
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(t.local.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
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
            if rt.distributed:
                dist.all_reduce(loss_sum)
            loss_val = loss_sum.item() / n_losses  # mean over every micro-batch on every rank
            loss_sum.zero_()
            n_losses = 0
            tok_s = (state.tokens - last_tokens) / max(1e-9, state.wall - last_wall)
            last_tokens, last_wall = state.tokens, state.wall
            _record(rt, state, level, "train", loss=loss_val, lr=lr, tok_per_s=tok_s,
                    mfu=fpt * tok_s / (rt.world * cfg.peak_flops))
            if bar is not None:
                bar.update(state.step, level, loss_val, tok_s)
            if not math.isfinite(loss_val):
                raise FloatingPointError(f"loss is {loss_val} at step {state.step} (level {level}): "
                                         "lower --lr, or use --dtype float32 to check")
        if do_eval:
            state.val_loss = evaluate(rt, t.local)
            _record(rt, state, level, "eval", val_loss=state.val_loss)
        if do_ckpt:
            save_checkpoint(rt, t, opt, state)
        clock.restart()
    t.finish()
    return state, (t.state_by_name(opt) if hand_on else None)


# ----------------------------------------------------------------------------- schedules


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
    """The plain model for the steps of the baseline ``name`` (its own warm-up and cosine)."""
    model = new_model(rt)
    state, optim_state = _restore(rt, point, model, RunState(name))
    state, _ = run_stage(rt, model, schedule_steps(rt.cfg, name), 1.0, 0, state, optim_state, bar)
    _save_final(rt, model, name)
    return state


@dataclass
class Cycle:
    """A ``vf.VCycle`` made before any training (so a V-cycle that cannot be planned fails at
    start-up, not after the baseline of a compare run) and the seconds it took."""

    cycle: object
    seconds: float


def make_cycle(rt: Runtime) -> Cycle:
    """The V-cycle over the run's level 0, captured on the training device (a captured graph
    keeps the device of its position ids). Its stage checkpoints go to ``<out>/vcycle``, written
    by rank 0; resuming continues after its last completed stage."""
    import vcyclefx as vf

    cfg = rt.cfg
    t0 = time.perf_counter()
    model = new_model(rt).to(rt.device)
    example = (rt.train_batches.get(0, 0)[0][:2],)  # (2, T): batch 2 keeps the batch dim dynamic
    vdir = rt.out / "vcycle"
    cycle = vf.VCycle(model, example, levels=cfg.levels, width=cfg.width, depth=cfg.depth,
                      alpha=cfg.alpha, total_steps=cfg.vcycle_total_steps,
                      fractions=cfg.vcycle_fractions(), lr_scales=cfg.vcycle_lr_scales(),
                      pairing=cfg.pairing, depth_pairing=cfg.depth_pairing,
                      depth_init=cfg.depth_init, checkpoint_dir=vdir, resume=vdir if cfg.resume else None,
                      write_checkpoints=rt.master)  # one writer; every rank rebuilds the same levels
    return Cycle(cycle, time.perf_counter() - t0)


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
    stages = iter(cycle)
    previous = None  # the optimizer state by name the last stage ended with, when carrying
    while True:
        t0 = time.perf_counter()
        stage = next(stages, None)  # coalescing / de-coalescing happens here: it counts as training
        carried = None
        if stage is not None and point is None and previous is not None:
            carried = stage.map_optimizer_state(previous)
        state.wall += time.perf_counter() - t0
        if stage is None:
            break
        if point is not None:
            at = point.state.stage
            done_at = point.state.stage_step == cycle.schedule[at].steps
            if stage.index == at:
                state, optim_state = _restore(rt, point, stage.model, state)
            elif stage.index == at + 1 and done_at:
                if carry:  # the optimizer of the stage that ended, saved at its end
                    carried = stage.map_optimizer_state(
                        saved_optimizer_by_name(rt, point, stage.transition[2]))
                state, optim_state = point.state, None
                restore_rng(rt, point)
                state.stage, state.stage_step = stage.index, 0
            else:
                raise ConfigError(f"--resume {rt.out}: the driver checkpoint is in stage {at} but "
                                  f"the V-cycle checkpoint in {rt.out / 'vcycle'} continues at "
                                  f"stage {stage.index}; the run directory was changed by hand")
            point = None
        else:
            state.stage, state.stage_step, optim_state = stage.index, 0, None
        last = stage.index == len(cycle.schedule) - 1
        state, final_optim = run_stage(rt, stage.model, stage.steps, stage.lr_scale, stage.level,
                                       state, optim_state, bar, phase=stage.phase, carried=carried,
                                       hand_on=carry and not last)
        previous = final_optim
    if point is not None:  # every stage was complete: resumed after the very end
        state = point.state
    _save_final(rt, cycle.result(), "vcycle")
    return state


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
            if name.startswith("baseline"):
                state = run_baseline(rt, here, bar, name)
            else:
                state = run_vcycle(rt, made, here, bar)
        finally:
            bar.close()
        rt.done[name] = state.val_loss
        _record(rt, state, 0, "end", val_loss=state.val_loss)


def main(cfg: TrainConfig) -> dict | None:
    """Run the recipe; returns the summary on rank 0 (None on other ranks)."""
    from vcyclefx.driver.plot import finish

    rt = None
    try:
        rt = setup(cfg)
        if rt.master:
            print(f"vcyclefx train: {rt.data.source}; {len(rt.data.train):,} train / "
                  f"{len(rt.data.val):,} val tokens; device {rt.device}, world {rt.world}, "
                  f"compile {rt.compile}, out {rt.out}", flush=True)
        train(rt)
        rt.logger.close()
        return finish(rt.out, rt.cfg) if rt.master else None
    finally:
        cleanup(rt)
