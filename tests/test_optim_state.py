"""vcyclefx.train.optim_state: a positional optimizer state by name and back, whatever the groups."""

from __future__ import annotations

import pytest
import torch

from vcyclefx.errors import VCycleError
from vcyclefx.integrations._cycle import open_cycle
from vcyclefx.train.optim_state import load_optimizer_state_by_name, optimizer_state_by_name


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))


def _stepped(net, groups):
    opt = torch.optim.AdamW(groups, lr=1e-2)
    for _ in range(2):
        net(torch.randn(3, 4)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_state_by_name_follows_the_parameters_not_their_positions_in_the_groups():
    net = _net()
    params = dict(net.named_parameters())
    # decayed matrices first, as a transformers.Trainer builds it: positions differ from names
    groups = [{"params": [params["2.weight"], params["0.weight"]], "weight_decay": 0.1},
              {"params": [params["1.bias"], params["0.bias"], params["1.weight"], params["2.bias"]],
               "weight_decay": 0.0}]
    opt = _stepped(net, groups)
    named = optimizer_state_by_name(opt, net)
    assert set(named) == set(params)
    for name, p in params.items():
        assert torch.equal(named[name]["exp_avg"], opt.state[p]["exp_avg"])
    # back into an optimizer with other groups (the driver's order): each tensor finds its name
    other = torch.optim.AdamW(net.parameters(), lr=5e-3)
    load_optimizer_state_by_name(other, net, named)
    for name, p in params.items():
        assert torch.equal(other.state[p]["exp_avg_sq"], named[name]["exp_avg_sq"])
    assert other.param_groups[0]["lr"] == 5e-3  # its own hyper-parameters are kept


def test_state_by_name_refuses_a_foreign_parameter_and_a_state_for_another_model():
    net, stranger = _net(), torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW([*net.parameters(), *stranger.parameters()])
    with pytest.raises(VCycleError, match="not a parameter of Sequential"):
        optimizer_state_by_name(opt, net)
    named = optimizer_state_by_name(_stepped(net, net.parameters()), net)
    with pytest.raises(VCycleError, match="no entry for parameter"):
        load_optimizer_state_by_name(torch.optim.AdamW(net.parameters()), net,
                                     {k: v for k, v in named.items() if k != "0.weight"})


def test_an_integration_refuses_a_folder_holding_a_run_unless_resuming(tmp_path):
    (tmp_path / "stage-000").mkdir()
    with pytest.raises(VCycleError, match="pass resume=True"):
        open_cycle(_net(), (torch.randn(2, 4),), tmp_path, False, {"steps": [1]})
    with pytest.raises(VCycleError, match="checkpoint_dir= is set by the integration"):
        open_cycle(_net(), (torch.randn(2, 4),), tmp_path / "new", False,
                   {"steps": [1], "checkpoint_dir": tmp_path})
