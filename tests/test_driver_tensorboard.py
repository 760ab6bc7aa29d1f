"""``vcyclefx train --log-to tensorboard``: event files beside metrics.jsonl, read back with
TensorBoard's own EventAccumulator."""

from __future__ import annotations

from pathlib import Path

import pytest

from test_driver_train import rows, tiny
from vcyclefx.cli import main as cli_main
from vcyclefx.driver.train import main

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def _events(folder: Path) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_events_hold_the_metrics_the_levels_and_each_transition(tmp_path):
    cfg = tiny(tmp_path, schedule="vcycle", steps=20, vcycle_steps=20, log_every=2, eval_every=10,
               eval_batches=1, log_to="tensorboard")
    main(cfg)
    out = Path(cfg.out)
    recs = rows(out)
    train = [r for r in recs if r["event"] == "train"]
    stages = [r for r in recs if r["event"] == "stage"]
    acc = _events(out / "tensorboard" / "vcycle")
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in train]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in train], rel=1e-6)
    assert [e.value for e in acc.Scalars("progress/tokens")][-1] == train[-1]["tokens"]
    levels = {e.step: e.value for e in acc.Scalars("vcycle/level")}
    assert all(levels[r["step"]] == r["level"] for r in train)
    assert sorted(set(levels.values())) == [0.0, 1.0]  # the cycle went down and came back
    marks = acc.Scalars("vcycle/stage")
    assert [(e.step, e.value) for e in marks] == [(r["step"], r["stage"]) for r in stages]
    assert len(marks) == 3
    val = acc.Scalars("val/loss")
    assert [e.value for e in val] == pytest.approx(
        [r["val_loss"] for r in recs if r["event"] == "eval"], rel=1e-6)
    texts = acc.Tensors("vcycle/transition/text_summary")  # add_text's entries, one per stage
    assert [e.step for e in texts] == [r["step"] for r in stages]
    said = [e.tensor_proto.string_val[0].decode() for e in texts]
    assert said[1].startswith("stage 1: level 1 (bottom)") and "optimizer carried" in said[1]


def test_log_to_is_a_cli_option_that_refuses_unknown_sinks(capsys):
    with pytest.raises(SystemExit):
        cli_main(["train", "--log-to", "wandb"])
    assert "--log-to" in capsys.readouterr().err
