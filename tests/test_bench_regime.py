"""tools/bench_regime.py's scoring of the reuse cases: which frontier a run is scored on and which
FLOPs count (known answers on synthetic run records)."""

from __future__ import annotations

import pytest

from tools import bench_regime
from vcyclefx.driver.saving import envelope_against, saving_against


def _run(stage_flops, stage_losses, end_loss):
    """A run record as ``bench_regime.result`` keeps it: stage i spans stage_flops[i] FLOPs."""
    ends, at = [], 0.0
    for i, (f, l) in enumerate(zip(stage_flops, stage_losses)):
        ends.append({"stage": i, "level": [0, 1, 0][i], "flops_start": at, "flops_end": at + f,
                     "val_loss_end": l})
        at += f
    return {"flops": at, "loss": end_loss, "stage_ends": ends, "tokens_per_param": 1.0}


def test_reuse_grow_is_scored_on_the_full_frontier_with_and_without_the_small_models_flops():
    run = _run([1.0, 30.0, 100.0], [5.0, 2.5, 2.0], end_loss=2.0)
    assert bench_regime.scored("reuse-grow", run) == ("full", {"loss": 2.0, "flops": 131.0})
    assert bench_regime.scored("reuse-grow", run, counted=False) == ("full", {"loss": 2.0, "flops": 100.0})
    # a full frontier through (100, 2.2) and (200, 2.0): the grown model reaches 2.0 for 100
    # FLOPs of its own: 50% saved when the small model is given, 34.5% when it is counted
    full = [dict(steps=1, flops=100.0, loss=2.2), dict(steps=2, flops=200.0, loss=2.0)]
    _, free = bench_regime.scored("reuse-grow", run, counted=False)
    assert saving_against(full, free)["flops"] == pytest.approx(0.5)
    _, paid = bench_regime.scored("reuse-grow", run)
    assert saving_against(full, paid)["flops"] == pytest.approx(1 - 131 / 200)


def test_reuse_shrink_is_scored_at_the_end_of_the_coarse_stage_on_the_coarse_frontier():
    run = _run([100.0, 20.0, 1.0], [2.0, 2.4, 2.3], end_loss=2.3)
    own, paid = bench_regime.scored("reuse-shrink", run)
    assert (own, paid) == ("coarse", {"loss": 2.4, "flops": 120.0})
    assert bench_regime.scored("reuse-shrink", run, counted=False)[1] == {"loss": 2.4, "flops": 20.0}
    # the coarse architecture alone reaches 2.4 for 40 FLOPs: the handed-over full model saves
    # half of it, and costs 3x more when its own training is counted
    sizes = {"full": [dict(flops=100.0, loss=2.0), dict(flops=200.0, loss=1.9)],
             "coarse": [dict(flops=20.0, loss=2.6), dict(flops=40.0, loss=2.4), dict(flops=80.0, loss=2.3)]}
    assert envelope_against(sizes, {"flops": 20.0, "loss": 2.4})["flops"] == pytest.approx(0.5)
    assert envelope_against(sizes, paid)["flops"] == pytest.approx(1 - 120 / 40)


def test_a_plain_recipe_is_scored_at_its_end_on_the_full_frontier():
    run = _run([5.0, 50.0, 5.0], [3.0, 2.5, 2.2], end_loss=2.2)
    assert bench_regime.scored("f.02/.08/.90", run) == ("full", {"loss": 2.2, "flops": 60.0})
    assert bench_regime.scored("f.02/.08/.90", run, counted=False) == ("full", {"loss": 2.2, "flops": 60.0})


def test_merge_puts_the_regimes_of_several_studies_in_one_table_and_plot(tmp_path, capsys):
    import json

    def study(tpp, saving):
        seeds = {"1": {"loss": 2.0, "flops": 1.0, "tokens_per_param": 1.5 * tpp, "same_size": saving,
                       "same_size_extrapolated": False, "envelope": saving - 0.1,
                       "envelope_extrapolated": False, "envelope_size": "full", "grow_step": None}}
        return {"params": 100, "tokens_per_step": 10, "regimes": [
            {"tpp": tpp, "steps": tpp * 10, "lr": 0.01, "coarse_lr": 0.02, "seeds": [1],
             "lr_tuning": {}, "coarse_lr_tuning": {}, "frontiers": {},
             "recipes": [{"recipe": "defaults", "seeds": seeds}]}]}

    files = []
    for tpp, saving in ((60, 0.05), (25, 0.2)):
        files.append(tmp_path / f"s{tpp}.json")
        files[-1].write_text(json.dumps(study(tpp, saving)))
    assert bench_regime.main(["--out", str(tmp_path / "map"), "--name", "all",
                              "--merge", *map(str, files)]) == 0
    merged = json.loads((tmp_path / "map" / "all.json").read_text())
    assert [g["tpp"] for g in merged["regimes"]] == [25, 60]  # sorted by tokens per parameter
    table = capsys.readouterr().out.splitlines()
    assert [r.split()[:2] for r in table if r.startswith(("25 ", "60 ")) and "defaults" in r] == \
        [["25", "defaults"], ["60", "defaults"]]
    assert "+20.0%" in table[-2] and "+10.0%" in table[-2] and "-5.0%" in table[-1]
    assert (tmp_path / "map" / "all.png").stat().st_size > 10_000


def test_sizes_parse_to_the_driver_s_model_options_and_bad_ones_say_the_form():
    assert bench_regime.parse_size("1x32x2") == ("1x32", ["--n-layer", "1", "--n-head", "2",
                                                          "--n-embd", "32"])
    assert bench_regime.parse_size("2x64")[1][3] == "4"  # one head per 16 of width
    for bad in ("1x30x4", "2", "0x32", "1x32x2x2", "axb"):
        with pytest.raises(SystemExit, match="LAYERSxWIDTH"):
            bench_regime.parse_size(bad)


def test_the_recipes_that_read_the_full_frontier_are_the_slope_and_same_loss_ones():
    readers = {r for r in bench_regime.RECIPES if bench_regime.reads_frontier(r)}
    assert readers == {"slope", "slope-cap20", "same-loss", "same-loss-f.05/.45/.50"}
