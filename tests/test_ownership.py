"""Levels own their weights: no pass output and no V-cycle stage shares storage with its source,
training a level leaves its source bit-identical, and an alpha=0 V-cycle goes up exactly to the
weights it kept on the way down."""

from __future__ import annotations

import pytest
import torch

import vcyclefx as vf
from tests.conftest import ZOO_NAMES, output_tensor
from vcyclefx import zoo
from vcyclefx.level import shared_tensors

VARIANTS = {  # name -> (coalesce factors, decoalesce factors)
    "width": (dict(width=0.5), dict(width=2.0)),
    "depth": (dict(depth=0.5), dict(depth=2.0)),
    "both": (dict(width=0.5, depth=0.5), dict(width=2.0, depth=2.0)),
}


def _snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _train_a_step(level, example) -> None:
    """One SGD step with a large rate on every floating tensor that takes a gradient."""
    level.train()
    out = output_tensor(level(*example))
    loss = (out.float() ** 2).mean()
    params = [p for p in level.parameters() if p.requires_grad]
    loss.backward()
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.sub_(0.5 * p.grad.sign())
    level.eval()


def _assert_same(before: dict, module, what: str) -> None:
    now = module.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(v, now[k])]
    assert not changed, f"{what}: training the level changed {changed[:3]}"


# Ownership is a property of the passes, not of a model: the default run checks an HF LM with
# tied weights in every variant, a CNN with BatchNorm buffers and a plain module; every zoo
# model in every variant with -m slow.
_DEFAULT_OWNERSHIP = {("gpt2", "depth"), ("gpt2", "both"), ("resnet18", "both"), ("nanogpt", "both")}


@pytest.mark.parametrize("name,variant", [
    pytest.param(n, v, id=f"{n}-{v}", marks=() if (n, v) in _DEFAULT_OWNERSHIP else pytest.mark.slow)
    for n in ZOO_NAMES for v in VARIANTS])
def test_a_level_shares_no_tensor_with_its_source_and_training_it_leaves_the_source_unchanged(
        name, variant):
    model, example = zoo.ZOO[name]()
    model.eval()
    frontend = zoo.FRONTEND.get(name, "export")
    down, up = VARIANTS[variant]
    user_before = _snapshot(model)
    small, mapping = vf.coalesce(model, example, frontend=frontend, **down)
    assert shared_tensors(small, model) == []
    big, _ = vf.decoalesce(model, example, frontend=frontend, **up)
    assert shared_tensors(big, model) == []
    restored, _ = vf.decoalesce(small, mapping=mapping)
    assert shared_tensors(restored, small) == []
    small_before = _snapshot(small)
    _train_a_step(restored, example)
    _assert_same(small_before, small, f"{name} {variant}: the coalesced level")
    _train_a_step(small, example)
    _train_a_step(big, example)
    _assert_same(user_before, model, f"{name} {variant}: the user's model")


def test_capture_and_a_no_op_coalesce_own_their_tensors():
    model, example = zoo.gpt2()
    level = vf.capture(model, example)
    assert shared_tensors(level, model) == []
    same, _ = vf.coalesce(level, width=1.0, depth=1.0)
    assert same is not level and shared_tensors(same, level) == []
    # ties inside the level survive the copy: GPT-2's LM head is its token embedding
    assert same.lm_head.weight is same.transformer.wte.weight


def _sgd(model, example, steps: int, seed: int) -> None:
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        loss = (output_tensor(model(*example)).float() ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


_FACTORS = {"width+depth": dict(width=0.5, depth=0.5), "depth-only": dict(width=1.0, depth=0.5)}
_DEFAULT_ALPHA0 = {("gpt2", "width+depth"), ("gpt2", "depth-only"), ("resnet18", "width+depth")}


@pytest.mark.parametrize("name,factors", [
    pytest.param(n, f, id=f"{n}-{k}", marks=() if (n, k) in _DEFAULT_ALPHA0 else pytest.mark.slow)
    for n in ZOO_NAMES for k, f in _FACTORS.items()])
def test_alpha_zero_vcycle_goes_up_exactly_to_the_weights_it_kept(name, factors):
    model, example = zoo.ZOO[name]()
    frontend = zoo.FRONTEND.get(name, "export")
    user_before = _snapshot(model)
    cycle = vf.VCycle(model, example, levels=2, alpha=0.0, steps=[2, 3, 1], frontend=frontend,
                      **factors)
    kept = None
    for stage in cycle:
        if stage.phase == "up":
            start = stage.model.state_dict()
            diff = max(float((start[k].double() - v.double()).abs().max()) for k, v in kept.items()
                       if v.dtype.is_floating_point)
            assert diff == 0.0, f"{name}: the up stage starts {diff} away from the kept weights"
        _sgd(stage.model, example, stage.steps, stage.index)
        if stage.phase == "down":
            kept = _snapshot(stage.model)
    _assert_same(user_before, model, f"{name}: the user's model after a V-cycle")
