"""A torch optimizer's state keyed by parameter name, and back.

``torch.optim.Optimizer.state_dict()`` keys the per-parameter state by position: the index of a
parameter when the optimizer's ``param_groups`` are read in order, group after group. A training
library builds its optimizer with its own groups (a ``transformers.Trainer`` puts decayed
parameters first, a LightningModule whatever ``configure_optimizers`` returns), so positions of
one run mean nothing to another. ``Stage.map_optimizer_state`` takes and returns the state keyed
by the parameter names of a stage's model; these two functions translate, for any optimizer over
the parameters of ``module`` (or over the same tensors held by another module, e.g. the user's
class made by ``Stage.module()``, which shares the level's parameters).
"""

from __future__ import annotations

import torch

from vcyclefx.errors import VCycleError


def _names(optimizer: torch.optim.Optimizer, module: torch.nn.Module) -> list[str]:
    """The name in ``module`` of every parameter of ``optimizer``, in state_dict order."""
    by_id = {id(p): n for n, p in module.named_parameters()}
    out = []
    for g, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if id(p) not in by_id:
                raise VCycleError(f"optimizer param_groups[{g}] holds a parameter of shape "
                                  f"{tuple(p.shape)} that is not a parameter of "
                                  f"{type(module).__name__}: build the optimizer over the stage's "
                                  "own module (Stage.module() or Stage.model)")
            out.append(by_id[id(p)])
    return out


def optimizer_state_by_name(optimizer: torch.optim.Optimizer,
                            module: torch.nn.Module) -> dict[str, dict]:
    """``{parameter name in module: {"step", "exp_avg", ...}}`` of ``optimizer``'s state
    (parameters without state yet are left out)."""
    names = _names(optimizer, module)
    state = optimizer.state_dict()["state"]
    return {names[i]: dict(entry) for i, entry in state.items()}


def load_optimizer_state_by_name(optimizer: torch.optim.Optimizer, module: torch.nn.Module,
                                 named: dict[str, dict]) -> None:
    """Load ``named`` (``optimizer_state_by_name``'s form, e.g. ``Stage.map_optimizer_state``'s
    output) into ``optimizer``, keeping its param_groups (learning rate, weight decay)."""
    names = _names(optimizer, module)
    missing = [n for n in names if n not in named]
    if named and missing:
        raise VCycleError(f"the carried optimizer state has no entry for parameter {missing[0]} "
                          f"({len(missing)} of {len(names)} missing): it was made for another "
                          "stage's model")
    sd = optimizer.state_dict()
    sd["state"] = {i: named[n] for i, n in enumerate(names) if n in named}
    optimizer.load_state_dict(sd)
