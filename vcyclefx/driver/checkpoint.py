"""Checkpoints of a training run and resuming from them.

A checkpoint is a directory ``ckpt/<schedule>-<step>/`` with ``model.safetensors`` (the weights of
the module being trained, tied tensors stored once), ``optim.pt`` (``torch.save`` of the optimizer
state_dict, read back with ``weights_only=True``) and ``state.json`` (:class:`RunState`, per-rank
RNG states, finished schedules, and the ``metrics.jsonl`` length to truncate to). It is written to
a temporary directory that is renamed into place, then ``ckpt/latest.json`` is replaced to point
at it; only the newest checkpoint is kept.

Data needs no state of its own: batches are a pure function of (seed, step, micro-batch), so the
step to draw next is all there is to save.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from .config import ConfigError, TrainConfig

if TYPE_CHECKING:
    from .train import Runtime


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



_RESUMABLE_CHANGES = {"resume", "out", "quiet", "ckpt_every", "device", "cache_dir"}


@dataclass
class Point:
    """A checkpoint to resume from."""

    dir: Path
    state: RunState
    metrics_offset: int
    done: dict
    rng: list


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_weights(state: dict, path: Path) -> None:
    """A state_dict as safetensors; a tensor under several names (tied) is stored once."""
    from safetensors.torch import save_file

    tensors, aliases, seen = {}, {}, {}
    for name, t in state.items():
        if id(t) in seen:
            aliases[name] = seen[id(t)]
            continue
        seen[id(t)] = name
        tensors[name] = t.detach().contiguous().cpu()
    save_file(tensors, str(path), metadata={"aliases": json.dumps(aliases)})


def load_weights(module: torch.nn.Module, path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    state = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        aliases = json.loads(f.metadata().get("aliases", "{}"))
    state.update({alias: state[name] for alias, name in aliases.items()})
    module.load_state_dict(state, strict=True)


def rng_state(device: torch.device) -> dict:
    def enc(t):
        return base64.b64encode(t.numpy().tobytes()).decode()

    cuda = enc(torch.cuda.get_rng_state(device)) if device.type == "cuda" else None
    return {"cpu": enc(torch.get_rng_state()), "cuda": cuda}


def set_rng_state(rng: dict, device: torch.device) -> None:
    def dec(s):
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(dec(rng["cpu"]))
    if device.type == "cuda" and rng.get("cuda"):
        torch.cuda.set_rng_state(dec(rng["cuda"]), device)


def save_checkpoint(rt: Runtime, model_state: dict, optim_state: dict, state: RunState) -> None:
    rngs = [rng_state(rt.device)]
    if rt.distributed:
        rngs = [None] * rt.world
        dist.all_gather_object(rngs, rng_state(rt.device))
    if rt.master:
        root = rt.out / "ckpt"
        name = f"{state.schedule}-{state.step:07d}"
        tmp = root / f".{name}.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        save_weights(model_state, tmp / "model.safetensors")
        torch.save(optim_state, tmp / "optim.pt")
        # data state: batches are a pure function of (seed, step, micro-batch), so the step
        # to draw next is all there is to save
        meta = dict(version=1, state=vars(state), metrics_offset=rt.logger.offset(), done=rt.done,
                    rng=rngs, data={"seed": rt.cfg.seed, "next_step": state.step})
        (tmp / "state.json").write_text(json.dumps(meta))
        final = root / name
        if final.exists():  # the same step written again after a resume
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(root / "latest.json", json.dumps({"dir": name}))
        for old in root.iterdir():  # keep only the newest
            if old.is_dir() and old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    if rt.distributed:
        dist.barrier()


def latest_checkpoint(out: Path) -> Point | None:
    pointer = out / "ckpt" / "latest.json"
    if not pointer.exists():
        return None
    d = out / "ckpt" / json.loads(pointer.read_text())["dir"]
    meta = json.loads((d / "state.json").read_text())
    return Point(d, RunState(**meta["state"]), meta["metrics_offset"], meta["done"], meta["rng"])


def resume_config(cfg: TrainConfig, out: Path) -> tuple[TrainConfig, Point | None]:
    """The saved config of the run in ``out`` (only harmless options may differ) and its latest
    checkpoint (None: no checkpoint yet, the run starts again from step 0)."""
    path = out / "config.json"
    if not path.exists():
        raise ConfigError(f"--resume {out}: no config.json there, so it is not a training run "
                          "directory made by vcyclefx train")
    saved = TrainConfig.from_dict(json.loads(path.read_text()))
    diff = [k for k in TrainConfig.field_names()
            if k not in _RESUMABLE_CHANGES and getattr(saved, k) != getattr(cfg, k)
            and not (k == "vocab_size" and cfg.vocab_size == 0)]
    if diff:
        raise ConfigError(f"--resume {out}: the run was made with different "
                          + ", ".join(f"{k}={getattr(saved, k)!r} (now {getattr(cfg, k)!r})"
                                      for k in diff)
                          + "; drop these options to resume, or start a new run with --out")
    keep = {k: getattr(cfg, k) for k in _RESUMABLE_CHANGES}
    return saved.replace(**{**keep, "out": str(out), "resume": str(out)}), latest_checkpoint(out)

