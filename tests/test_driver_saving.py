"""The effective-saving arithmetic on synthetic frontiers with known answers."""

from __future__ import annotations

import math

import pytest

from vcyclefx.driver.saving import (Envelope, Frontier, describe, effective_saving,
                                    envelope_against, envelope_saving, saving_against,
                                    steady_seconds_per_step, steady_wall)


def law(c: float) -> float:
    """A frontier that is exactly linear in log C: L = 3 - 0.5 ln(C / 1e12)."""
    return 3.0 - 0.5 * math.log(c / 1e12)


BUDGETS = [0.5e12, 0.75e12, 1e12, 1.5e12]


def test_a_schedule_at_half_the_frontier_cost_saves_exactly_half():
    f = Frontier.from_points([(c, law(c)) for c in BUDGETS])
    need = f.cost_at(law(1.2e12))
    assert need.value == pytest.approx(1.2e12, rel=1e-12) and not need.extrapolated
    s = effective_saving(0.6e12, law(1.2e12), f)
    assert s.value == pytest.approx(0.5, abs=1e-12) and not s.extrapolated
    # a schedule costlier than the frontier has a negative saving
    assert effective_saving(1.8e12, law(1.2e12), f).value == pytest.approx(-0.5, abs=1e-12)
    assert f.loss_at(0.9e12).value == pytest.approx(law(0.9e12), abs=1e-12)


def test_interpolation_is_piecewise_linear_in_log_cost_between_the_bracketing_points():
    f = Frontier.from_points([(1.0, 2.0), (4.0, 1.0)])  # loss 1.5 halfway in log C: C = 2
    assert f.cost_at(1.5).value == pytest.approx(2.0, rel=1e-12)
    assert f.loss_at(2.0).value == pytest.approx(1.5, abs=1e-12)


def test_outside_the_bracket_is_none_or_labelled_extrapolated():
    f = Frontier.from_points([(c, law(c)) for c in BUDGETS])
    assert f.bracket == (law(1.5e12), law(0.5e12))
    assert f.cost_at(law(3e12)) is None and effective_saving(1e12, law(3e12), f) is None
    far = f.cost_at(law(3e12), extrapolate=True)  # the last segment's line: exact on this law
    assert far.extrapolated and far.value == pytest.approx(3e12, rel=1e-9)
    s = effective_saving(1e12, law(3e12), f, extrapolate=True)
    assert s.extrapolated and s.value == pytest.approx(1 - 1 / 3, abs=1e-9)
    assert "(extrapolated)" in describe(s.value, s.extrapolated)
    assert describe(None, None).startswith("n/a")


def test_dominated_baseline_points_are_dropped_so_the_frontier_stays_monotone():
    # 1.5e12 ends higher than 1e12 (noise): it buys nothing, so it is not on the frontier
    f = Frontier.from_points([(1e12, 2.0), (0.5e12, 2.5), (1.5e12, 2.1), (2e12, 1.8)])
    assert f.points == ((0.5e12, 2.5), (1e12, 2.0), (2e12, 1.8))
    with pytest.raises(ValueError):
        Frontier.from_points([(0.0, 1.0)])


def test_saving_against_uses_the_baselines_seconds_per_step_for_the_wall_axis():
    bases = [dict(steps=s, flops=s * 1e10, loss=law(s * 1e10), wall=s * 0.2)
             for s in (50, 75, 100, 150)]
    # 120 baseline steps' loss, paid with 60 steps' FLOPs and 90 baseline-steps' seconds
    got = saving_against(bases, dict(flops=60e10, wall=90 * 0.2, loss=law(120e10)))
    assert got["flops"] == pytest.approx(0.5, abs=1e-9)
    assert got["wall"] == pytest.approx(1 - 90 / 120, abs=1e-9)
    assert got["baseline_seconds_per_step"] == pytest.approx(0.2)
    assert got["flops_frontier"] == pytest.approx(120e10) and got["flops_extrapolated"] is False
    # an explicit rate (e.g. the schedule's own level-0 seconds per step) replaces the median
    got = saving_against(bases, dict(flops=60e10, wall=90 * 0.2, loss=law(120e10)),
                         seconds_per_step=0.1)
    assert got["wall"] == pytest.approx(1 - 18 / 12, abs=1e-9)


def test_steady_wall_counts_median_step_times_and_the_transitions_but_not_load_spikes():
    def rec(event, stage, step, wall, **kw):
        return dict(event=event, schedule="vcycle", stage=stage, level=stage, step=step,
                    wall=wall, **kw)

    records = [rec("stage", 0, 0, 2.0, steps=4)]  # 2 s of capture before the first step
    records += [rec("train", 0, s, 2.0 + 0.1 * s) for s in (1, 2, 3)]
    records += [rec("train", 0, 4, 2.3 + 5.0)]  # another job ran: 5 s spike in one step
    records += [rec("stage", 1, 4, 7.8, steps=6)]  # 0.5 s of coalescing
    records += [rec("train", 1, 4 + s, 7.8 + 0.02 * s) for s in range(1, 7)]
    records += [dict(event="stage", schedule="baseline", stage=0, level=0, step=0, wall=9.0,
                    steps=1)]
    assert steady_wall(records, "vcycle") == pytest.approx(2.0 + 4 * 0.1 + 0.5 + 6 * 0.02)
    assert steady_seconds_per_step(records, "vcycle", level=0) == pytest.approx(0.1)


def small_law(c: float) -> float:
    """A smaller model's frontier: better than ``law`` at low cost, worse past C = 1e12
    (the two lines cross where 2.5 - 0.25 ln(C/1e12) = 3 - 0.5 ln(C/1e12): C = e^2 * 1e12)."""
    return 2.5 - 0.25 * math.log(c / 1e12)


def test_the_envelope_is_the_cheapest_size_at_each_loss_and_its_saving_is_known():
    big = Frontier.from_points([(c, law(c)) for c in (1e12, 1e13, 1e14)])
    small = Frontier.from_points([(c, small_law(c)) for c in (1e11, 1e12, 1e13)])
    env = Envelope({"full": big, "coarse": small})
    cross = math.exp(2) * 1e12
    # above the crossing loss the small model is cheaper: at L = small_law(2e12) it costs 2e12,
    # the full model exp(2*(3-L)) * 1e12
    loss = small_law(2e12)
    assert env.cost_at(loss).value == pytest.approx(2e12, rel=1e-9)
    assert env.size_at(loss) == "coarse"
    assert big.cost_at(loss).value == pytest.approx(math.exp(2 * (3 - loss)) * 1e12, rel=1e-9)
    # a schedule spending 3e12 there: same-size saving positive, envelope saving exactly -50%
    same = effective_saving(3e12, loss, big).value
    assert same == pytest.approx(1 - 3e12 / (math.exp(2 * (3 - loss)) * 1e12), abs=1e-9) and same > 0
    assert envelope_saving(3e12, loss, env).value == pytest.approx(-0.5, abs=1e-9)
    # below the crossing loss the full model is the envelope (small model: 1e13 measures to 1.92)
    low = law(3 * cross)
    assert env.size_at(low) == "full"
    assert envelope_saving(2 * cross, low, env).value == pytest.approx(1 - 2 / 3, abs=1e-9)
    # past every measured bracket: extrapolated and labelled
    far = env.cost_at(law(1e15), extrapolate=True)
    assert far.extrapolated and far.value == pytest.approx(1e15, rel=1e-9)
    assert env.cost_at(law(1e15)) is None
    # which size is compute-efficient at a budget: the lower loss at equal cost
    assert env.best_at_cost(2e12)[0] == "coarse" and env.best_at_cost(5e13)[0] == "full"


def test_a_small_model_is_not_credited_with_a_loss_it_was_not_measured_to_reach():
    big = Frontier.from_points([(c, law(c)) for c in (1e12, 1e13, 1e14)])
    # the small model's measured frontier stops at 1e12; its line extrapolated would be cheaper
    small = Frontier.from_points([(c, small_law(c)) for c in (1e11, 1e12)])
    env = Envelope({"full": big, "coarse": small})
    loss = law(5e12)  # inside the full bracket only
    assert env.size_at(loss) == "full" and env.cost_at(loss).value == pytest.approx(5e12, rel=1e-9)


def test_envelope_against_writes_both_sizes_and_the_size_at_the_schedules_loss():
    sizes = {"full": [dict(flops=c, loss=law(c)) for c in (1e12, 1e13, 1e14)],
             "coarse": [dict(flops=c, loss=small_law(c)) for c in (1e11, 1e12, 1e13)]}
    got = envelope_against(sizes, dict(flops=3e12, loss=small_law(2e12)))
    assert got["flops"] == pytest.approx(-0.5, abs=1e-9) and got["size_at_loss"] == "coarse"
    assert got["flops_frontier"] == pytest.approx(2e12, rel=1e-9)
    assert got["flops_extrapolated"] is False
    assert got["best_size_at_cost"]["size"] == "coarse"
    assert got["sizes"]["full"][0] == [1e12, law(1e12)]


def test_the_verdict_says_train_the_smaller_model_when_the_envelope_saving_is_negative():
    from vcyclefx.driver.plot import verdict

    sizes = {"level0": [dict(flops=c, loss=law(c)) for c in (1e12, 1e13, 1e14)],
             "level1": [dict(flops=c, loss=small_law(c)) for c in (1e11, 1e12, 1e13)]}
    loss = small_law(2e12)  # the small model reaches it for 2e12; the schedule spent 3e12
    env = envelope_against(sizes, dict(flops=3e12, loss=loss))
    env["params"] = {"level0": 37760, "level1": 9456}
    summary = {"effective_saving": {"flops": 0.3, "wall": None, "flops_extrapolated": False,
                                    "envelope": env},
               "schedules": {"vcycle": {"tokens_per_param": 37.5, "final_val_loss": loss,
                                        "total_flops": 3e12}}}
    said = verdict(summary)
    assert "saves 30.0% in training FLOPs at 37.5 tokens per parameter" in said
    assert "costs 50.0% more FLOPs" in said
    assert "Train the 9,456-parameter model (level 1 alone) instead" in said
    assert "for 2.000e+12 FLOPs" in said
    env["flops"] = 0.12  # a positive envelope saving is reported as paying
    assert "saves 12.0% of the FLOPs: it pays" in verdict(summary)
