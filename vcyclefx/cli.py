"""The ``vcyclefx`` command line (a contract; see DESIGN.md)."""

from __future__ import annotations

import argparse
import os
import sys

from vcyclefx.errors import VCycleError

# Each command imports what it uses inside its function: `vcyclefx --help`, `inspect` and `train`
# do not load the passes, the level-directory writer or the ONNX exporter they do not need.
from vcyclefx.export.shards import DEFAULT_MAX_SHARD
from vcyclefx.plan.choices import DEPTH_INITS, DEPTH_PAIRINGS, GROW_PAIRINGS, WIDTH_PAIRINGS


def _cmd_inspect(args) -> int:
    from vcyclefx.analysis.report import inspect
    from vcyclefx.capture.specs import model_from_spec
    from vcyclefx.export import stream_cmd

    if args.frontend != "fx" and stream_cmd.wanted(args, args.model):
        # no weight is read: the graph captured on the meta device (or loaded from the capture
        # cache), as the streamed coalesce captures it
        from vcyclefx.level import level_info

        try:
            src = stream_cmd.source_of(args.model, args)
        except stream_cmd.InMemory:
            src = None
        if src is not None:
            report = inspect(src.level, level_info(src.level).example_inputs)
            print(report.to_json() if args.json else report)
            return 0
    found = model_from_spec(args.model, batch=args.batch, seq=args.seq)
    if args.frontend == "fx":
        model, kwargs = found.model, {"frontend": "fx"}
    else:  # the export capture coalesce makes: by repetition where the blocks are identical
        model, kwargs = _model_or_level(found, args)
    report = inspect(model, found.example, **kwargs)
    print(report.to_json() if args.json else report)
    return 0


# Commands that run in this process alone: when run as a program they skip interpreter teardown
# (one to two seconds of finalising torch's and the model's objects) once their output is
# flushed; what they write is complete by then (every file is renamed into place, closed). Not
# `train`, whose workers, compile threads and process groups shut down through atexit.
_QUICK_EXIT = {"inspect", "coalesce", "decoalesce", "interpolate", "export-onnx"}
# ... and of those, the ones that run without the cycle collector (_without_cycle_collector);
# not export-onnx: the ONNX exporter's cycles hold more (+0.14 GiB of peak on a GPT-2 level, for
# 11% of its time)
_NO_CYCLE_COLLECTOR = {"inspect", "coalesce", "decoalesce", "interpolate"}
# ... and the ones that never compile: they run without triton (_without_triton)
_NO_TRITON = {"inspect", "coalesce", "decoalesce", "interpolate", "export-onnx"}


def _progress(msg: str) -> None:
    print(f"vcyclefx: {msg}", file=sys.stderr, flush=True)


def _check_output(args) -> None:
    """Refuse an existing, non-empty output directory before doing any work."""
    from pathlib import Path

    out = Path(args.output)
    if out.exists() and not args.force and (not out.is_dir() or any(out.iterdir())):
        raise VCycleError(f"output directory {out} exists and is not empty: choose another -o "
                          "or pass --force to replace it")


def _check_arg(parser, what: str) -> None:
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help=f"skip the self-check (by default: {what}; an error names the first "
                             "node whose values diverge)")


def _cmd_coalesce(args) -> int:
    from vcyclefx import api
    from vcyclefx.export import stream_cmd
    from vcyclefx.export.leveldir import level_summary, save_level
    from vcyclefx.capture.specs import model_from_spec

    _check_output(args)
    if stream_cmd.wanted(args, args.model):
        try:
            return stream_cmd.coalesce(args)
        except stream_cmd.InMemory:
            pass
    found = model_from_spec(args.model, batch=args.batch, seq=args.seq)
    _progress(f"coalescing {args.model} (width={args.width}, depth={args.depth})")
    model, capture_kwargs = _model_or_level(found, args)
    small, mapping = api.coalesce(model, found.example, width=args.width, depth=args.depth,
                                  pairing=args.pairing, depth_pairing=args.depth_pairing,
                                  check=args.check, **capture_kwargs)
    made = {"made_by": "coalesce", "from": args.model, "width": args.width, "depth": args.depth,
            "pairing": args.pairing, "depth_pairing": args.depth_pairing}
    also = _writer(small, args, made, lambda: _nearest(api.coalesce, found, args))
    save_level(small, args.output, mapping, overwrite=args.force, also=also,
               extra={**made, **level_summary(small, mapping)})
    print(mapping.summary())
    _progress(f"wrote {args.output}")
    return 0


def _cmd_decoalesce(args) -> int:
    from pathlib import Path

    from vcyclefx import api
    from vcyclefx.export import stream_cmd
    from vcyclefx.export.leveldir import level_summary, load_level, save_level
    from vcyclefx.capture.specs import model_from_spec

    _check_output(args)
    if stream_cmd.wanted(args, args.model):
        try:
            return stream_cmd.decoalesce(args)
        except stream_cmd.InMemory:
            pass
    if Path(args.model).is_dir() and (Path(args.model) / "level.json").is_file():
        level, mapping = load_level(args.model)
        example, extra = None, {}
    else:
        found = model_from_spec(args.model, batch=args.batch, seq=args.seq)
        (level, extra), example = _model_or_level(found, args), found.example
        mapping = None
    if args.width is None and args.depth is None:
        if mapping is None:
            raise VCycleError(f"{args.model} has no mapping.json: pass --width/--depth to grow it")
        _progress(f"de-coalescing {args.model} with its mapping.json")
        big, used = api.decoalesce(level, mapping=mapping, depth_init=args.depth_init,
                                   check=args.check)
    else:
        _progress(f"growing {args.model} (width={args.width or 1.0}, depth={args.depth or 1.0})")
        big, used = api.decoalesce(level, example, width=args.width or 1.0,
                                   depth=args.depth or 1.0, depth_init=args.depth_init,
                                   pairing=args.pairing, check=args.check, **extra)
    made = {"made_by": "decoalesce", "from": args.model, "width": args.width,
            "depth": args.depth, "pairing": args.pairing, "depth_init": args.depth_init}
    nearest = None
    if mapping is None or args.width is not None or args.depth is not None:
        nearest = lambda: _nearest(api.decoalesce, found if mapping is None else level, args)  # noqa: E731
    save_level(big, args.output, used, overwrite=args.force, also=_writer(big, args, made, nearest),
               extra={**made, **level_summary(big, used)})
    _progress(f"wrote {args.output}")
    return 0


def _cmd_interpolate(args) -> int:
    from vcyclefx import api
    from vcyclefx.export import stream_cmd
    from vcyclefx.export.leveldir import load_level, save_level

    _check_output(args)
    if stream_cmd.wanted(args, args.dir_a, args.dir_b):
        return stream_cmd.interpolate(args)
    a, mapping = load_level(args.dir_a)
    b, _ = load_level(args.dir_b)
    mixed = api.interpolate(a, b, args.alpha)
    made = {"made_by": "interpolate", "alpha": args.alpha, "from": [args.dir_a, args.dir_b]}
    save_level(mixed, args.output, mapping, overwrite=args.force,
               also=_writer(mixed, args, made), extra=made)
    _progress(f"wrote {args.output} = (1 - {args.alpha}) * {args.dir_a} + {args.alpha} * {args.dir_b}")
    return 0


MODEL_HELP = ("package.module:factory returning (model, example_inputs), timm:NAME or "
              "torchvision:NAME (random weights; keyword overrides after '?', joined by '&', "
              "e.g. timm:convnext_atto?num_classes=10), a Hugging Face model directory, a .pt2 "
              "file saved with torch.export, or a level directory")


def _model_or_level(found, args) -> tuple:
    """(what to transform, capture options): a Hugging Face model with identical blocks captured
    by repetition (vcyclefx.capture.repeat) unless ``--whole-capture``; else the model itself,
    captured whole by the transform."""
    from vcyclefx.capture.recipe import HF
    from vcyclefx.capture.repeat import REPEATED, captured_by_repetition
    from vcyclefx.level import is_level

    if is_level(found.model) or getattr(args, "whole_capture", False) or \
            found.recipe is None or found.recipe.kind != HF:
        return found.model, _capture_kwargs(found)
    level = captured_by_repetition(found.model, found.example, found.recipe)
    if level is None:
        return found.model, _capture_kwargs(found)
    _progress(next(n for n in level.info.notes if REPEATED in n))
    return level, {}


def _capture_kwargs(found) -> dict:
    """Capture options for a model named on the command line (nothing for a level): the level
    takes the model's tensors without copying them, since the command discards the model."""
    from vcyclefx.level import is_level

    if is_level(found.model):
        return {}
    return {"copy_weights": False, **({"recipe": found.recipe} if found.recipe is not None else {})}


def _writer(level, args, card: dict | None = None, nearest=None):
    """What --format adds to the level directory (checked before anything is written);
    ``card``: what made the level, for the README of --format hf; ``nearest()``: the factors
    nearest to the asked ones whose level the class can express, for the refusal's message."""
    if args.format == "level":
        return None
    from vcyclefx.errors import LevelError
    from vcyclefx.export.formats import module_writer

    _progress(f"solving for the original class at the level's sizes (--format {args.format})")
    source = getattr(args, "model", None) or getattr(args, "dir_a", None)
    try:
        return module_writer(level, args.format, source=source, card=card,
                             max_shard_size=args.max_shard_size)
    except LevelError as e:
        if nearest is None:
            raise
        _progress("no configuration expresses this level: trying the nearest factors")
        found = nearest()
        say = (" or ".join(f"--width {w:g} --depth {d:g}" for w, d in found) if found else
               "none (the class cannot express a width change of this model: keep --format "
               "level, or change the depth only)")
        raise LevelError(f"{e}\nnearest factors whose level --format {args.format} can "
                         f"write: {say}") from None


def _nearest(transform, found, args):
    from vcyclefx.export.module import nearest_expressible
    from vcyclefx.level import is_level

    if is_level(found):  # a level directory grown by factors
        model, example, extra = found, None, {}
    else:
        model, example, extra = found.model, found.example, _capture_kwargs(found)
    width = args.width if args.width is not None else 1.0
    depth = args.depth if args.depth is not None else 1.0
    kw = {"depth_pairing": args.depth_pairing} if hasattr(args, "depth_pairing") else {}
    return nearest_expressible(transform, model, example, width, depth, pairing=args.pairing,
                               **kw, **extra)


def _model_arg(p) -> None:
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    _example_args(p)


def _example_args(p) -> None:
    p.add_argument("--batch", type=int, default=None,
                   help="batch size of the example inputs vcyclefx makes (default 2)")
    p.add_argument("--seq", type=int, default=None,
                   help="sequence length of the example token inputs vcyclefx makes (default 16)")


def _out_args(p) -> None:
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="level directory to write")
    p.add_argument("--stream", choices=["auto", "always", "never"], default="auto",
                   help="stream a Hugging Face safetensors directory or a level directory tensor "
                        "by tensor instead of loading it (auto, the default: when it is sharded "
                        "or the weights read and written exceed a quarter of this machine's "
                        "memory). Streaming skips the self-check, which needs the weights in "
                        "memory")
    p.add_argument("--whole-capture", action="store_true",
                   help="for a Hugging Face directory, trace every block (by default, where "
                        "the blocks are identical, two periods of them are traced and repeated: "
                        "the same graph in a fraction of the time)")
    p.add_argument("--force", action="store_true", help="replace DIR if it exists")
    p.add_argument("--format", choices=["level", "hf", "module"], default="level",
                   help="level: the level directory (graph, weights, mapping); hf: also the "
                        "Hugging Face files (config.json + model.safetensors) that the model's own "
                        "from_pretrained loads at the new sizes; module: also model.safetensors "
                        "and module.json, the call that builds the original class at the new "
                        "sizes (timm, torchvision, factories)")
    p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD, metavar="SIZE",
                   help="largest safetensors shard to write, e.g. 5GB or 300MB (default "
                        f"{DEFAULT_MAX_SHARD}, as save_pretrained); a Hugging Face directory of "
                        "safetensors and level directories are transformed by streaming: each "
                        "output tensor made from the input tensors it needs, shards written as "
                        "they fill")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vcyclefx",
        description="Multi-level (V-cycle) training for any PyTorch model by graph rewriting.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ins = sub.add_parser("inspect", help="show the spaces, chains and tied tensors of a model")
    ins.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    _example_args(ins)
    ins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ins.add_argument("--frontend", choices=["export", "fx"], default=None,
                     help="capture front-end (default: torch.export with symbolic batch/sequence "
                          "sizes, the capture coalesce uses)")
    ins.add_argument("--whole-capture", action="store_true",
                     help="for a Hugging Face model, trace every block (by default, where the "
                          "blocks are identical, two periods of them are traced and repeated, as "
                          "coalesce does: the same graph, so the same report)")
    ins.add_argument("--stream", choices=["auto", "always", "never"], default="auto",
                     help="read a Hugging Face safetensors directory or a level directory "
                          "without loading its weights: the model is captured on the meta device, "
                          "as a streamed coalesce captures it (auto, the default: when it is "
                          "sharded or its weights exceed a quarter of this machine's memory)")
    ins.set_defaults(func=_cmd_inspect)

    co = sub.add_parser("coalesce", help="make a smaller level and write it as a level directory")
    _model_arg(co)
    co.add_argument("--width", type=float, default=0.5, help="factor on units per space (default 0.5)")
    co.add_argument("--depth", type=float, default=0.5, help="factor on blocks per chain (default 0.5)")
    co.add_argument("--pairing", choices=WIDTH_PAIRINGS, default=WIDTH_PAIRINGS[0],
                    help="which units share a group (default strided: i with i + n/2)")
    co.add_argument("--depth-pairing", choices=DEPTH_PAIRINGS, default=DEPTH_PAIRINGS[0],
                    help="which blocks share a group (default adjacent: 2i with 2i+1)")
    _check_arg(co, "check that the smaller level's outputs on the example inputs are finite")
    _out_args(co)
    co.set_defaults(func=_cmd_coalesce)

    de = sub.add_parser("decoalesce", help="restore a level directory to its larger shapes "
                                           "(uses DIR/mapping.json), or grow a model by factors")
    de.add_argument("model", metavar="DIR", help="level directory (or MODEL with --width/--depth)")
    _example_args(de)
    de.add_argument("--width", type=float, default=None, help="grow by this factor instead")
    de.add_argument("--depth", type=float, default=None, help="grow by this factor instead")
    de.add_argument("--depth-init", choices=DEPTH_INITS, default=None,
                    help="new blocks: copies (the paper; the default) or exact identities "
                         "(residual writes zeroed); also applies with the mapping.json")
    de.add_argument("--pairing", choices=GROW_PAIRINGS, default=GROW_PAIRINGS[0],
                    help="which new units copy which old ones")
    _check_arg(de, "check that the larger level computes the same function on the example "
                   "inputs where it must (equal groups, identity depth growth)")
    _out_args(de)
    de.set_defaults(func=_cmd_decoalesce)

    it = sub.add_parser("interpolate", help="(1 - alpha) * DIR_A + alpha * DIR_B, same shapes")
    it.add_argument("dir_a", metavar="DIR_A")
    it.add_argument("dir_b", metavar="DIR_B")
    it.add_argument("--alpha", type=float, default=0.25, help="weight of DIR_B (default 0.25)")
    _out_args(it)
    it.set_defaults(func=_cmd_interpolate)
    _register_optional(sub)
    return p


def _register_optional(sub) -> None:
    """Subcommands that live in their own modules register themselves here (lazily: their
    heavy imports happen only when they run)."""
    import importlib

    for module in ("vcyclefx.export.onnx", "vcyclefx.driver.cli"):
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


def _without_cycle_collector() -> None:
    """The transforms run as a program without Python's cycle collector: capture, analysis and
    the passes allocate container objects without pause (FX nodes, symbolic sizes, fake
    tensors), on a heap of hundreds of thousands that torch and transformers leave, and the
    collector keeps walking them. Measured on GPT-2 base (BENCHMARKS.md): a fifth to a third of
    a command's time. Memory freed by reference counting (every tensor a command drops) is freed
    as before; only what cycles hold (the capture's Python objects, not weights) stays until the
    process exits: +0.01-0.05 GiB of peak on GPT-2 base, +0.1 GiB on a 24-layer Llama, whatever
    its weights weigh."""
    import gc

    gc.disable()


def _without_triton() -> None:
    """The transforms and the ONNX export trace, plan, map and export on the CPU and never
    compile, but a capture and ``torch.export``'s serialiser import ``torch._dynamo``, which
    imports triton where it is installed (every CUDA build of torch): its library alone keeps
    78 MB resident and its import takes 0.2 s (BENCHMARKS.md). Marked as absent
    (``sys.modules[name] = None``, which makes ``import triton`` raise ImportError, as where it
    is not installed) before anything imports it; a process that has imported it already keeps
    it."""
    sys.modules.setdefault("triton", None)


def entry() -> None:
    """The ``vcyclefx`` program: ``main()``, then exit (without interpreter teardown after the
    single-process commands)."""
    quick = sys.argv[1:2] and sys.argv[1] in _QUICK_EXIT
    if sys.argv[1:2] and sys.argv[1] in _NO_CYCLE_COLLECTOR:
        _without_cycle_collector()
    if sys.argv[1:2] and sys.argv[1] in _NO_TRITON:
        _without_triton()
    code = main()
    if quick:
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
