"""The driver's default recipe by regime and what it tells the user (issue 26, item 4)."""

from __future__ import annotations

import pytest

from vcyclefx.driver.config import TrainConfig
from vcyclefx.driver.regime import coarse_params, regime_note
from vcyclefx.train.vcycle import COMPUTE_EFFICIENT_TPP, recommended_fractions
from vcyclefx.zoo.gpt import GPT, GPTConfig

MODEL = dict(n_layer=2, n_head=2, n_embd=32, seq_len=128, batch_size=16, vocab_size=256)


def _params(n_layer, n_head, n_embd):
    m = GPT(GPTConfig(block_size=128, vocab_size=256, n_layer=n_layer, n_head=n_head,
                      n_embd=n_embd, dropout=0.0, bias=True))
    return sum(p.numel() for p in m.parameters())


def test_the_default_fractions_follow_the_tokens_per_parameter():
    assert recommended_fractions(2) == [0.05, 0.9, 0.05]
    assert recommended_fractions(2, COMPUTE_EFFICIENT_TPP - 0.1) == [0.05, 0.9, 0.05]
    assert recommended_fractions(2, COMPUTE_EFFICIENT_TPP) == pytest.approx([0.02, 0.08, 0.90])
    three = recommended_fractions(3, 60.0)  # the way down and up split evenly
    assert three == pytest.approx([0.01, 0.01, 0.08, 0.45, 0.45]) and sum(three) == pytest.approx(1)
    assert recommended_fractions(1, 60.0) == [1.0]


def test_the_driver_picks_the_regime_s_fractions_from_steps_and_parameters():
    params = _params(2, 2, 32)
    assert params == 37_760
    # 2,048 tokens a step: 368 steps = 19.96 tokens per parameter, 369 = 20.01
    below, above = TrainConfig(**MODEL, steps=368), TrainConfig(**MODEL, steps=369)
    assert below.tokens_per_param(params) == pytest.approx(368 * 2048 / 37_760)
    assert below.vcycle_fractions(params) == [0.05, 0.9, 0.05]
    assert above.vcycle_fractions(params) == pytest.approx([0.02, 0.08, 0.90])
    assert above.vcycle_fractions() == [0.05, 0.9, 0.05]  # parameters unknown: the old default
    given = TrainConfig(**MODEL, steps=369, fractions=(0.1, 0.5, 0.4))
    assert given.vcycle_fractions(params) == [0.1, 0.5, 0.4]  # --fractions always wins


def test_the_note_names_the_smaller_model_to_train_below_the_threshold_and_the_recipe_above():
    cfg = TrainConfig(**MODEL, steps=100)
    coarse = coarse_params(cfg)
    assert coarse == _params(1, 1, 16) == 9_456  # built on the meta device, counted exactly
    low = regime_note(cfg, 37_760, coarse)
    assert "5.4 tokens per parameter" in low and "NOT the compute-efficient size" in low
    assert "train the 9,456-parameter model (level 1's architecture) instead" in low
    assert "--fractions 0.05,0.9,0.05" in low
    high = regime_note(TrainConfig(**MODEL, steps=1106), 37_760, coarse)
    assert "60.0 tokens per parameter" in high and "NOT" not in high
    assert "--fractions 0.02,0.08,0.9 (a short coarse phase early)" in high
    mine = regime_note(TrainConfig(**MODEL, steps=1106, fractions=(0.1, 0.5, 0.4)), 37_760, coarse)
    assert "default recipe" not in mine  # the user's own --fractions: no default to announce
    assert coarse_params(TrainConfig(**MODEL, levels=1)) is None

