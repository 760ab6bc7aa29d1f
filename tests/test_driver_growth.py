"""--grow-when slope: the growth criterion on synthetic curves with a known switch point, and
the driver ending the coarse stage early with the V-cycle's total steps kept."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from vcyclefx.driver.config import ConfigError, TrainConfig
from vcyclefx.driver.growth import (curve_slope, frontier_slope, growth_point, load_frontier,
                                    should_grow)
from vcyclefx.driver.saving import Frontier


def full(c: float) -> float:
    """The full model's frontier: L = 3 - 0.5 ln(C / 1e12), so dL/dC = -0.5 / C_full(L)."""
    return 3.0 - 0.5 * math.log(c / 1e12)


def coarse(c: float) -> float:
    """The coarse level's own curve: L = 2.5 - 0.25 ln(C / 1e12), dL/dC = -0.25 / C.

    At C = x 1e12 its loss is the full model's at C_full = e x^0.5 1e12, where the full slope is
    -0.5 / C_full; the coarse slope is the shallower one once 0.25 / x < 0.5 / (e x^0.5), i.e.
    x > e^2 / 4: the switch point is C* = e^2 / 4 * 1e12 = 1.847e12."""
    return 2.5 - 0.25 * math.log(c / 1e12)


FRONTIER = Frontier.from_points([(c, full(c)) for c in (1e12, 1e13, 1e14)])


def test_frontier_slope_is_the_derivative_of_the_log_linear_frontier():
    for c in (2e12, 5e13):
        assert frontier_slope(FRONTIER, full(c)) == pytest.approx(-0.5 / c, rel=1e-9)
    assert curve_slope([(1.0, 3.0), (2.0, 2.0), (3.0, 1.0)]) == pytest.approx(-1.0)


@pytest.mark.parametrize("window", [2, 4])
def test_the_coarse_stage_ends_at_the_known_switch_point(window):
    step = 0.01e12
    points = [(c, coarse(c)) for c in (0.5e12 + k * step for k in range(300))]
    k = growth_point(points, FRONTIER, window)
    switch = math.e ** 2 / 4 * 1e12
    assert k is not None
    # a fitted window lags the point it ends at by at most half the window
    assert switch <= points[k][0] <= switch + window * step
    assert not should_grow(points[:k], FRONTIER, window)


def test_a_coarse_loss_that_stops_falling_grows_at_once_and_a_steep_one_never():
    flat = [(1e12 + k * 1e10, 2.0) for k in range(6)]
    assert growth_point(flat, FRONTIER, 4) == 3
    steep = [(c, full(c) - 1.0 * math.log(c / 1e12)) for c in (1e12 * (1 + k / 10) for k in range(8))]
    assert growth_point(steep, FRONTIER, 4) is None


def test_grow_when_slope_needs_a_frontier_and_a_frontier_file_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="--grow-frontier"):
        TrainConfig(schedule="vcycle", grow_when="slope")
    TrainConfig(schedule="compare", grow_when="slope")  # its own baselines
    bad = tmp_path / "f.json"
    bad.write_text(json.dumps({"points": [[1e12, 2.0]]}))
    with pytest.raises(ConfigError, match="needs 2 or more"):
        load_frontier(bad)


@pytest.mark.slow  # a whole driver run with evaluations: about 60 s on the 2-core machine
def test_the_driver_grows_early_and_gives_the_steps_left_to_the_way_up(tmp_path):
    from vcyclefx.driver.train import main

    data = tmp_path / "corpus.txt"
    data.write_bytes(b"".join(Path(m.__file__).read_bytes() for m in (json, subprocess, pytest)))
    front = tmp_path / "frontier.json"  # a full model far steeper than any coarse level
    front.write_text(json.dumps({"points": [[1e6, 20.0], [1e7, 0.01]]}))
    cfg = TrainConfig(n_layer=2, n_head=2, n_embd=32, seq_len=32, batch_size=8, steps=40,
                      warmup=2, lr=3e-3, eval_every=4, eval_batches=2, log_every=5,
                      ckpt_every=0, schedule="vcycle", fractions=(0.1, 0.6, 0.3),
                      grow_when="slope", grow_frontier=str(front), grow_window=2,
                      data=str(data), cache_dir=str(tmp_path / "cache"),
                      out=str(tmp_path / "run"), quiet=True)
    summary = main(cfg)
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (grow,) = [r for r in recs if r["event"] == "grow"]
    stages = [r for r in recs if r["event"] == "stage"]
    assert [s["level"] for s in stages] == [0, 1, 0]
    assert grow["planned_steps"] == 36 and grow["steps"] < 36  # 0.6 of 60 steps, ended early
    assert stages[2]["step"] == stages[1]["step"] + grow["steps"]
    v = summary["schedules"]["vcycle"]
    assert v["steps"] == 60  # the V-cycle's total is unchanged: the way up took the rest
    # FLOPs are those of the steps taken: the coarse stage's planned ones would cost less
    per = {s["level"]: s["flops_per_token"] * cfg.tokens_per_step for s in stages}
    assert v["total_flops"] == pytest.approx(per[0] * (60 - grow["steps"]) + per[1] * grow["steps"])
