"""Capture of a model with random ops the graph cannot switch between train and eval (stochastic
depth written as a Python branch on ``self.training``): it is captured in eval mode, says so, and
keeps dropout switchable."""

from __future__ import annotations

import torch
from torch import nn

import vcyclefx as vf


class DropPathNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        y = self.fc2(self.drop(torch.relu(self.fc1(x))))
        if self.training:  # stochastic depth: keep the branch with probability 0.8
            keep = (torch.rand(x.shape[0], 1) < 0.8).to(x.dtype) / 0.8
            y = y * keep
        return x + y


def _random_ops(level):
    return sorted({str(n.target) for n in level.graph.nodes
                   if n.op == "call_function" and "rand" in str(n.target)})


def test_stochastic_depth_is_left_out_and_dropout_stays_switchable():
    model = DropPathNet()
    x = torch.randn(4, 8)
    level = vf.capture(model, (x,))
    assert _random_ops(level) == []
    assert any(n.startswith("captured in eval mode: random ops") for n in level.info.notes)
    assert model.training  # the user's model is left in the mode it was in
    level.eval()
    model.eval()
    assert torch.equal(level(x), model(x))
    level.train()  # dropout on: outputs differ from eval mode, and between two calls
    torch.manual_seed(0)
    a = level(x)
    torch.manual_seed(1)
    b = level(x)
    assert not torch.equal(a, b)
    assert not torch.equal(a, model(x))
