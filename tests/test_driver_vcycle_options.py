"""The driver's V-cycle options reach vf.VCycle and the loop: --fractions, --lr-scales,
--vcycle-steps, --pairing/--depth-pairing, --carry-optimizer; and how "reached the baseline's
loss" is measured (interpolated between evaluations)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_driver_config import parse
from test_driver_train import rows, tiny
from vcyclefx.driver.config import ConfigError, TrainConfig, check_runtime
from vcyclefx.driver.plot import reach, summarize
from vcyclefx.driver.train import (make_cycle, make_optimizer, main, optimizer_state_by_name,
                                   optimizer_state_from_names, setup)
from vcyclefx.zoo.gpt import GPT, GPTConfig


def test_fractions_and_lr_scales_parse_from_the_command_line_and_survive_json():
    cfg = parse("--fractions", "0.1,0.3,0.6", "--lr-scales", "1,2", "--vcycle-steps", "840")
    assert (cfg.fractions, cfg.lr_scales, cfg.vcycle_total_steps) == ((0.1, 0.3, 0.6), (1.0, 2.0), 840)
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg  # a resumed run compares equal
    assert parse().fractions == () and parse().vcycle_total_steps == 1200  # 0 = 1.5 x --steps
    assert parse("--vcycle-budget", "1").vcycle_total_steps == 800
    assert parse().vcycle_lr_scales() == [1.0, 2.0] and parse("--levels", "3").vcycle_lr_scales() \
        == [1.0, 2.0, 2.0]


@pytest.mark.parametrize("argv,msg", [
    (["--fractions", "0.5,0.5"], "2 entries but --levels 2 makes 3 stages"),
    (["--fractions", "0.1,0.3,0.5"], "must be positive and sum to 1"),
    (["--fractions", "0.1,x,0.5"], "comma-separated numbers"),
    (["--lr-scales", "1,2,4"], "needs 2 positive factors, one per level"),
    (["--levels", "3", "--fractions", "0.1,0.3,0.6"], "give 5"),
    (["--vcycle-steps", "-1"], "--vcycle-steps must be >= 0"),
])
def test_bad_vcycle_options_fail_at_start_up_with_the_fix(argv, msg):
    with pytest.raises(ConfigError, match=msg):
        parse(*argv)


def test_depth_similarity_pairing_is_refused_by_argparse_choices(capsys):
    with pytest.raises(SystemExit):
        parse("--depth-pairing", "similarity")
    assert "invalid choice" in capsys.readouterr().err


def test_carry_optimizer_with_fsdp_passes_the_start_up_checks_and_is_on_by_default_there():
    # the sharded moments are gathered whole for each transition (test_driver_fsdp.py)
    check_runtime(TrainConfig(carry_optimizer=True, fsdp=True, grad_accum=2), "cpu", 2)
    assert TrainConfig().carries_optimizer and TrainConfig(fsdp=True).carries_optimizer
    assert not TrainConfig(fsdp=True, carry_optimizer=False).carries_optimizer


def test_fractions_lr_scales_steps_and_pairing_reach_the_vcycle(tmp_path):
    cfg = tiny(tmp_path, schedule="vcycle", n_layer=4, steps=40, vcycle_steps=50,
               fractions=(0.1, 0.3, 0.6), lr_scales=(1.0, 2.0), pairing="adjacent",
               depth_pairing="strided")
    rt = setup(cfg)
    try:
        cycle = make_cycle(rt).cycle
    finally:
        rt.logger.close()
    assert [(s.level, s.steps, s.lr_scale) for s in cycle.schedule] == \
        [(0, 5, 1.0), (1, 15, 2.0), (0, 30, 1.0)]
    mapping = cycle.mappings[0]
    assert [c.groups for c in mapping.chains] == [[[0, 2], [1, 3]]]  # strided blocks
    assert mapping.spaces and all(s.groups()[0] == [0, 1] for s in mapping.spaces)  # adjacent


def test_optimizer_state_by_name_round_trips_into_a_new_optimizer():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=32, n_layer=1, n_head=2, n_embd=8))
    cfg = TrainConfig()
    opt = make_optimizer(model, cfg, 1e-3, torch.device("cpu"))
    model(torch.randint(0, 32, (2, 8))).sum().backward()
    opt.step()
    named = optimizer_state_by_name(model, opt.state_dict())
    assert set(named) == {n for n, _ in model.named_parameters()}  # tied lm_head counted once
    assert named["wte.weight"]["exp_avg"].shape == model.wte.weight.shape
    fresh = make_optimizer(model, cfg, 1e-3, torch.device("cpu"))
    fresh.load_state_dict(optimizer_state_from_names(model, named,
                                                     fresh.state_dict()["param_groups"]))
    for p in model.parameters():
        assert torch.equal(fresh.state[p]["exp_avg_sq"], opt.state[p]["exp_avg_sq"])
        assert int(fresh.state[p]["step"]) == 1


def test_carry_optimizer_changes_the_first_update_after_each_transition(tmp_path):
    """Same init, data and lr: the runs agree until the first step of the coarse stage (its
    loss is computed before that step's update), then the carried moments (and the carried
    step count of the bias correction) change the update; --vcycle-steps sets the total."""
    common = dict(schedule="vcycle", steps=30, vcycle_steps=40, fractions=(0.1, 0.4, 0.5),
                  lr_scales=(1.0, 2.0), eval_every=0, log_every=1)
    fresh = main(tiny(tmp_path, **common, carry_optimizer=False, out=str(tmp_path / "fresh")))
    carried = main(tiny(tmp_path, **common, carry_optimizer=True, out=str(tmp_path / "carry")))
    a = [r for r in rows(tmp_path / "fresh") if r["event"] == "train"]
    b = [r for r in rows(tmp_path / "carry") if r["event"] == "train"]
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 41))
    assert [r["loss"] for r in a[:5]] == [r["loss"] for r in b[:5]]  # stage 0 (4 steps) + 1st
    assert a[5]["loss"] != b[5]["loss"]
    assert [s["optimizer"] for s in fresh["schedules"]["vcycle"]["stages"]] == ["fresh"] * 3
    assert [s["optimizer"] for s in carried["schedules"]["vcycle"]["stages"]] == \
        ["fresh", "carried", "carried"]
    assert carried["schedules"]["vcycle"]["steps"] == 40


def _ev(step, loss, stage=0, level=0, flops_per_step=10.0, wall_per_step=0.5):
    return {"event": "eval", "step": step, "val_loss": loss, "stage": stage, "level": level,
            "flops": step * flops_per_step, "wall": step * wall_per_step}


def test_reaching_the_baseline_loss_is_interpolated_within_a_level0_stage():
    evals = [_ev(0, 5.0), _ev(50, 3.0), _ev(100, 2.0)]
    hit = reach(evals, 2.5)  # half way between step 50 (3.0) and 100 (2.0)
    assert hit["step"] == 75 and hit["flops"] == 750 and hit["wall"] == 37.5
    assert hit["interpolated"] and hit["eval_step"] == 100
    assert reach(evals, 2.0)["step"] == 100 and not reach(evals, 2.0)["interpolated"]
    assert reach(evals, 1.0) is None
    # a coarse level never counts; the first eval of a new stage is taken as it is
    evals = [_ev(0, 5.0), _ev(10, 4.0), _ev(10, 1.0, stage=1, level=1), _ev(50, 2.5, stage=1,
             level=1), _ev(50, 2.2, stage=2), _ev(100, 1.8, stage=2)]
    assert reach(evals, 2.4)["step"] == 50
    assert reach(evals, 2.0)["step"] == pytest.approx(75)


def test_summary_of_separate_baseline_and_vcycle_runs_reports_the_saving():
    base = [{"event": "end", "schedule": "baseline", "val_loss": 2.0, "flops": 1000.0, "wall": 100.0,
             "tokens": 1, "step": 100}] + [dict(_ev(100, 2.0), schedule="baseline")]
    vc = [dict(_ev(40, 2.5), schedule="vcycle"), dict(_ev(80, 1.5), schedule="vcycle"),
          {"event": "end", "schedule": "vcycle", "val_loss": 1.5, "flops": 800.0, "wall": 40.0,
           "tokens": 1, "step": 80}]
    s = summarize(base + vc)
    assert s["schedules"]["vcycle"]["flops_to_baseline_loss"] == 600.0  # step 60
    assert s["vcycle_saving"]["flops"] == pytest.approx(0.4)
    assert s["vcycle_saving"]["wall"] == pytest.approx(0.7)


@pytest.mark.slow
def test_resume_with_carry_optimizer_after_a_stage_end_matches_an_uninterrupted_run(tmp_path):
    """With checkpoints only at stage ends, a kill inside the last stage resumes from the
    checkpoint at the end of the coarse stage: its optimizer state is carried (mapped through
    the de-coalesce) exactly as the uninterrupted run did."""
    root = Path(__file__).resolve().parents[1]
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"".join(Path(m.__file__).read_bytes() for m in (json, os, subprocess)))
    cmd = [sys.executable, str(root / "tools" / "train.py"), "--n-layer", "2", "--n-head", "2",
           "--n-embd", "32", "--seq-len", "32", "--batch-size", "8", "--warmup", "2",
           "--log-every", "1", "--eval-every", "20", "--eval-batches", "2", "--ckpt-every", "0",
           "--schedule", "vcycle", "--steps", "400", "--fractions", "0.05,0.2,0.75",
           "--carry-optimizer", "--quiet", "--data", str(corpus), "--cache-dir",
           str(tmp_path / "cache")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd + ["-o", str(tmp_path / "full")], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    cut = tmp_path / "cut"
    proc = subprocess.Popen(cmd + ["-o", str(cut)], env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:  # 10 steps into the last stage
        if (cut / "vcycle" / "stage-001" / "cycle.json").exists() and any(
                json.loads(line)["step"] >= 110 for line in
                (cut / "metrics.jsonl").read_text().splitlines()):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    subprocess.run(cmd[:2] + ["--resume", str(cut), "--quiet"], env=env, check=True,
                   stdout=subprocess.DEVNULL)

    def losses(out):
        return [(r["event"], r["step"], r["loss"], r["val_loss"]) for r in rows(out)]

    a, b = losses(tmp_path / "full"), losses(cut)
    assert [r[:2] for r in a] == [r[:2] for r in b]
    assert max(abs((x[2] or 0) - (y[2] or 0)) + abs((x[3] or 0) - (y[3] or 0))
               for x, y in zip(a, b)) <= 1e-6


def test_depth_init_reaches_the_vcycle_and_bad_values_are_refused(tmp_path, capsys):
    assert parse("--depth-init", "identity").depth_init == "identity"
    with pytest.raises(SystemExit):
        parse("--depth-init", "zero")
    assert "invalid choice" in capsys.readouterr().err
    rt = setup(tiny(tmp_path, schedule="vcycle", n_layer=4, steps=12, depth_init="identity"))
    try:
        assert make_cycle(rt).cycle.depth_init == "identity"
    finally:
        rt.logger.close()
