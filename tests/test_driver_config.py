"""The driver's config: typed, frozen, unknown keys rejected, presets, CLI built from fields."""

from __future__ import annotations

import argparse
import dataclasses
import warnings

import pytest

from vcyclefx.driver.cli import add_train_arguments, config_from_args
from vcyclefx.driver.config import PRESETS, ConfigError, TrainConfig, check_runtime, preset


def parse(*argv: str) -> TrainConfig:
    return config_from_args(add_train_arguments(argparse.ArgumentParser()).parse_args(argv))


def test_unknown_key_is_rejected_and_the_closest_name_suggested():
    with pytest.raises(ConfigError, match=r"unknown training option 'n_layers'.*did you mean 'n_layer'"):
        TrainConfig.from_dict({"n_layers": 3})


def test_config_is_frozen():
    cfg = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 3  # type: ignore[misc]


def test_every_field_has_a_reason_and_a_command_line_option():
    p = add_train_arguments(argparse.ArgumentParser())
    text = p.format_help()
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help"), f.name
        assert "--" + f.name.replace("_", "-") in text, f.name
    assert "-o OUT" in text or "-o" in text


def test_presets_have_the_documented_sizes():
    g = preset("gpt2")
    assert (g.n_layer, g.n_head, g.n_embd, g.seq_len) == (12, 12, 768, 1024)
    assert g.batch_size * g.grad_accum == 512 and g.weight_decay == 0.01
    assert preset("tiny") == TrainConfig()
    assert set(PRESETS) == {"tiny", "small", "gpt2"}


def test_explicit_options_override_the_preset_and_bools_have_no_forms():
    cfg = parse("--preset", "small", "--steps", "7", "--no-compile", "-o", "x", "--no-bias")
    assert (cfg.n_embd, cfg.steps, cfg.compile, cfg.out, cfg.bias) == (384, 7, False, "x", False)
    assert parse().compile is None  # auto: on CUDA yes, on CPU no


@pytest.mark.parametrize("argv,msg", [
    (["--n-embd", "100", "--n-head", "3"], "not a multiple of --n-head"),
    (["--alpha", "1.5"], "--alpha must be in"),
    (["--width", "2"], "shrink factors"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--min-lr", "1", "--lr", "0.1"], "min-lr"),
])
def test_out_of_range_options_fail_at_start_up_naming_the_option(argv, msg):
    with pytest.raises(ConfigError, match=msg):
        parse(*argv)


def test_runtime_checks_say_the_fix():
    with pytest.raises(ConfigError, match="not divisible by the 2 processes: use a multiple of 2"):
        check_runtime(TrainConfig(grad_accum=3), "cpu", 2)
    with pytest.raises(ConfigError, match="launch with torchrun"):
        check_runtime(TrainConfig(fsdp=True), "cpu", 1)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        check_runtime(TrainConfig(compile=True, dtype="bfloat16"), "cpu", 1)
    text = " ".join(str(x.message) for x in w)
    assert "--no-compile" in text and "bfloat16" in text


def test_resume_keeps_the_runs_config_and_refuses_a_preset(tmp_path):
    (tmp_path / "config.json").write_text(TrainConfig(steps=11, n_embd=64).to_json())
    cfg = parse("--resume", str(tmp_path), "--quiet")
    assert (cfg.steps, cfg.n_embd, cfg.quiet) == (11, 64, True)
    with pytest.raises(ConfigError, match="--preset cannot be combined with --resume"):
        parse("--resume", str(tmp_path), "--preset", "tiny")
    with pytest.raises(ConfigError, match="no config.json"):
        parse("--resume", str(tmp_path / "nope"))


def test_train_subcommand_is_registered_in_the_vcyclefx_cli():
    from vcyclefx.cli import build_parser

    args = build_parser().parse_args(["train", "--steps", "3", "--schedule", "baseline"])
    assert args.command == "train" and config_from_args(args).steps == 3


def test_alpha_one_with_a_narrower_level_warns_that_duplicated_units_stay_identical():
    with pytest.warns(UserWarning, match="--alpha 1 .*stay identical"):
        check_runtime(TrainConfig(alpha=1.0), "cpu", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_runtime(TrainConfig(alpha=0.75), "cpu", 1)
        check_runtime(TrainConfig(alpha=1.0, width=1.0), "cpu", 1)  # depth only: no duplicates


def test_alone_sizes_parse_to_gpt_sizes_and_bad_ones_name_the_form():
    from vcyclefx.driver.schedule import alone_name, parse_alone, schedule_order

    cfg = TrainConfig(schedule="compare", alone_sizes="1x32x2, 2x16x1", coarse_budgets=(1.0, 2.0))
    assert cfg.alone_size_list() == [("1x32x2", (1, 2, 32)), ("2x16x1", (2, 1, 16))]
    order = schedule_order(cfg)
    assert order[-5:] == ["alone-1x32x2-x1", "alone-1x32x2-x2", "alone-2x16x1-x1",
                          "alone-2x16x1-x2", "vcycle"]
    assert parse_alone(alone_name("1x32x2", 2.0)) == ("1x32x2", 2.0)
    assert parse_alone(alone_name(1, 0.5)) == (1, 0.5)
    assert cfg.alone_lr_scale("1x32x2") == cfg.vcycle_lr_scales()[1]
    for bad in ("1x30x4", "1x32", "0x32x2", "axb"):
        with pytest.raises(ConfigError, match="LAYERSxWIDTHxHEADS"):
            TrainConfig(alone_sizes=bad)
    with pytest.raises(ConfigError, match="given twice"):
        TrainConfig(alone_sizes="1x32x2,1X32x2")
    with pytest.raises(ConfigError, match="--model"):
        TrainConfig(alone_sizes="1x32x2", model="gpt2-config.json")
