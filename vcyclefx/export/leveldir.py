"""Level directories and MODEL specifications (what the CLI reads and writes).

A level directory holds::

    level.pt2            the graph (torch.export format, with the dynamic batch/sequence dims)
    weights.safetensors  the weights, each tensor once (tied names in its metadata, vcyclefx.store);
                         or, written by the streaming command line, the shards
                         weights-0000k-of-0000n.safetensors and weights.safetensors.index.json
                         (tied names in the index's "aliases"); level.pt2 then holds meta tensors
    inputs.safetensors   the example inputs the level was captured with
    mapping.json         the mapping that made this level (if one did)
    level.json           a summary: source class, shapes, spaces, chains

Directories are written atomically (``vcyclefx.store.atomic_directory``): everything goes to a
temporary sibling that is renamed into place only when complete, so a failure never leaves a
partial level directory behind. Directories written before the alias map moved into the weights'
metadata list it in ``level.json`` (``"aliases"``); they load the same.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib
import io
import json
import logging
import re
import sys
import warnings
import zipfile
from pathlib import Path

import torch

from vcyclefx.errors import LevelError, brief
from vcyclefx.fx.device import (literals_on, meta_as_fake_cpu, module_device,
                                 move_device_literals_)
from vcyclefx.level import Level, LevelInfo, level_info, make_level, owner_of
from vcyclefx.plan.mapping import Mapping
from vcyclefx.capture.recipe import Recipe
from vcyclefx.export.program import program_of
from vcyclefx.store import (aliases_of, atomic_directory, load_tensors, save_tensors,
                            tensors_from_bytes, tensors_to_bytes)

FORMAT = "vcyclefx.level"
VERSION = 1


def level_summary(level, mapping) -> dict:
    """What ``level.json`` says of a level made by a transform: its resizable spaces, its
    chains and the mapping's summary lines."""
    from vcyclefx.analysis.analyze import analyze

    a = analyze(level)
    return {
        "spaces": [{"key": s.key, "units": s.size, "unit": s.unit, "resizable": s.resizable}
                   for s in a.spaces if s.resizable],
        "chains": [{"container": c.container, "blocks": len(c)} for c in a.chains],
        "mapping": mapping.summary().splitlines() if mapping is not None else [],
    }


def save_level(level, directory, mapping: Mapping | None = None, *, overwrite: bool = False,
               extra: dict | None = None, also=None, weights=None) -> Path:
    """Write ``level`` as a level directory, atomically; ``also(tmp_dir)`` adds files (the
    ``--format hf`` / ``module`` outputs) before the directory is renamed into place.
    ``weights(tmp_dir)``, where given, writes the weights instead of ``weights.safetensors``
    (the streaming command line: sharded, one tensor at a time, ``vcyclefx.export.stream``)."""
    directory = Path(directory)
    if directory.exists() and not overwrite and any(directory.iterdir()):
        raise LevelError(f"output directory {directory} exists and is not empty: choose another -o "
                         "or remove it")
    info = level_info(level)
    if info is None:
        raise LevelError("save_level expects a level made by vcyclefx (vf.coalesce/decoalesce/capture)")
    with atomic_directory(directory) as tmp:
        program = save_program(level, tmp / "level.pt2")
        state = level.state_dict(keep_vars=True)
        if weights is None:
            save_tensors(tmp / "weights.safetensors", state)
        else:
            weights(tmp)
        save_tensors(tmp / "inputs.safetensors", _inputs_state(info))
        if mapping is not None:
            mapping.save(tmp / "mapping.json")
        summary = _summary(level, info, state, extra)
        (tmp / "level.json").write_text(json.dumps(summary, indent=1))
        if also is not None:
            # load_level(tmp) inside also() takes the program just written, not its file
            _WRITTEN[tmp.resolve()] = program
            try:
                also(tmp)
            finally:
                _WRITTEN.pop(tmp.resolve(), None)
    return directory


# level directories being written by save_level -> the ExportedProgram written as their
# level.pt2: loading one inside save_level's ``also`` (--format hf/module) skips deserialising
# it (a 24-layer Llama's streamed `decoalesce --format hf`: 30.5 s against 32.9 s)
_WRITTEN: dict[Path, object] = {}


def save_program(level, f):
    """``torch.export.save`` of the level's graph as a program (:func:`_graph_program`) to the
    path or file ``f``, under :func:`quick_save` and :func:`~vcyclefx.capture.frontend.quick_fx`
    (the GraphModules built on the way compile their code only if it is run); returns the
    program."""
    from vcyclefx.capture.frontend import quick_fx

    with quick_fx(), quick_save():
        program = _graph_program(level)
        torch.export.save(program, f)
    return program


@contextlib.contextmanager
def quick_save():
    """``torch.export.save`` without the check it makes that a canonical form of the serialised
    program exists: torch serialises, then computes that form on a deep copy of the result
    and throws it away (60% of saving a GPT-2 level); the file is the same. A torch internal,
    guarded: where a torch version lacks it, saving is just slower. Restored on exit."""
    try:
        from torch._export.serde import serialize as serde
    except ImportError:
        serde = None
    real = getattr(serde, "canonicalize", None)
    if real is None or getattr(real, "_vcyclefx_skip", False):  # or in effect already
        yield
        return

    def skip(*args, **kwargs):
        return None

    skip._vcyclefx_skip = True
    serde.canonicalize = skip
    try:
        yield
    finally:
        serde.canonicalize = real


def _graph_program(level):
    """The level as an ExportedProgram (:func:`program_of`: the graph as it is, no second
    export) whose parameters and persistent buffers are meta tensors: the weights are written
    once, to the safetensors beside it, and loading takes them from there. Non-persistent
    buffers and constants (small, and in no weights file) stay real."""
    if any(t.is_meta for t in level.state_dict(keep_vars=True).values()):
        # weights on the meta device (the streaming command line's), real rotary tables and
        # constants: traced as a CPU program (fake CPU weights), its device literals the CPU's,
        # as a level written in memory has them
        with meta_as_fake_cpu(level), literals_on(level, torch.device("cpu")):
            ep = program_of(level)
    else:
        ep = program_of(level)
    state = ep.state_dict
    for name, t in list(state.items()):
        meta = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
        state[name] = torch.nn.Parameter(meta, t.requires_grad) \
            if isinstance(t, torch.nn.Parameter) else meta
    return ep


def _summary(level, info: LevelInfo, state: dict, extra: dict | None) -> dict:
    aliases = aliases_of(state)
    return {
        "format": FORMAT, "version": VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source_class": info.source_class, "frontend": info.frontend,
        "dynamic_dims": [list(x) for x in info.dynamic_dims],
        "training": bool(level.training),
        "parameters": sum(int(p.numel()) for p in level.parameters()),
        "tensors": {k: list(v.shape) for k, v in state.items() if k not in aliases},
        "notes": list(info.notes),
        "recipe": info.recipe.to_json() if info.recipe is not None else None,
        "input_names": list(info.input_names),
        **(extra or {}),
    }


def _inputs_state(info: LevelInfo) -> dict[str, torch.Tensor]:
    return {f"input.{i}": x.contiguous() for i, x in enumerate(info.example_inputs)}


def level_to_bytes(level) -> dict:
    """A level as plain bytes (what pickling a Level stores): the re-exported graph, the
    weights and example inputs as safetensors, and the level.json summary."""
    info = level_info(level)
    buf = io.BytesIO()
    save_program(level, buf)
    state = level.state_dict(keep_vars=True)
    return {"pt2": buf.getvalue(), "weights": tensors_to_bytes(state),
            "inputs": tensors_to_bytes(_inputs_state(info)),
            "summary": _summary(level, info, state, None)}


def level_from_bytes(data: dict):
    """The level :func:`level_to_bytes` stored."""
    meta = data["summary"]
    ep = _load_or_import_source(lambda: torch.export.load(io.BytesIO(data["pt2"])),
                                meta.get("source_class"), "pickled level")
    old = meta.get("aliases")  # pickled before the alias map moved into the weights
    return _assemble(ep, tensors_from_bytes(data["weights"], old),
                     tensors_from_bytes(data["inputs"]), meta, "pickled level")


# how a Level pickles (torch.save, multiprocessing): in the level-directory format
Level.pickler = (level_to_bytes, level_from_bytes)


def tie(gm, alias: str, canon: str) -> None:
    """``alias`` becomes the very tensor ``canon`` is (a tied weight)."""
    owner, leaf = owner_of(gm, alias)
    target = gm.get_parameter(canon) if canon in dict(gm.named_parameters()) else gm.get_buffer(canon)
    if isinstance(target, torch.nn.Parameter):
        setattr(owner, leaf, target)
    else:
        owner.register_buffer(leaf, target)


# a pytree node type named in a serialized treespec: {\"type\": \"pkg.module.Class\", ...}
_TREESPEC_TYPE = re.compile(r'\\"type\\": \\"([A-Za-z_]\w*(?:\.\w+)+)\\"')


def _register_output_types(path, what: str, source_class: str | None = None) -> None:
    """Import the modules of the pytree node types a ``.pt2`` archive's treespecs name (e.g. a
    Hugging Face ``ModelOutput``), so that ``torch.export.load`` can rebuild its inputs and
    outputs; a clear error if a module is not installed. A type that its own module does not
    register may be registered by the module of the user's class (``source_class``)."""
    import torch.utils._pytree as pytree

    try:
        with zipfile.ZipFile(path) as z:
            names = {m for n in z.namelist() if n.endswith(".json")
                     for m in _TREESPEC_TYPE.findall(z.read(n).decode("utf-8", "replace"))}
    except (zipfile.BadZipFile, OSError):
        return  # not a zip archive: torch.export.load reports what it is
    for name in sorted(names - set(pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE)):
        module = name.rsplit(".", 1)[0]
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise LevelError(
                f"{what}: its outputs are of type {name}, and module {module!r} cannot be "
                f"imported ({e}); install the package that defines it (the one the model came "
                "from) and try again") from e
        if name not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
            _import_source(source_class)
        if name not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
            raise LevelError(
                f"{what}: its outputs are of type {name}, which importing {module!r} does not "
                "register with torch.utils._pytree; register it (register_pytree_node with "
                f"serialized_type_name={name!r}) before loading")


def load_pt2(path, what: str | None = None, source_class: str | None = None):
    """``torch.export.load`` of ``path`` with the pytree types its treespecs name imported.

    The module of the user's class (``source_class``) is imported only where the graph does not
    load without it (a custom op or a type it registers): for a Hugging Face model that module
    is the whole of transformers' modeling code, 2-3 s of imports, and the ModelOutput types the
    graph names come from ``transformers.modeling_outputs`` alone."""
    what = what or str(path)
    _register_output_types(path, what, source_class)
    return _load_or_import_source(lambda: torch.export.load(path), source_class, what)


def _load_or_import_source(load, source_class: str | None, what: str):
    """``load()``; where it fails, import the module of the user's class and try once more
    (torch's own warning of the first failure silenced: the second try reports)."""
    torch_export = logging.getLogger("torch.export")
    for last in (False, True):
        previous = torch_export.level
        if not last:
            torch_export.setLevel(logging.CRITICAL)
        try:
            with warnings.catch_warnings(), quick_load():
                warnings.simplefilter("ignore")
                return load()
        except Exception as e:  # noqa: BLE001
            if last or not _import_source(source_class):
                raise LevelError(f"{what}: cannot load the graph ({brief(e)})") from e
        finally:
            torch_export.setLevel(previous)


class _Module:
    """A module with some functions replaced (what :func:`quick_load` puts in its place)."""

    def __init__(self, module, **functions):
        self._module = module
        vars(self).update(functions)

    def __getattr__(self, name):
        return getattr(self._module, name)


@contextlib.contextmanager
def quick_load():
    """``torch.export.load`` in half the time, loading the same graph: its deserialiser
    (``torch._export.serde.serialize``) calls ``typing.get_type_hints`` for every schema object
    it builds (tens of thousands; 26 classes) and parses every symbolic size with sympy (thousands
    of strings; 42 distinct in a 12-layer Llama level). Both are pure, so within this context the
    deserialiser's ``typing.get_type_hints`` and ``sympy.sympify`` of a string are memoised (per
    class; per string and the names and objects it may refer to). Torch internals, guarded: where
    a torch version lacks them, loading is just slower. Restored on exit."""
    try:
        from torch._export.serde import serialize as serde
    except ImportError:
        serde = None
    if serde is None or not hasattr(serde, "typing") or not hasattr(serde, "sympy") or \
            isinstance(serde.typing, _Module):  # or already in effect (nested, another thread)
        yield
        return
    real_typing, real_sympy = serde.typing, serde.sympy
    hints: dict = {}
    parsed: dict = {}

    def get_type_hints(obj, globalns=None, localns=None, include_extras=False):
        key = (obj, id(globalns), id(localns), include_extras)
        if key not in hints:
            hints[key] = real_typing.get_type_hints(obj, globalns, localns, include_extras)
        return hints[key]

    def sympify(a, locals=None, *args, **kwargs):  # noqa: A002 - sympy's own keyword
        try:
            key = (a, frozenset((locals or {}).items())) if isinstance(a, str) else None
        except TypeError:  # a value that cannot be a key: parse as torch would
            key = None
        if key is None or args or kwargs:
            return real_sympy.sympify(a, locals, *args, **kwargs)
        if key not in parsed:
            parsed[key] = real_sympy.sympify(a, locals=locals)
        return parsed[key]

    serde.typing = _Module(real_typing, get_type_hints=get_type_hints)
    serde.sympy = _Module(real_sympy, sympify=sympify)
    try:
        yield
    finally:
        serde.typing, serde.sympy = real_typing, real_sympy


def _import_source(source_class: str | None) -> bool:
    """Import the module of the user's class (for what it registers: its output types, custom
    ops); True if that imported it now."""
    if not source_class or "." not in source_class:
        return False
    module = source_class.rsplit(".", 1)[0]
    if module in sys.modules:
        return False
    try:
        importlib.import_module(module)
    except ImportError:
        return False  # deserialisation reports what is missing
    return True


def module_of(ep):
    """``ep.module()`` normalised as a capture is (``unshare_size_arithmetic``): loading a
    program shares the symbolic-size arithmetic that the capture gave each user its own copy of
    (a mixture-of-experts block's ``2 * batch * seq``, one node for every block), which would
    make the blocks' node lists, and so a mapping's links into them, differ from the capture's."""
    from vcyclefx.fx.normalize import unshare_size_arithmetic

    gm = ep.module()
    unshare_size_arithmetic(gm)
    return gm


def _assemble(ep, weights: dict, inputs: dict, meta: dict, where: str):
    """The Level of a loaded ExportedProgram with its weights (``load_tensors``: every name,
    tied ones sharing one tensor; the ties restored in the module) and info."""
    gm = module_of(ep)
    ties = aliases_of(weights)
    for alias, canon in ties.items():
        tie(gm, alias, canon)  # one tensor under several names, as when it was saved
    # a graph saved by the streaming command line holds meta tensors: take the weights' own
    assign = any(t.is_meta for t in gm.state_dict(keep_vars=True).values())
    missing, unexpected = gm.load_state_dict(weights, strict=False, assign=assign)
    if missing or unexpected:
        raise LevelError(f"{where}: weights do not match the graph (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    if assign:
        for alias, canon in ties.items():
            tie(gm, alias, canon)
    return _level_of(gm, inputs, meta)


def info_of(inputs: dict, meta: dict) -> LevelInfo:
    """The LevelInfo a level summary (``level.json``, :func:`_summary`) and its example inputs
    (``inputs.safetensors``) describe."""
    example = tuple(inputs[f"input.{i}"] for i in range(len(inputs)))
    return LevelInfo(example_inputs=example, frontend=meta.get("frontend", "export"),
                     source_class=meta.get("source_class"),
                     dynamic_dims=tuple(tuple(x) for x in meta.get("dynamic_dims", [])),
                     notes=tuple(meta.get("notes", [])),
                     recipe=Recipe.from_json(meta.get("recipe")),
                     input_names=tuple(meta.get("input_names", ())))


def _level_of(gm, inputs: dict, meta: dict):
    level = make_level(gm, info_of(inputs, meta), training=meta.get("training", False))
    device = module_device(level)
    if device is not None:  # a streamed level was saved with meta tensors: literals follow
        move_device_literals_(level, device)
    return level


def _summary_of(d: Path) -> dict:
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
    weights = ("weights.safetensors.index.json" if (d / "weights.safetensors.index.json").is_file()
               else "weights.safetensors")
    for name in ("level.pt2", weights, "inputs.safetensors"):
        if not (d / name).is_file():
            raise LevelError(f"{d}: missing {name}; the level directory is incomplete")
    return meta


def _weights_of(d: Path, meta: dict) -> dict:
    """Every tensor of the level directory's weights: ``weights.safetensors``, or the shards
    ``weights.safetensors.index.json`` lists (tied names in its ``"aliases"``)."""
    index = d / "weights.safetensors.index.json"
    if not index.is_file():
        return load_tensors(d / "weights.safetensors", meta.get("aliases"))
    from safetensors.torch import load_file

    spec = json.loads(index.read_text())
    state = {}
    for file in dict.fromkeys(spec["weight_map"].values()):
        state.update(load_file(str(d / file)))  # the aliases are the index's, not one shard's
    for alias, name in (spec.get("aliases") or {}).items():
        state[alias] = state[name]
    return state


def load_level(directory) -> tuple[torch.fx.GraphModule, Mapping | None]:
    """Load a level directory: (level GraphModule, its mapping or None)."""
    d = Path(directory)
    meta = _summary_of(d)
    ep = _WRITTEN.get(d.resolve())
    if ep is None:
        ep = load_pt2(d / "level.pt2", source_class=meta.get("source_class"))
    try:
        weights = _weights_of(d, meta)
        inputs = load_tensors(d / "inputs.safetensors")
    except Exception as e:  # noqa: BLE001
        raise LevelError(f"{d}: cannot read the safetensors files ({brief(e)})") from e
    gm = _assemble(ep, weights, inputs, meta, str(d))
    mapping = Mapping.load(d / "mapping.json") if (d / "mapping.json").is_file() else None
    return gm, mapping


def graph_of_level(directory) -> tuple[torch.fx.GraphModule, Mapping | None]:
    """A level directory's level without its weights file read: the tensors are what
    ``level.pt2`` holds (meta tensors where the streaming command line wrote it), for
    ``vcyclefx.export.stream`` to bind to the weights' shards."""
    d = Path(directory)
    meta = _summary_of(d)
    gm = module_of(load_pt2(d / "level.pt2", source_class=meta.get("source_class")))
    level = _level_of(gm, load_tensors(d / "inputs.safetensors"), meta)
    mapping = Mapping.load(d / "mapping.json") if (d / "mapping.json").is_file() else None
    return level, mapping
