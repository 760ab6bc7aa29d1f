"""The state types of a training run: what ``setup()`` builds (``Runtime``), the progress of one
schedule (``RunState``) and a checkpoint to resume from (``Point``). Their own module so that
``train``, ``checkpoint`` and ``parallel`` all import them and none imports another back."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vcyclefx.driver.config import TrainConfig
from vcyclefx.driver.data import Batches, TokenData
from vcyclefx.driver.logger import MetricLogger


@dataclass
class RunState:
    """Progress of one schedule; JSON-serialisable, saved in every checkpoint."""

    schedule: str
    step: int = 0  # optimizer steps done, over all stages
    stage: int = 0  # index of the stage in progress
    stage_step: int = 0  # steps done in that stage
    tokens: int = 0
    flops: float = 0.0
    wall: float = 0.0  # seconds spent training (not evaluating or checkpointing)
    val_loss: float | None = None  # latest validation loss
    lr_from: int = 0  # --lr-at-growth same-loss: the stage's lr continues a full run this far in


@dataclass
class Point:
    """A checkpoint to resume from."""

    dir: Path
    state: RunState
    metrics_offset: int
    done: dict
    rng: list
    sharded: bool = False  # a torch.distributed.checkpoint in dir / "dcp" (a --fsdp run)


@dataclass
class Runtime:
    """What setup() builds and every stage uses."""

    cfg: TrainConfig
    out: Path
    device: torch.device
    autocast_dtype: torch.dtype | None  # None = float32, no autocast
    compile: bool
    rank: int
    world: int
    local_rank: int
    data: TokenData
    train_batches: Batches
    val_batches: Batches
    logger: MetricLogger
    resume_point: Point | None = None
    done: dict = field(default_factory=dict)  # finished schedule -> its final val loss

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def master(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)
