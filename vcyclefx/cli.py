"""The ``vcyclefx`` command line (a contract; see DESIGN.md)."""

from __future__ import annotations

import argparse
import sys

from .errors import VCycleError


def _cmd_inspect(args) -> int:
    from .leveldir import load_model_spec
    from .report import inspect

    model, example = load_model_spec(args.model)
    report = inspect(model, example, **({"frontend": args.frontend} if args.frontend else {}))
    print(report.to_json() if args.json else report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vcyclefx",
        description="Multi-level (V-cycle) training for any PyTorch model by graph rewriting.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ins = sub.add_parser("inspect", help="show the spaces, chains and tied tensors of a model")
    ins.add_argument("model", metavar="MODEL",
                     help="package.module:factory returning (model, example_inputs), a .pt2 file "
                          "saved with torch.export, or a level directory")
    ins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ins.add_argument("--frontend", choices=["export", "fx"], default=None,
                     help="capture front-end (default: torch.export)")
    ins.set_defaults(func=_cmd_inspect)
    _register_optional(sub)
    return p


def _register_optional(sub) -> None:
    """Subcommands that live in their own modules register themselves here (lazily: their
    heavy imports happen only when they run)."""
    import importlib

    for module in ("vcyclefx.onnx_export", "vcyclefx.driver.cli"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith(module.rsplit(".", 1)[0]) and e.name in module:
                continue  # not written yet
            raise
        mod.register_cli(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except VCycleError as e:
        print(f"vcyclefx {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
