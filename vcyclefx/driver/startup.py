"""Start-up and clean-up of a training run: the device, the process group, the output
directory, the data and the first model; everything ``setup(cfg)`` checks before a run writes.

An unsupported combination fails here with a message that says the fix, and a refused run
leaves no output directory behind: the inputs (data read, vocabulary fits, ``--model`` builds)
are checked before the directory and its ``config.json`` are written. On CUDA TF32 matmuls and
flash SDPA are switched on; torch.compile is on by default there (``--compile`` overrides).
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path

import torch
import torch.distributed as dist

from vcyclefx.driver.checkpoint import resume_config
from vcyclefx.driver.config import ConfigError, TrainConfig, check_runtime
from vcyclefx.driver.data import Batches, TokenData, load_data
from vcyclefx.driver.logger import MetricLogger, TensorBoardLog
from vcyclefx.driver.models import build_causal_lm, check_model
from vcyclefx.driver.runtime import Runtime
from vcyclefx.store import atomic_write_text
from vcyclefx.zoo.gpt import GPT, GPTConfig


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


def _init_parallel(cfg: TrainConfig) -> tuple[int, int, int, torch.device]:
    """(rank, world size, local rank, device) from torchrun's environment; the process group
    (NCCL on CUDA, gloo on CPU) when several processes run; TF32 and flash SDPA on CUDA."""
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
    return rank, world, local_rank, dev


def setup(cfg: TrainConfig) -> Runtime:
    rank, world, local_rank, dev = _init_parallel(cfg)
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
    if cfg.log_to == "tensorboard":
        _check_tensorboard()
    train_batches = Batches(data.train, "train", cfg.batch_size, cfg.seq_len, cfg.seed, dev)
    val_batches = Batches(data.val, "val", cfg.batch_size, cfg.seq_len, cfg.seed, dev)
    if not cfg.resume:
        if world > 1:
            dist.barrier()  # every rank has looked before rank 0 writes
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "config.json", cfg.to_json())
    compile_ = cfg.compile if cfg.compile is not None else dev.type == "cuda"
    tb = None
    if cfg.log_to == "tensorboard" and rank == 0:
        tb = TensorBoardLog(out / "tensorboard",
                            resume_at=(point.state.schedule, point.state.step) if point else None)
    logger = MetricLogger(out / "metrics.jsonl" if rank == 0 else None,
                          truncate_to=point.metrics_offset if point else (0 if cfg.resume else None),
                          tensorboard=tb)
    return Runtime(
        cfg=cfg, out=out, device=dev, autocast_dtype=_autocast_dtype(cfg, dev), compile=compile_,
        rank=rank, world=world, local_rank=local_rank, data=data,
        train_batches=train_batches, val_batches=val_batches,
        logger=logger, resume_point=point, done=dict(point.done) if point else {},
    )


def _check_tensorboard() -> None:
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard writes through it)
    except ImportError as e:
        raise ConfigError("--log-to tensorboard needs the tensorboard package: pip install "
                          "tensorboard (or use --log-to jsonl)") from e


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


def new_model(rt: Runtime, level: int | str = 0) -> torch.nn.Module:
    """Level 0 with the run's initial weights (the same for every schedule of a run): the
    built-in GPT, or the ``--model`` architecture (``driver.models``). ``level`` k > 0: the
    built-in GPT at level k's sizes (``coarse_sizes``), freshly initialised, to train alone; an
    ``--alone-sizes`` key (``"1x32x2"``): the built-in GPT at those sizes."""
    c = rt.cfg
    torch.manual_seed(c.seed)
    if c.model:
        if level:
            raise ConfigError("a coarse level of --model has no config to build it alone from")
        return build_causal_lm(c.model, vocab_size=c.vocab_size, seq_len=c.seq_len, seed=c.seed)
    return built_in_gpt(c, level)


def built_in_gpt(c: TrainConfig, level: int | str = 0) -> GPT:
    """The built-in GPT at level ``level``'s sizes (``coarse_sizes``; an ``--alone-sizes`` key:
    those sizes), initialised by torch's current RNG (or on the meta device under
    ``torch.device("meta")``)."""
    n_layer, n_head, n_embd = (coarse_sizes(c, level) if isinstance(level, int)
                               else dict(c.alone_size_list())[level])
    return GPT(GPTConfig(block_size=c.seq_len, vocab_size=c.vocab_size, n_layer=n_layer,
                         n_head=n_head, n_embd=n_embd, dropout=c.dropout, bias=c.bias))


def coarse_sizes(c, level: int) -> tuple[int, int, int]:
    """(n_layer, n_head, n_embd) of the built-in GPT's level ``level``: depth x ``--depth``,
    width and heads x ``--width`` per level (the head size is kept, as coalescing keeps it)."""
    return (max(1, round(c.n_layer * c.depth ** level)), max(1, round(c.n_head * c.width ** level)),
            max(1, round(c.n_embd * c.width ** level)))
