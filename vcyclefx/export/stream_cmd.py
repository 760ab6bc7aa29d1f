"""The streaming form of ``vcyclefx coalesce / decoalesce / interpolate`` (see
:mod:`vcyclefx.export.stream`): used for a Hugging Face directory of safetensors and for level
directories, unless the pairing needs the weights' values (``similarity``)."""

from __future__ import annotations

import sys
from pathlib import Path

from vcyclefx.errors import CaptureError, LevelError
from vcyclefx.capture.repeat import REPEATED
from vcyclefx.export.stream import (Source, hf_source, interpolated, level_source, stream_weights,
                                    streamable)


def _progress(msg: str) -> None:
    print(f"vcyclefx: {msg}", file=sys.stderr, flush=True)


def wanted(args, *dirs) -> bool:
    """Whether the command streams: every input is a streamable directory, the plan does not
    read weight values, and ``--stream`` says so (``auto``: an input is sharded, as released
    checkpoints of several GB are, or the weights it reads and writes exceed a quarter of the
    machine's memory, where holding them whole is what streaming avoids; a smaller single-file
    checkpoint is transformed in memory, with the self-check). What a command writes counts: a
    ``decoalesce`` of a small level writes the full-size model."""
    mode = getattr(args, "stream", "auto")
    if mode == "never" or not all(streamable(d) for d in dirs) or \
            getattr(args, "pairing", None) == "similarity":
        return False
    if mode == "auto" and not any(sharded(d) for d in dirs) and _fits(args, *dirs):
        return False
    return True


def _fits(args, *dirs) -> bool:
    """The weights the command reads (``dirs``) and those it writes fit in a quarter of the
    machine's memory."""
    read = sum(_weight_bytes(d) for d in dirs)
    return read + _written_bytes(args, dirs[0]) <= _memory_bytes() // 4


def _written_bytes(args, directory) -> int:
    """An upper bound on the bytes of weights the command writes, from the input's size: a
    coalesce shrinks every tensor by at most its width factor (a matrix by its square, a chain by
    its depth factor), a growth grows them by at most width² × depth; a decoalesce with the
    level's ``mapping.json`` writes the mapping's large shapes (in the input's dtype)."""
    command = getattr(args, "command", None)
    size = _weight_bytes(directory)
    if command in ("coalesce", "interpolate"):
        return int(size * min(1.0, getattr(args, "width", None) or 1.0))
    if command != "decoalesce":
        return 0  # inspect writes no weights
    width, depth = getattr(args, "width", None), getattr(args, "depth", None)
    if width is not None or depth is not None:
        return int(size * max(1.0, width or 1.0) ** 2 * max(1.0, depth or 1.0))
    ratio = _mapping_growth(Path(directory) / "mapping.json")
    return int(size * ratio)


def _mapping_growth(path: Path) -> float:
    """The elements of a mapping's large shapes over those of its small ones (1 where the file is
    missing or unreadable: the command reports that itself)."""
    import json
    import math

    try:
        spec = json.loads(path.read_text())
        large = sum(math.prod(s) for s in spec["large_shapes"].values())
        small = sum(math.prod(s) for s in spec["small_shapes"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return 1.0
    return max(1.0, large / small) if small else 1.0


def _say_check_skipped(args, reader) -> None:
    """Say that streaming skips the self-check, where the in-memory path would have run it: on
    float32 levels only (from the source's headers; a bf16 checkpoint is not checked in memory
    either)."""
    import torch

    floats = [e.dtype for e in reader.entries.values() if e.dtype.is_floating_point]
    if getattr(args, "check", False) and floats and all(d == torch.float32 for d in floats):
        _progress("streaming: the self-check is skipped (it needs the weights in memory; "
                  "--stream never transforms in memory and checks)")


def sharded(directory) -> bool:
    """A Hugging Face directory or a level directory whose weights are sharded (an index)."""
    d = Path(directory)
    return any((d / f"{stem}.safetensors.index.json").is_file() for stem in ("model", "weights"))


def _weight_bytes(directory) -> int:
    return sum(f.stat().st_size for f in Path(directory).glob("*.safetensors"))


def _memory_bytes() -> int:
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: stream only when asked
        return 1 << 62


class InMemory(Exception):
    """Under ``--stream auto``: a checkpoint that fits in memory whose model cannot be captured
    on the meta device; the command transforms it in memory instead (nothing was written)."""


def source_of(spec: str, args) -> Source:
    from vcyclefx.capture.recipe import recipe_of

    if (Path(spec) / "level.json").is_file():
        return level_source(spec)
    import time

    from vcyclefx.level import level_info

    start = time.perf_counter()
    try:
        src = hf_source(spec, spec, args.batch or 2, args.seq or 16, recipe_of,
                        repeat=not getattr(args, "whole_capture", False))
    except CaptureError as e:
        if getattr(args, "stream", "auto") != "auto" or not _fits(args, spec):
            raise
        first = str(e).splitlines()[0]
        _progress(f"{spec}: its model could not be captured on the meta device ({first}); it "
                  "fits in memory, so it is loaded and transformed there (--stream never does "
                  "so from the start)")
        raise InMemory(spec) from e
    how = next((n for n in level_info(src.level).notes if REPEATED in n), "every block traced")
    took = time.perf_counter() - start
    if src.cached:
        from vcyclefx.capture.cache import root

        _progress(f"loaded the capture of {spec} from the capture cache {root()} in {took:.1f} s "
                  f"({how}; VCYCLEFX_CAPTURE_CACHE=off captures anew)")
    else:
        _progress(f"captured {spec} on the meta device in {took:.1f} s ({how})")
    return src


def _after(args, card: dict):
    """``also=`` of save_level for ``--format hf/module``: the written level is loaded back (its
    weights, once: the output's size) and solved for its class, then the files are written."""
    if args.format == "level":
        return None

    def also(tmp: Path) -> None:
        from vcyclefx.export.formats import module_writer
        from vcyclefx.export.leveldir import load_level

        _progress(f"solving for the original class at the level's sizes (--format {args.format})")
        level, _ = load_level(tmp)
        module_writer(level, args.format, source=card.get("source_dir"), card=card,
                      max_shard_size=args.max_shard_size)(tmp)

    return also


def _check_hf(level, args) -> None:
    from vcyclefx.capture.recipe import HF
    from vcyclefx.level import level_info

    recipe = level_info(level).recipe
    if args.format == "hf" and (recipe is None or recipe.kind != HF):
        raise LevelError(f"--format hf needs a Hugging Face model; "
                         f"{recipe.target if recipe else 'this level'} is not one (use --format module)")


def _reuse_freed_memory() -> None:
    """glibc's malloc keeps the memory of freed tensors up to 32 MiB for the next ones instead of
    giving it back to the system and faulting it in again (zeroed) for the next tensor: the
    replay frees and makes tensors of the same few sizes hundreds of times, and on the virtual
    machines measured here a first touch of memory costs about as much as the arithmetic. The
    peak is unchanged (what is kept is reused). Only in this command's process; a no-op off
    glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep the freed top of the heap
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: tensors up to 32 MiB from the heap
    except (OSError, AttributeError):
        pass


def _save(level, mapping, src_dirs, args, recorder, reader, extra, produce=None) -> None:
    from vcyclefx.export.leveldir import level_summary
    from vcyclefx.export.leveldir import save_level

    from vcyclefx.export.stream import materialize_extras

    _check_hf(level, args)
    _say_check_skipped(args, reader)
    _reuse_freed_memory()
    materialize_extras(level, recorder, reader.get)
    card = {"source_dir": src_dirs[0], **extra}
    summary = level_summary(level, mapping) if extra.get("made_by") != "interpolate" else {}
    save_level(level, args.output, mapping, overwrite=args.force, also=_after(args, card),
               extra={**extra, **summary},
               weights=stream_weights(level, recorder, reader, args.max_shard_size, produce))


def coalesce(args) -> int:
    from vcyclefx import api
    from vcyclefx.export.record import Recorder

    src = source_of(args.model, args)
    _progress(f"coalescing {args.model} (width={args.width}, depth={args.depth}), streaming "
              "its weights")
    with Recorder(src.leaves) as rec:
        small, mapping = api.coalesce(src.level, width=args.width, depth=args.depth,
                                      pairing=args.pairing, depth_pairing=args.depth_pairing,
                                      check=False)
    _save(small, mapping, [args.model], args, rec, src.reader,
          {"made_by": "coalesce", "from": args.model, "width": args.width, "depth": args.depth,
           "pairing": args.pairing, "depth_pairing": args.depth_pairing})
    print(mapping.summary())
    _progress(f"wrote {args.output}")
    return 0


def decoalesce(args) -> int:
    from vcyclefx import api
    from vcyclefx.errors import VCycleError
    from vcyclefx.export.record import Recorder

    src = source_of(args.model, args)
    if args.width is None and args.depth is None:
        if src.mapping is None:
            raise VCycleError(f"{args.model} has no mapping.json: pass --width/--depth to grow it")
        _progress(f"de-coalescing {args.model} with its mapping.json, streaming its weights")
        with Recorder(src.leaves) as rec:
            big, used = api.decoalesce(src.level, mapping=src.mapping, depth_init=args.depth_init,
                                       check=False)
    else:
        _progress(f"growing {args.model} (width={args.width or 1.0}, depth={args.depth or 1.0}), "
                  "streaming its weights")
        with Recorder(src.leaves) as rec:
            big, used = api.decoalesce(src.level, width=args.width or 1.0,
                                       depth=args.depth or 1.0, depth_init=args.depth_init,
                                       pairing=args.pairing, check=False)
    _save(big, used, [args.model], args, rec, src.reader,
          {"made_by": "decoalesce", "from": args.model, "width": args.width, "depth": args.depth,
           "pairing": args.pairing, "depth_init": args.depth_init})
    _progress(f"wrote {args.output}")
    return 0


def interpolate(args) -> int:
    from vcyclefx.api import _check_alpha
    from vcyclefx.export.record import Recorder

    _check_alpha(args.alpha)
    a, b = level_source(args.dir_a), level_source(args.dir_b)
    _save(a.level, a.mapping, [args.dir_a, args.dir_b], args, Recorder(a.leaves), a.reader,
          {"made_by": "interpolate", "alpha": args.alpha, "from": [args.dir_a, args.dir_b]},
          produce=interpolated(a, b, args.alpha))
    _progress(f"wrote {args.output} = (1 - {args.alpha}) * {args.dir_a} + {args.alpha} * "
              f"{args.dir_b}")
    return 0
