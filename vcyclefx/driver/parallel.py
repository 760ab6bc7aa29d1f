"""The module being trained in its parallel form: one process, DDP, or FSDP2 (``--fsdp``)."""

from __future__ import annotations

import contextlib
import copy
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .train import Runtime


class Trainee:
    """The module being trained in its parallel form.

    - one process: ``module`` on the device, compiled on CUDA;
    - DDP: the same, compiled first, then wrapped (nanoGPT's order);
    - FSDP2 (``--fsdp``): a copy of ``module`` is sharded with ``fully_shard`` (every block of a
      ``ModuleList`` first when ``module`` is a plain nn.Module; a level GraphModule reads its
      parameters straight from the graph, so only its root can be sharded: parameters are
      gathered for the whole forward, gradients and optimizer state stay sharded), then
      compiled; ``finish()`` copies the full weights back into ``module``, which never leaves
      the device it was on (the V-cycle keeps working on whole modules).
    """

    def __init__(self, rt: Runtime, module: torch.nn.Module):
        self.rt, self.fsdp = rt, rt.cfg.fsdp
        if not self.fsdp:
            self.raw = self.local = module.to(rt.device).train()
            model = torch.compile(self.raw) if rt.compile else self.raw  # compile before DDP
            if rt.distributed:
                from torch.nn.parallel import DistributedDataParallel as DDP

                model = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
            self.model = model
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            self.raw = module.train()
            mesh = init_device_mesh(rt.device.type, (rt.world,))
            self.local = copy.deepcopy(module)
            if not isinstance(self.local, torch.fx.GraphModule):
                for sub in list(self.local.modules()):
                    if isinstance(sub, torch.nn.ModuleList):
                        for block in sub:
                            fully_shard(block, mesh=mesh)
            fully_shard(self.local, mesh=mesh)
            self.local.to(rt.device)
            self.model = torch.compile(self.local) if rt.compile else self.local
        self.raw_device = next(self.raw.parameters()).device

    def grad_sync(self, on: bool):
        """Gradients are reduced across processes only on the last micro-batch of a step."""
        if self.fsdp:
            self.local.set_requires_gradient_sync(on)
        elif self.rt.distributed and not on:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def checkpoint_state(self, opt) -> tuple[dict, dict]:
        """(model state_dict, optimizer state_dict) to save; under FSDP gathered in full (a
        collective: every rank calls it; rank 0 gets the tensors)."""
        if not self.fsdp:
            return self.raw.state_dict(keep_vars=True), opt.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(self.local, opt,
                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer(self, opt, optim_state: dict) -> None:
        if not self.fsdp:
            opt.load_state_dict(optim_state)
            return
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             set_optimizer_state_dict)

        set_optimizer_state_dict(self.local, opt, optim_state,
                                 options=StateDictOptions(full_state_dict=True))

    def finish(self) -> None:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                                 get_model_state_dict)

            full = get_model_state_dict(self.local, options=StateDictOptions(full_state_dict=True))
            self.raw.load_state_dict(full, strict=True)

