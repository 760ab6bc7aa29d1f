"""``vcyclefx train``: the command line of the training driver.

The options are made from the fields of :class:`TrainConfig` (name ``n_layer`` -> ``--n-layer``,
help = the field's one-line reason), so ``--help`` explains every option and a new field is an
option at once. Precedence: explicit options > the preset (``--preset``, default ``tiny``) >
the dataclass defaults; with ``--resume DIR`` the run's own saved config replaces the preset.

Module-level imports stay light (argparse and the config): the ``vcyclefx`` CLI imports this
module to register the subcommand on every call.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from vcyclefx.driver.config import PRESETS, ConfigError, TrainConfig
from vcyclefx.errors import VCycleError

_TYPES = {"int": int, "float": float, "str": str}


def add_train_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--preset", choices=list(PRESETS), default=argparse.SUPPRESS,
                   help="starting values of every option: tiny (CPU, minutes), small, gpt2 "
                        "(124M, 12x12x768) (default: tiny)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        names = [flag] + ([f.metadata["short"]] if "short" in f.metadata else [])
        default = "auto" if f.default is None else f.default
        kw = dict(dest=f.name, default=argparse.SUPPRESS,
                  help=f"{f.metadata['help']} (default: {default!s})".replace("%", "%%"))
        if f.type.startswith("bool"):
            kw["action"] = argparse.BooleanOptionalAction
        elif f.metadata.get("parse") == "floats":  # kept a string; the config parses it
            kw["metavar"] = "X,Y,..."
            kw["help"] = f"{f.metadata['help']}".replace("%", "%%")
        else:
            kw["type"] = _TYPES[f.type]
            kw["metavar"] = f.name.upper()
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
                del kw["metavar"]
        p.add_argument(*names, **kw)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's config: preset (or the resumed run's config) overridden by explicit options."""
    explicit = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                if hasattr(args, f.name)}
    if explicit.get("resume"):
        if hasattr(args, "preset"):
            raise ConfigError("--preset cannot be combined with --resume: a resumed run keeps its "
                              "own config (drop --preset)")
        path = Path(explicit["resume"]) / "config.json"
        if not path.exists():
            raise ConfigError(f"--resume {explicit['resume']}: no config.json there, so it is not "
                              "a run directory made by vcyclefx train")
        base = json.loads(path.read_text())
    else:
        name = getattr(args, "preset", "tiny")
        base = {**TrainConfig().to_dict(), **PRESETS[name]}
    return TrainConfig.from_dict({**base, **explicit})


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    # the driver (torch.compile, distributed, data) only when a run starts, not when the CLI
    # registers its options
    from vcyclefx.driver.train import main as train_main

    train_main(cfg)
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a GPT with the V-cycle and/or the baseline and report the saving",
        description="Train a GPT-style causal LM with the V-cycle and/or the plain baseline "
                    "(on CUDA: bf16, torch.compile, fused AdamW, DDP via torchrun).",
    )
    add_train_arguments(p)
    p.set_defaults(func=_cmd_train)


def main(argv: list[str] | None = None) -> int:
    """Entry of ``tools/train.py``: the same options as ``vcyclefx train``."""
    p = argparse.ArgumentParser(prog="train.py", description="vcyclefx training driver "
                                "(same options as `vcyclefx train`)")
    args = add_train_arguments(p).parse_args(argv)
    try:
        return _cmd_train(args)
    except VCycleError as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 2
