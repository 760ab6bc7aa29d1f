"""The learning rate at growth and the wsd schedule: ``--lr-schedule wsd`` (warm-up, stable,
linear decay) and ``--lr-at-growth same-loss`` (staged training: the grown model continues as a
from-scratch full model that reached its loss), on known values and in a real driver run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from vcyclefx.driver.config import ConfigError, TrainConfig
from vcyclefx.driver.saving import Frontier
from vcyclefx.driver.schedule import cosine_lr, stage_lr, steps_at_loss, wsd_lr
from vcyclefx.driver.runtime import RunState


def test_wsd_warms_up_holds_and_decays_linearly_to_min_lr():
    lr, lo = 1.0, 0.1
    at = [wsd_lr(s, 100, 10, lr, lo, 0.2) for s in range(101)]
    assert at[0] == pytest.approx(1 / 11) and at[9] == pytest.approx(10 / 11)
    assert all(x == lr for x in at[10:80])  # stable until the last 20 steps
    assert at[90] == pytest.approx((lr + lo) / 2) and at[100] == pytest.approx(lo)
    assert all(a > b for a, b in zip(at[80:100], at[81:101]))  # strictly decaying


def test_the_global_schedule_follows_wsd_over_all_stages_with_the_stage_scale():
    cfg = TrainConfig(lr_schedule="wsd", decay_fraction=0.25, lr=2e-3, min_lr=2e-4, warmup=4,
                      steps=40, vcycle_steps=60, schedule="vcycle")
    s = RunState("vcycle", step=50, stage=2, stage_step=20)
    assert stage_lr(cfg, s, 30, 1.0) == pytest.approx(wsd_lr(50, 60, 4, 2e-3, 2e-4, 0.25))
    s = RunState("vcycle", step=10, stage=1, stage_step=5)
    assert stage_lr(cfg, s, 30, 2.0) == pytest.approx(2 * 2e-3)  # stable, lr scale 2


def test_steps_at_loss_reads_the_frontier_and_same_loss_continues_a_virtual_full_run():
    front = Frontier.from_points([(1e12, 3.0), (1e13, 2.0), (1e14, 1.5)])
    # L = 2.5 lies halfway in log C between 1e12 and 1e13: 10^12.5 FLOPs
    assert steps_at_loss(front, 2.5, 1e9) == round(10 ** 12.5 / 1e9)
    assert steps_at_loss(front, 2.0, 1e10) == 1000
    assert steps_at_loss(front, 9.0, 1e10) == 1  # far above the frontier: at least one step
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup=10, steps=100, schedule="vcycle")
    s = RunState("vcycle", step=200, stage=2, stage_step=30, lr_from=1000)
    assert stage_lr(cfg, s, 300, 1.0) == pytest.approx(cosine_lr(1030, 1300, 10, 1e-3, 1e-4))


def test_same_loss_needs_a_frontier():
    with pytest.raises(ConfigError, match="--lr-at-growth same-loss"):
        TrainConfig(schedule="vcycle", lr_at_growth="same-loss")
    TrainConfig(schedule="compare", lr_at_growth="same-loss")  # its own baselines
    with pytest.raises(ConfigError, match="--decay-fraction"):
        TrainConfig(decay_fraction=0.0)


def test_a_vcycle_with_same_loss_continues_from_the_frontiers_steps(tmp_path):
    from vcyclefx.driver.train import main

    data = tmp_path / "corpus.txt"
    data.write_bytes(b"".join(Path(m.__file__).read_bytes() for m in (json, math, pytest)))
    front = tmp_path / "frontier.json"
    front.write_text(json.dumps({"points": [[1e8, 6.0], [1e10, 4.0], [1e12, 2.0]]}))
    cfg = TrainConfig(n_layer=2, n_head=2, n_embd=16, seq_len=16, batch_size=4, steps=20,
                      warmup=2, lr=3e-3, min_lr=3e-4, eval_every=0, eval_batches=1,
                      log_every=1, ckpt_every=0, schedule="vcycle", fractions=(0.1, 0.3, 0.6),
                      lr_at_growth="same-loss", grow_frontier=str(front),
                      data=str(data), cache_dir=str(tmp_path / "cache"),
                      out=str(tmp_path / "run"), quiet=True)
    main(cfg)
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    stages = [r for r in recs if r["event"] == "stage"]
    assert [s["level"] for s in stages] == [0, 1, 0]
    (grew,) = [r for r in recs if r["event"] == "lr_at_growth"]
    start = [r for r in recs if r["event"] == "eval" and r["step"] == stages[2]["step"]][-1]
    per_step = stages[2]["flops_per_token"] * cfg.tokens_per_step
    n = steps_at_loss(Frontier.from_points([(1e8, 6.0), (1e10, 4.0), (1e12, 2.0)]),
                      start["val_loss"], per_step)
    assert grew["lr_from"] == n and n > 1
    up = stages[2]["steps"]
    trains = [r for r in recs if r["event"] == "train" and r["stage"] == 2]
    assert len(trains) == up
    for k, r in enumerate(trains):  # the record of step k's lr, logged after it
        assert r["lr"] == pytest.approx(cosine_lr(n + k, n + up, 2, 3e-3, 3e-4), rel=1e-9)
    # before growth the global cosine of the V-cycle's 30 steps, the coarse stage at scale 2
    (t1,) = [r for r in recs if r["event"] == "train" and r["step"] == 5]  # step 4's lr
    assert t1["stage"] == 1
    assert t1["lr"] == pytest.approx(2 * cosine_lr(4, 30, 2, 3e-3, 3e-4), rel=1e-9)
