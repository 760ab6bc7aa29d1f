"""The module being trained in its parallel form (one process, DDP, or FSDP2 with ``--fsdp``),
and its optimizer state in the two forms the driver moves it in.

Optimizer state forms:
- *positional*: ``torch.optim.Optimizer.state_dict()`` of ``make_optimizer`` (state keyed by the
  index of a parameter in its groups): what a 1-process run saves and loads;
- *by name*: ``{parameter name: {"step", "exp_avg", "exp_avg_sq"}}`` with whole (unsharded)
  tensors: what ``Stage.map_optimizer_state`` takes and returns, so a level transition is the
  same computation on one process and under FSDP2 (gather, map, re-shard); under
  ``--fsdp-transitions tensor`` the same form with DTensor shards, made one parameter at a time
  by ``driver.sharded.ShardedLevels.carry``.
"""

from __future__ import annotations

import contextlib
import copy
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vcyclefx.driver.runtime import Runtime


def _optimized(module: torch.nn.Module) -> tuple[list, list]:
    """(matrices, vectors): the two parameter groups of ``make_optimizer``, in its order."""
    params = [p for p in module.parameters() if p.requires_grad]
    return [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]


def optimizer_state_by_name(module: torch.nn.Module, optim_state: dict) -> dict[str, dict]:
    """``make_optimizer(module)``'s ``state_dict()`` (keyed by position) keyed by parameter
    name instead: the form ``Stage.map_optimizer_state`` takes and returns."""
    names = {id(p): n for n, p in module.named_parameters()}
    order = [names[id(p)] for group in _optimized(module) for p in group]
    return {order[i]: entry for i, entry in optim_state["state"].items()}


def optimizer_state_from_names(module: torch.nn.Module, named: dict[str, dict],
                               param_groups: list[dict]) -> dict:
    """The inverse of ``optimizer_state_by_name``: a state_dict for ``make_optimizer(module)``
    (``param_groups`` from that optimizer) holding ``named``'s per-parameter state."""
    names = {id(p): n for n, p in module.named_parameters()}
    order = [names[id(p)] for group in _optimized(module) for p in group]
    state = {i: named[n] for i, n in enumerate(order) if named.get(n)}
    return {"state": state, "param_groups": param_groups}


def shard_copy(rt: Runtime, module: torch.nn.Module, empty: bool = False) -> torch.nn.Module:
    """A copy of ``module`` sharded with FSDP2 ``fully_shard`` over the run's processes (see
    :class:`Trainee`). ``empty``: ``module`` is on the meta device; the copy's shards are
    allocated on the device uninitialised (its buffers too), for the caller to fill."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(rt.device.type, (rt.world,))
    policy = CPUOffloadPolicy() if rt.cfg.cpu_offload else OffloadPolicy()
    local = copy.deepcopy(module)
    if not isinstance(local, torch.fx.GraphModule):
        for sub in list(local.modules()):
            if isinstance(sub, torch.nn.ModuleList):
                for block in sub:
                    fully_shard(block, mesh=mesh, offload_policy=policy)
    fully_shard(local, mesh=mesh, offload_policy=policy)
    if empty:
        local.to_empty(device="cpu" if rt.cfg.cpu_offload else rt.device)
    elif not rt.cfg.cpu_offload:  # offloaded shards stay in CPU memory
        local.to(rt.device)
    return local.train()


def _is_sharded_state(named: dict[str, dict]) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(t, DTensor) for entry in named.values() for t in entry.values())


class Trainee:
    """The module being trained in its parallel form.

    - one process: ``module`` on the device, compiled on CUDA;
    - DDP: the same, compiled first, then wrapped (nanoGPT's order);
    - FSDP2 (``--fsdp`` on several processes): a copy of ``module`` is sharded with
      ``fully_shard`` (every block of a ``ModuleList`` first when ``module`` is a plain
      nn.Module; a level GraphModule reads its parameters straight from the graph, so only its
      root can be sharded: parameters are gathered for the whole forward, gradients and
      optimizer state stay sharded), with ``CPUOffloadPolicy`` under ``--cpu-offload``
      (parameters, gradients and optimizer state in CPU memory), then compiled; ``finish()``
      copies the full weights back into ``module``, which never leaves the device it was on
      (baselines, and the V-cycle under ``--fsdp-transitions whole``). Given ``sharded`` (the
      V-cycle under ``--fsdp-transitions tensor``, ``driver.sharded``), ``module`` is a level on
      the meta device and ``sharded`` the FSDP2 module holding its weights: it is trained in
      place and nothing is copied back. A ``--fsdp`` run resumed on one process trains
      unsharded (``sharded`` False) and keeps the sharded checkpoint format.
    """

    def __init__(self, rt: Runtime, module: torch.nn.Module,
                 sharded: torch.nn.Module | None = None):
        self.rt, self.sharded = rt, rt.cfg.fsdp and rt.distributed
        if not self.sharded:
            self.raw = self.local = module.to(rt.device).train()
            model = torch.compile(self.raw) if rt.compile else self.raw  # compile before DDP
            if rt.distributed:
                from torch.nn.parallel import DistributedDataParallel as DDP

                model = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
            self.model = model
        else:
            self.raw = module.train()
            # given: the level's sharded module (--fsdp-transitions tensor: ``module`` is a
            # level on the meta device, its weights live only in ``sharded``)
            self.local = sharded if sharded is not None else shard_copy(rt, module)
            self.model = torch.compile(self.local) if rt.compile else self.local
        self.owned = sharded is None  # finish() copies the trained weights back into module
        self.raw_device = next(self.raw.parameters()).device

    def grad_sync(self, on: bool):
        """Gradients are reduced across processes only on the last micro-batch of a step."""
        if self.sharded:
            self.local.set_requires_gradient_sync(on)
        elif self.rt.distributed and not on:
            return self.model.no_sync()
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ optimizer state

    def _named_groups(self, opt) -> list[dict]:
        """``opt.param_groups`` with parameter names in place of the parameters (the form of
        ``torch.distributed.checkpoint.state_dict``)."""
        names = {id(p): n for n, p in self.local.named_parameters()}
        return [{**{k: v for k, v in g.items() if k != "params"},
                 "params": [names[id(p)] for p in g["params"]]} for g in opt.param_groups]

    def state_by_name(self, opt) -> dict[str, dict]:
        """The optimizer's state by name with whole tensors on every rank (under FSDP a
        collective: the shards are gathered), for ``Stage.map_optimizer_state``."""
        if not self.sharded:
            return optimizer_state_by_name(self.raw, opt.state_dict())
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_optimizer_state_dict)

        full = get_optimizer_state_dict(self.local, opt,
                                        options=StateDictOptions(full_state_dict=True))
        return full["state"]

    def load_by_name(self, opt, named: dict[str, dict]) -> None:
        """Load whole per-name state (``state_by_name``'s form, e.g. carried through a level
        transition) into ``opt``; under FSDP every rank keeps its own shard of it."""
        if not self.sharded or _is_sharded_state(named):  # already this run's shards
            opt.load_state_dict(optimizer_state_from_names(self.local, named,
                                                           opt.state_dict()["param_groups"]))
            return
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             set_optimizer_state_dict)

        # every rank must walk the state in one order: loading scatters each tensor from rank
        # 0 in turn, and an entry's keys may come from a set (their order varies per process
        # with PYTHONHASHSEED; different orders pair one rank's exp_avg with another's exp_avg_sq)
        groups = self._named_groups(opt)
        order = [n for g in groups for n in g["params"]]
        state = {"state": {n: {k: named[n][k] for k in sorted(named[n])}
                           for n in order if named.get(n)},
                 "param_groups": groups}
        set_optimizer_state_dict(self.local, opt, state,
                                 options=StateDictOptions(full_state_dict=True))

    def load_optimizer(self, opt, optim_state: dict) -> None:
        """A saved optimizer state_dict: positional (a 1-process checkpoint), or keyed by name
        (a ``--fsdp`` checkpoint written before they were sharded: whole tensors)."""
        if any(isinstance(k, str) for k in optim_state["state"]):
            self.load_by_name(opt, optim_state["state"])
        else:
            opt.load_state_dict(optim_state)

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_state(self, opt) -> tuple[dict, dict]:
        """(model state_dict, optimizer state_dict) to save. Without ``--fsdp``: the module's
        tensors and the positional optimizer state. With ``--fsdp``: the form
        ``torch.distributed.checkpoint`` saves and reshards, keyed by name; sharded DTensors on
        several processes (each rank saves its own shards, nothing is gathered), whole tensors
        on one."""
        if not self.rt.cfg.fsdp:
            return self.raw.state_dict(keep_vars=True), opt.state_dict()
        from torch.distributed.checkpoint.state_dict import get_state_dict

        return get_state_dict(self.local, opt)

    def load_checkpoint_state(self, opt, model_state: dict, optim_state: dict) -> None:
        """The inverse of ``checkpoint_state`` for ``--fsdp`` runs: ``model_state`` and
        ``optim_state`` filled by ``dcp.load`` into what ``checkpoint_state`` returned."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.local, opt, model_state_dict=model_state, optim_state_dict=optim_state)

    def finish(self) -> None:
        if self.sharded and self.owned:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                                 get_model_state_dict)

            full = get_model_state_dict(self.local, options=StateDictOptions(full_state_dict=True))
            self.raw.load_state_dict(full, strict=True)
