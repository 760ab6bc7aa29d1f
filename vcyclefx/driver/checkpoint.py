"""Checkpoints of a training run and resuming from them.

A checkpoint is a directory ``ckpt/<schedule>-<step>/`` holding ``state.json`` (:class:`RunState`,
per-rank RNG states, finished schedules, and the ``metrics.jsonl`` length to truncate to) and the
weights and optimizer state in one of two formats:
- without ``--fsdp``: ``model.safetensors`` (the weights of the module being trained, tied tensors
  stored once) and ``optim.pt`` (``torch.save`` of the optimizer state_dict, read back with
  ``weights_only=True``);
- with ``--fsdp``: ``dcp/``, a ``torch.distributed.checkpoint`` of ``{"model", "optim"}`` (the
  state dicts of ``torch.distributed.checkpoint.state_dict``, keyed by name). Every rank writes
  its own shards, nothing is gathered on rank 0, and it loads on any number of processes: on
  several into this run's shards, on one (no process group) into whole tensors.
It is written to a temporary directory that is renamed into place (``vcyclefx.store``), then
``ckpt/latest.json`` is replaced to point at it; only the newest checkpoint is kept. Several nodes
must share the output directory (one filesystem, e.g. NFS): every rank writes into it.

Data needs no state of its own: batches are a pure function of (seed, step, micro-batch), so the
step to draw next is all there is to save.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from vcyclefx.driver.config import ConfigError, TrainConfig
from vcyclefx.driver.parallel import optimizer_state_by_name
from vcyclefx.driver.runtime import Point, RunState, Runtime
from vcyclefx.store import atomic_directory, atomic_write_json, load_tensors, save_tensors

if TYPE_CHECKING:
    from vcyclefx.driver.parallel import Trainee


_RESUMABLE_CHANGES = {"resume", "out", "quiet", "ckpt_every", "device", "cache_dir", "cpu_offload",
                      "log_to"}


def load_weights(module: torch.nn.Module, path: Path) -> None:
    """The weights ``save_tensors`` wrote (tied names included) into ``module``, strictly."""
    module.load_state_dict(load_tensors(path), strict=True)


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


@contextlib.contextmanager
def _quiet_dcp():
    """torch.distributed.checkpoint warns on every call without a process group that it assumes
    one process: that is meant here (a sharded run resumed on one process)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_checkpoint(rt: Runtime, trainee: Trainee, opt, state: RunState) -> None:
    """A checkpoint of ``trainee`` and ``opt`` after ``state``; every rank calls it."""
    import torch.distributed.checkpoint as dcp

    model_state, optim_state = trainee.checkpoint_state(opt)
    rngs = [rng_state(rt.device)]
    if rt.distributed:
        rngs = [None] * rt.world
        dist.all_gather_object(rngs, rng_state(rt.device))
    root = rt.out / "ckpt"
    name = f"{state.schedule}-{state.step:07d}"
    with (atomic_directory(root / name) if rt.master else contextlib.nullcontext()) as tmp:
        if rt.cfg.fsdp:
            if rt.master:
                (tmp / "dcp").mkdir()
            if rt.distributed:  # every rank writes its shards into rank 0's temporary directory
                box = [str(tmp)]
                dist.broadcast_object_list(box, src=0)
                tmp = Path(box[0])
            with _quiet_dcp():  # returns on every rank once all shards and the metadata are written
                dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp / "dcp")
        if rt.master:
            if not rt.cfg.fsdp:
                save_tensors(tmp / "model.safetensors", model_state)
                torch.save(optim_state, tmp / "optim.pt")
            # data state: batches are a pure function of (seed, step, micro-batch), so the step
            # to draw next is all there is to save
            meta = dict(version=1, format="dcp" if rt.cfg.fsdp else "safetensors",
                        state=vars(state), metrics_offset=rt.logger.offset(), done=rt.done,
                        rng=rngs, data={"seed": rt.cfg.seed, "next_step": state.step})
            (tmp / "state.json").write_text(json.dumps(meta))
    if rt.master:
        atomic_write_json(root / "latest.json", {"dir": name})
        for old in root.iterdir():  # keep only the newest
            if old.is_dir() and old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    if rt.distributed:
        dist.barrier()


def load_sharded(trainee: Trainee, opt, path: Path) -> None:
    """Weights and optimizer state of the ``--fsdp`` checkpoint ``path`` (``.../dcp``) into
    ``trainee`` and ``opt``, resharded for this run's processes (whole tensors on one process,
    read without a process group)."""
    import torch.distributed.checkpoint as dcp

    model_state, optim_state = trainee.checkpoint_state(opt)  # this run's own layout
    with _quiet_dcp():
        dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=path)
    trainee.load_checkpoint_state(opt, model_state, optim_state)


def saved_optimizer_by_name(rt: Runtime, point: Point, module: torch.nn.Module) -> dict[str, dict]:
    """The optimizer state of the checkpoint ``point`` (taken at the end of the stage that trained
    ``module``) by name, whole tensors on ``module``'s device on every rank: what the next
    stage carries through its transition."""
    if not point.sharded:
        saved = torch.load(point.dir / "optim.pt", weights_only=True, map_location=rt.device)
        if any(isinstance(k, str) for k in saved["state"]):  # an older --fsdp checkpoint
            return saved["state"]
        return optimizer_state_by_name(module, saved)
    import torch.distributed.checkpoint as dcp

    # AdamW's per-parameter state (make_optimizer), read whole from the shards
    named = {n: {"step": torch.zeros(()), "exp_avg": torch.zeros_like(p),
                 "exp_avg_sq": torch.zeros_like(p)}
             for n, p in module.named_parameters() if p.requires_grad}
    with _quiet_dcp():
        dcp.load({"optim": {"state": named}}, checkpoint_id=point.dir / "dcp")
    return named


def restore_rng(rt: Runtime, point: Point) -> None:
    """This rank's RNG state of ``point``; a rank the checkpoint has none for (resumed on more
    processes than it was written by) starts the stream a fresh run gives that rank."""
    if rt.rank < len(point.rng):
        set_rng_state(point.rng[rt.rank], rt.device)
    else:
        torch.manual_seed(rt.cfg.seed + 1 + rt.rank)


def latest_checkpoint(out: Path) -> Point | None:
    pointer = out / "ckpt" / "latest.json"
    if not pointer.exists():
        return None
    d = out / "ckpt" / json.loads(pointer.read_text())["dir"]
    meta = json.loads((d / "state.json").read_text())
    return Point(d, RunState(**meta["state"]), meta["metrics_offset"], meta["done"], meta["rng"],
                 sharded=meta.get("format") == "dcp")


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

