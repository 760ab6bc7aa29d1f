"""Level directories and MODEL specifications (what the CLI reads and writes).

A level directory holds::

    level.pt2            the graph (torch.export format; re-exported with dynamic batch/sequence)
    weights.safetensors  the weights, one entry per tensor (tied names listed in level.json)
    inputs.safetensors   the example inputs the level was captured with
    mapping.json         the mapping that made this level (if one did)
    level.json           a summary: source class, shapes, spaces, chains, aliases

Directories are written atomically: everything goes to a temporary sibling that is renamed into
place only when complete, so a failure never leaves a partial level directory behind.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.export import Dim

from .errors import LevelError, VCycleError
from .level import LevelInfo, level_info, make_level
from .mapping import Mapping

FORMAT = "vcyclefx.level"
VERSION = 1


def _canonical_state(level) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with one entry per tensor object, and alias -> canonical name."""
    state = level.state_dict(keep_vars=True)
    seen: dict[int, str] = {}
    tensors, aliases = {}, {}
    for name, t in state.items():
        key = id(t)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    return tensors, aliases


def reexport(level, example_inputs=None):
    """An ExportedProgram of ``level`` (in training mode, so dropout rates are kept)."""
    info = level_info(level)
    args = tuple(example_inputs if example_inputs is not None else info.example_inputs)
    dyn = set(info.dynamic_dims) if info else set()
    shapes = tuple({d: Dim.AUTO for d in range(x.dim()) if (i, d) in dyn} for i, x in enumerate(args))
    was_training = level.training
    level.train()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(level, args, dynamic_shapes=shapes, strict=False)
    finally:
        level.train(was_training)


def save_level(level, directory, mapping: Mapping | None = None, *, overwrite: bool = False,
               extra: dict | None = None) -> Path:
    directory = Path(directory)
    if directory.exists() and not overwrite and any(directory.iterdir()):
        raise LevelError(f"output directory {directory} exists and is not empty: choose another -o "
                         "or remove it")
    info = level_info(level)
    if info is None:
        raise LevelError("save_level expects a level made by vcyclefx (vf.coalesce/decoalesce/capture)")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    try:
        ep = reexport(level)
        torch.export.save(ep, tmp / "level.pt2")
        tensors, aliases = _canonical_state(level)
        save_file(tensors, str(tmp / "weights.safetensors"))
        save_file({f"input.{i}": x.contiguous() for i, x in enumerate(info.example_inputs)},
                  str(tmp / "inputs.safetensors"))
        if mapping is not None:
            mapping.save(tmp / "mapping.json")
        summary = {
            "format": FORMAT, "version": VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "source_class": info.source_class, "frontend": info.frontend,
            "dynamic_dims": [list(x) for x in info.dynamic_dims],
            "training": bool(level.training),
            "parameters": sum(int(p.numel()) for p in level.parameters()),
            "tensors": {k: list(v.shape) for k, v in tensors.items()},
            "aliases": aliases,
            "notes": list(info.notes),
            **(extra or {}),
        }
        (tmp / "level.json").write_text(json.dumps(summary, indent=1))
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _tie(gm, alias: str, canon: str) -> None:
    *path, leaf = alias.split(".")
    owner = gm
    for part in path:
        owner = getattr(owner, part)
    target = gm.get_parameter(canon) if canon in dict(gm.named_parameters()) else gm.get_buffer(canon)
    if isinstance(target, torch.nn.Parameter):
        setattr(owner, leaf, target)
    else:
        owner.register_buffer(leaf, target)


def _import_source(source_class: str | None) -> None:
    """Import the module of the user's class so its output types (e.g. Hugging Face
    ModelOutput) are registered with pytree before the graph is deserialised."""
    if not source_class or "." not in source_class:
        return
    try:
        importlib.import_module(source_class.rsplit(".", 1)[0])
    except ImportError:
        pass  # deserialisation will report what is missing


def load_level(directory) -> tuple[torch.fx.GraphModule, Mapping | None]:
    """Load a level directory: (level GraphModule, its mapping or None)."""
    d = Path(directory)
    meta_path = d / "level.json"
    if not meta_path.is_file():
        raise LevelError(f"{d} is not a level directory (no level.json); make one with "
                         "'vcyclefx coalesce MODEL -o DIR'")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise LevelError(f"{meta_path} is not valid JSON ({e.msg}, line {e.lineno})") from e
    if meta.get("format") != FORMAT:
        raise LevelError(f"{meta_path}: not a vcyclefx level summary")
    for name in ("level.pt2", "weights.safetensors", "inputs.safetensors"):
        if not (d / name).is_file():
            raise LevelError(f"{d}: missing {name}; the level directory is incomplete")
    _import_source(meta.get("source_class"))
    try:
        ep = torch.export.load(d / "level.pt2")
    except Exception as e:  # noqa: BLE001
        raise LevelError(f"{d / 'level.pt2'}: cannot load the graph ({type(e).__name__}: {e})") from e
    gm = ep.module()
    try:
        weights = load_file(str(d / "weights.safetensors"))
        inputs = load_file(str(d / "inputs.safetensors"))
    except Exception as e:  # noqa: BLE001
        raise LevelError(f"{d}: cannot read the safetensors files ({type(e).__name__}: {e})") from e
    state = dict(weights)
    for alias, canon in meta.get("aliases", {}).items():
        _tie(gm, alias, canon)  # one tensor under several names, as when it was saved
        state[alias] = weights[canon]
    missing, unexpected = gm.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise LevelError(f"{d}: weights do not match the graph (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    example = tuple(inputs[f"input.{i}"] for i in range(len(inputs)))
    info = LevelInfo(example_inputs=example, frontend=meta.get("frontend", "export"),
                     source_class=meta.get("source_class"),
                     dynamic_dims=tuple(tuple(x) for x in meta.get("dynamic_dims", [])),
                     notes=tuple(meta.get("notes", [])))
    make_level(gm, info, training=meta.get("training", False))
    mapping = Mapping.load(d / "mapping.json") if (d / "mapping.json").is_file() else None
    return gm, mapping


def load_model_spec(spec: str):
    """MODEL on the command line -> (model, example_inputs).

    ``package.module:factory`` calls ``factory()``, which returns ``(model, example_inputs)``;
    a ``.pt2`` file saved with ``torch.export.save`` is loaded with its example inputs; a level
    directory is loaded as a level.
    """
    p = Path(spec)
    if spec.endswith(".pt2"):
        if not p.is_file():
            raise VCycleError(f"MODEL {spec!r}: no such file")
        try:
            ep = torch.export.load(p)
        except Exception as e:  # noqa: BLE001
            raise VCycleError(f"MODEL {spec!r}: cannot load the .pt2 file ({type(e).__name__}: {e})") from e
        args = tuple(ep.example_inputs[0]) if ep.example_inputs else None
        if not args:
            raise VCycleError(f"MODEL {spec!r}: the .pt2 file has no example inputs; save it with "
                              "torch.export.save(torch.export.export(model, example_inputs), path)")
        gm = ep.module()
        dyn = tuple((i, d) for i, x in enumerate(
            [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"])
            if isinstance(x, torch.Tensor)
            for d, s in enumerate(x.shape) if isinstance(s, torch.SymInt) and not s.node.expr.is_number)
        make_level(gm, LevelInfo(example_inputs=args, frontend="export", source_class=None,
                                 dynamic_dims=dyn), training=False)
        return gm, args
    if p.is_dir():
        gm, _ = load_level(p)
        return gm, level_info(gm).example_inputs
    if ":" not in spec:
        raise VCycleError(f"MODEL {spec!r}: expected 'package.module:factory', a .pt2 file or a "
                          "level directory")
    mod_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise VCycleError(f"MODEL {spec!r}: cannot import module {mod_name!r} ({e})") from e
    factory = getattr(mod, attr, None)
    if not callable(factory):
        raise VCycleError(f"MODEL {spec!r}: module {mod_name!r} has no callable {attr!r}")
    result = factory()
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)):
        raise VCycleError(f"MODEL {spec!r}: {attr}() must return (model, example_inputs), "
                          f"got {type(result).__name__}")
    model, example = result
    if isinstance(example, torch.Tensor):
        example = (example,)
    return model, tuple(example)
