"""Training FLOPs per token come from the graph (FlopCounterMode), attention included."""

from __future__ import annotations

import torch

from vcyclefx.capture.frontend import capture
from vcyclefx.driver.config import TrainConfig
from vcyclefx.driver.train import lr_at, training_flops_per_token
from vcyclefx.zoo.gpt import GPT, GPTConfig


def expected_flops_per_token(L: int, C: int, V: int, T: int) -> int:
    """Forward 2 FLOPs per multiply-add, backward twice that (input and weight gradients):
    6 per matmul weight (blocks 12*C*C each, LM head C*V), plus attention QK^T and AV:
    forward 4*T*C per token and layer, backward 10*T*C (PyTorch counts the flash backward's
    recomputation of the scores, and full, non-causal attention)."""
    return 6 * (12 * L * C * C + C * V) + 14 * L * T * C


def test_flops_per_token_of_gpt_match_the_analytic_count_including_cpu_attention():
    cfg = GPTConfig(block_size=64, n_layer=3, n_head=4, n_embd=64)
    torch.manual_seed(0)
    model = GPT(cfg)
    ids = torch.randint(0, 256, (1, 64))
    got = training_flops_per_token(model, ids)
    assert got == expected_flops_per_token(3, 64, 256, 64)
    assert training_flops_per_token(model, torch.randint(0, 256, (2, 64))) == got  # per token


def test_flops_helper_is_pure_no_grads_no_rng_use():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.1))
    ids = torch.randint(0, 256, (1, 32))
    before = torch.get_rng_state()
    training_flops_per_token(model, ids)
    assert torch.equal(before, torch.get_rng_state())
    assert all(p.grad is None for p in model.parameters())


def test_captured_level_has_the_same_flops_as_the_hand_written_module():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32))
    ids = torch.randint(0, 256, (2, 32))
    level = capture(model, (ids,))
    assert training_flops_per_token(level, ids[:1]) == training_flops_per_token(model, ids[:1])


def test_lr_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    c = TrainConfig(lr=1e-3, min_lr=1e-4, warmup=10, steps=110)
    assert abs(lr_at(c, 0) - 1e-3 / 11) < 1e-12 and abs(lr_at(c, 9) - 1e-3 * 10 / 11) < 1e-12
    assert lr_at(c, 10) == 1e-3
    assert abs(lr_at(c, 60) - 5.5e-4) < 1e-12  # half way: the mean of lr and min_lr
    assert abs(lr_at(c, 110) - 1e-4) < 1e-12 and abs(lr_at(c, 500) - 1e-4) < 1e-12


def test_stage_lr_global_envelope_vs_restart_per_stage():
    from vcyclefx.driver.train import RunState, stage_lr

    c = TrainConfig(lr=1e-3, min_lr=1e-4, warmup=10, steps=110, stage_warmup=4,
                    lr_schedule="global", vcycle_budget=1.0)
    coarse = RunState("vcycle", step=60, stage=1, stage_step=0)
    # global: the envelope at step 60 (half way), x4, ramped over stage_warmup + 1 steps
    assert abs(stage_lr(c, coarse, 50, 4.0) - 4 * 5.5e-4 / 5) < 1e-12
    # stage: the stage's own warm-up from its first step, then a cosine over its 50 steps
    s = c.replace(lr_schedule="stage")
    assert abs(stage_lr(s, coarse, 50, 4.0) - 4 * 1e-3 / 5) < 1e-12
    end = RunState("vcycle", step=109, stage=1, stage_step=49)
    assert abs(stage_lr(s, end, 50, 4.0) - 4 * lr_at(s, 49, 50, 4)) < 1e-12
    base = RunState("baseline", step=37, stage=0, stage_step=37)
    assert stage_lr(c, base, 110, 1.0) == stage_lr(s, base, 110, 1.0) == lr_at(c, 37)
