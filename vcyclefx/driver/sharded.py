"""V-cycle transitions under FSDP2 one parameter at a time (``--fsdp``, ``--fsdp-transitions
tensor``, the default).

The :class:`~vcyclefx.train.vcycle.VCycle` keeps its levels on the meta device (graphs whose
parameters and persistent buffers are meta tensors); the weights exist only as the shards of one
FSDP2 module per level that has weights (the level being trained and the levels kept for the way
up), held by :class:`ShardedLevels`. A transition (coalesce; de-coalesce and interpolate with
the kept level) runs on the meta levels under a :class:`~vcyclefx.export.record.Recorder`, which
writes down its ops; each tensor of the new level is then replayed from the tensors its map reads
(a width map one tensor, a depth group the tensors of the blocks it averages), each gathered
whole (``DTensor.full_tensor()``), sharded into the new level's FSDP2 module
(``distribute_tensor``) and freed. The AdamW moments go the same way:
``Stage.map_optimizer_state`` recorded on meta stand-ins of the moments, replayed per parameter
from the previous stage's sharded moments. The same ops run on the same values as in the
whole-level path (``--fsdp-transitions whole``), so the results are the same.

A rank holds the shards of the levels it keeps (during a transition the old and the new level)
plus one group of whole tensors at a time. The level-0 model is built whole once at start-up,
sharded, and its whole copy dropped; the final level-0 weights are gathered on rank 0 to be
written (``materialize``); V-cycle checkpoints are written one gathered tensor at a time.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import torch

from passes.contract import shape_check
from vcyclefx.driver.parallel import shard_copy
from vcyclefx.driver.runtime import Runtime
from vcyclefx.export.record import Recorder
from vcyclefx.level import owner_of


def to_meta(module: torch.nn.Module) -> None:
    """``module``'s parameters and persistent buffers replaced in place by meta tensors of their
    shapes and dtypes (tied tensors stay tied); its other tensors (non-persistent buffers,
    constants) are kept."""
    _replace(module, lambda name, t: t if t.is_meta else torch.empty_like(t, device="meta"))


def _replace(module: torch.nn.Module, make) -> None:
    """Every tensor ``t`` of ``module``'s state dict (first name ``name``) replaced in place by
    ``make(name, t)``, a parameter where ``t`` is one; tied tensors stay tied."""
    done: dict[int, torch.Tensor] = {}
    for name, t in module.state_dict(keep_vars=True).items():
        if id(t) not in done:
            new = make(name, t)
            done[id(t)] = (torch.nn.Parameter(new, t.requires_grad)
                           if isinstance(t, torch.nn.Parameter) and new is not t else new)
        owner, leaf = owner_of(module, name)
        new = done[id(t)]
        (owner._parameters if isinstance(new, torch.nn.Parameter) else owner._buffers)[leaf] = new


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor gathered whole on every rank (a collective), on the CPU, where the
    recorded ops replay."""
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()


def _like(dst: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (whole, the same on every rank) sharded as ``dst`` is: this rank's shard of it,
    a new tensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(dst, DTensor):
        return value.to(dst.device)
    return distribute_tensor(value.to(dst.device), dst.device_mesh, dst.placements,
                             src_data_rank=None)  # every rank computed it: nothing is sent


def _put(dst: torch.Tensor, value: torch.Tensor) -> None:
    """The whole ``value`` into ``dst`` (this rank's shard of it where ``dst`` is sharded)."""
    with torch.no_grad():
        dst.copy_(_like(dst, value.to(dst.dtype)))


def _resharded(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` (FSDP2) with every parameter sharded (after a forward the root's stay
    gathered), so its parameters are the DTensors the optimizer steps."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    return module


class ShardedLevels:
    """The sharded weights of a :class:`VCycle`'s levels (module docstring). Made after the
    cycle (whose modules hold their weights then): shards its current and kept levels, records
    the training FLOPs per token of every level, and moves every module of the cycle to the
    meta device. Then every transition of the cycle's iteration is replayed here."""

    def __init__(self, rt: Runtime, cycle, flops_of):
        self.rt, self.cycle = rt, cycle
        # id(level) -> (level, its FSDP2 module); the level is held so that its id stays its own
        self.held: dict[int, tuple[torch.nn.Module, torch.nn.Module]] = {}
        mods = cycle.held_modules()
        self.fpt = {int(role[5:]): flops_of(m) for role, m in mods.items()
                    if role.startswith("shape")}
        for role, m in mods.items():
            if not role.startswith("shape") and id(m) not in self.held:
                self.held[id(m)] = (m, shard_copy(rt, m))
        for m in mods.values():
            to_meta(m)
        cycle.transition_context = self._transition
        cycle.save_weights = self.save_weights

    def sharded(self, level: torch.nn.Module) -> torch.nn.Module:
        """The FSDP2 module holding ``level``'s weights."""
        return self.held[id(level)][1]

    def _sources(self) -> dict[str, torch.nn.Module]:
        return {role: m for role, m in self.cycle.held_modules().items()
                if not role.startswith("shape")}

    # ------------------------------------------------------------------ weights

    @contextlib.contextmanager
    def _transition(self):
        """The context of a transition of the cycle: records it, then makes the new level's
        shards tensor by tensor."""
        before = self._sources()
        leaves: dict[torch.Tensor, str] = {}
        tensors: dict[str, torch.Tensor] = {}
        for role, m in before.items():
            state = dict(_resharded(self.sharded(m)).named_parameters(remove_duplicate=False))
            state.update(self.sharded(m).named_buffers(remove_duplicate=False))
            for name, t in m.state_dict(keep_vars=True).items():
                if t not in leaves:
                    leaves[t] = f"{role}/{name}"
                    tensors[f"{role}/{name}"] = state[name]
        # the passes' fake re-execution check (VCYCLEFX_VERIFY) would fake these meta weights
        # on the meta device against the training device's inputs; the whole-level path checks
        # the same graph transforms
        with shape_check(False), Recorder(leaves) as rec:
            yield
        new = self.cycle.held_modules()["current"]
        if id(new) in self.held:
            return
        target = shard_copy(self.rt, new, empty=True)
        self._fill(target, new, rec, lambda names: {n: _whole(tensors[n]) for n in sorted(names)})
        self.held[id(new)] = (new, target)

    @staticmethod
    def _fill(target: torch.nn.Module, level: torch.nn.Module, rec: Recorder, load) -> None:
        """Every tensor of ``target`` (``level``'s sharded copy, uninitialised): replayed by
        ``rec`` where ``level`` holds a meta tensor, else (a buffer outside the state dict, or
        not made by the transform) copied from ``level``. Every rank goes through the tensors
        in one order (each replay gathers)."""
        dst = dict(target.named_parameters(remove_duplicate=False))
        dst.update(target.named_buffers(remove_duplicate=False))
        done = set()
        for name, t in [*level.state_dict(keep_vars=True).items(),
                        *level.named_buffers(remove_duplicate=False)]:
            if id(dst[name]) in done:
                continue
            done.add(id(dst[name]))
            _put(dst[name], rec.value(t, load) if t.is_meta else t)

    # ------------------------------------------------------------------ moments

    def carry(self, stage, opt) -> dict[str, dict]:
        """``stage.map_optimizer_state`` of ``opt`` (the optimizer of the level ``stage`` was
        made from, over its sharded module) one parameter at a time: {name: {"step",
        "exp_avg", "exp_avg_sq"}} with tensors sharded as the new level's parameters, for
        ``Trainee.load_by_name``."""
        source = stage.transition[2]
        params = dict(_resharded(self.sharded(source)).named_parameters())
        leaves: dict[torch.Tensor, str] = {}
        whole: dict[str, torch.Tensor] = {}
        named: dict[str, dict] = {}
        for name, p in params.items():
            entry = {}
            for key, v in opt.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    entry[key] = torch.empty(v.shape, dtype=v.dtype, device="meta")
                    leaves[entry[key]] = f"{key}/{name}"
                    whole[f"{key}/{name}"] = v
                else:
                    entry[key] = v
            named[name] = entry
        # the mapping copies the source level's module to carry the moments: its tensors are
        # overwritten before they are read, so any values do (uninitialised ones here)
        shapes = {}
        for name, t in source.state_dict(keep_vars=True).items():
            if t not in leaves:
                leaves[t] = f"shape/{name}"
                shapes[f"shape/{name}"] = t

        def load(names):
            return {n: _whole(whole[n]) if n in whole else
                    torch.empty(shapes[n].shape, dtype=shapes[n].dtype) for n in sorted(names)}

        with shape_check(False), Recorder(leaves) as rec:  # as in _transition
            mapped = stage.map_optimizer_state(named)
        dst = dict(_resharded(self.sharded(stage.model)).named_parameters())
        return {name: {k: _like(dst[name], rec.value(v, load)) if isinstance(v, torch.Tensor)
                       and v.is_meta else v for k, v in sorted(entry.items())}
                for name, entry in mapped.items()}

    def release(self) -> None:
        """Drop the shards of the levels the cycle no longer holds (after a transition, once
        their optimizer state is carried)."""
        alive = {id(m) for m in self._sources().values()}
        self.held = {k: v for k, v in self.held.items() if k in alive}

    # ------------------------------------------------------------------ whole weights

    def save_weights(self, path: Path | None, level: torch.nn.Module) -> None:
        """``level``'s weights as one safetensors file at ``path`` (what ``save_tensors``
        writes: each tensor once, aliases in the metadata), gathered one tensor at a time; a
        collective: every rank calls it, those with ``path`` None write nothing."""
        from vcyclefx.export.shards import ShardWriter
        from vcyclefx.store import ALIASES_KEY, aliases_of

        state = level.state_dict(keep_vars=True)
        aliases = aliases_of(state)
        layout = [(n, t.dtype, tuple(t.shape)) for n, t in state.items() if n not in aliases]
        sharded = _resharded(self.sharded(level)).state_dict(keep_vars=True)
        writer = None
        if path is not None:
            writer = ShardWriter(path.parent, path.name.removesuffix(".safetensors"), layout,
                                 1 << 62, {ALIASES_KEY: json.dumps(aliases)})
        try:
            for name, *_ in layout:
                value = _whole(sharded[name])
                if writer is not None:
                    writer.write(name, value)
            if writer is not None:
                writer.finish(aliases)
        finally:
            if writer is not None:
                writer.abort()

    def materialize(self, level: torch.nn.Module) -> torch.nn.Module | None:
        """On rank 0 a copy of ``level`` holding its whole weights (on the CPU), else None; a
        collective."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_model_state_dict)

        full = get_model_state_dict(_resharded(self.sharded(level)), options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
        if not self.rt.master:
            return None
        whole = copy.deepcopy(level)
        _replace(whole, lambda name, t: full[name])
        return whole

    def saved_optimizer(self, level: torch.nn.Module, path: Path):
        """An optimizer over ``level``'s shards holding the state of the ``--fsdp`` checkpoint
        ``path`` (its ``dcp/``, written at the end of the stage that trained ``level``)."""
        from vcyclefx.driver.checkpoint import load_sharded
        from vcyclefx.driver.parallel import Trainee
        from vcyclefx.driver.stage import make_optimizer

        t = Trainee(self.rt, level, self.sharded(level))
        opt = make_optimizer(t.local, self.rt.cfg, self.rt.cfg.lr, self.rt.device)
        load_sharded(t, opt, path)
        return opt
