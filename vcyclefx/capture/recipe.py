"""How a level's original model is built: the recipe ``vf.to_module`` solves for new sizes.

Two kinds, both JSON-serialisable (they travel in ``level.json``):

- ``"hf"``: a Hugging Face ``PreTrainedModel`` class and its config (``config.to_dict()``);
  the fields of the config are what to_module may change. Found on any model that has a
  ``config`` with ``to_dict()`` and whose class has a ``config_class``: no list of families.
- ``"call"``: a callable (a class, or a ``pkg.mod:factory`` returning ``(model, inputs)``) and
  the keyword arguments it was called with; its keyword arguments are what to_module may
  change. For ``timm:``/``torchvision:``/factory models the arguments that reached the model's
  own class are recorded by building it once more on the meta device with its ``__init__``
  watched, so the recipe calls the class directly with everything that differs from its
  defaults.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import json
from dataclasses import dataclass, field

import torch
from torch import nn

from vcyclefx.errors import LevelError
from vcyclefx.level import fetch_attr

HF, CALL = "hf", "call"


def qualname(obj) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def import_object(path: str):
    """``pkg.mod.Class`` or ``pkg.mod:factory`` -> the object."""
    if ":" in path:
        mod, _, attr = path.partition(":")
    else:
        mod, _, attr = path.rpartition(".")
    try:
        obj = importlib.import_module(mod)
    except ImportError as e:
        raise LevelError(f"cannot import {mod!r} to build {path} ({e}); install the package the "
                         "model came from") from e
    try:
        return fetch_attr(obj, attr)
    except AttributeError as e:
        raise LevelError(f"{mod!r} has no {attr!r}; the level was made with another version "
                         "of its package") from e


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


@dataclass(frozen=True)
class Recipe:
    kind: str  # HF or CALL
    target: str  # HF: the model class; CALL: the class or "pkg.mod:factory"
    args: dict  # HF: the config dict; CALL: keyword arguments
    attn: str | None = None  # HF: the attention implementation the level was captured with
    factory: bool = False  # CALL: the target returns (model, example_inputs)
    dropped: tuple = field(default_factory=tuple)  # CALL: arguments that are not JSON values

    def fields(self) -> dict:
        """The values to_module may change: integer fields and lists of integers (not token
        ids: Hugging Face's ``*_token_id`` fields name vocabulary entries, not sizes)."""
        out = {}
        for k, v in self.args.items():
            if k.endswith(("_token_id", "_token_ids")):
                continue
            if _is_int(v) or (isinstance(v, (list, tuple)) and v and all(_is_int(x) for x in v)):
                out[k] = v
        if self.kind == CALL:
            for k, p in _signature_defaults(import_object(self.target)).items():
                if k not in out and (_is_int(p) or (isinstance(p, (list, tuple)) and p
                                                    and all(_is_int(x) for x in p))):
                    out[k] = p
        return out

    def build(self, overrides: dict | None = None, device=None) -> nn.Module:
        """The model with ``overrides`` applied, on ``device`` (e.g. "meta")."""
        overrides = overrides or {}
        if self.kind == HF:
            cls = import_object(self.target)
            cfg = cls.config_class.from_dict(self.config(overrides))
            if self.attn is not None:
                cfg._attn_implementation = self.attn
            with building_on(device):
                return cls(cfg)
        if self.dropped:
            raise LevelError(f"{self.target} was called with {', '.join(self.dropped)}, which are "
                             "not JSON values: the recipe cannot rebuild it")
        fn = import_object(self.target)
        with building_on(device):
            out = fn(**{**self.args, **overrides})
        return out[0] if self.factory else out

    def config(self, overrides: dict) -> dict:
        """The arguments with ``overrides``; a list argument with one entry per unit of a
        changed count (Hugging Face's ``layer_types`` when ``num_hidden_layers`` changes) follows
        it: cut to the new count, or its pattern repeated."""
        out = {**self.args, **overrides}
        for f, new in overrides.items():
            old = self.args.get(f)
            if not (_is_int(old) and _is_int(new)) or old == new or old <= 0:
                continue
            for k, v in self.args.items():
                if k not in overrides and isinstance(v, list) and len(v) == old and v and \
                        not all(_is_int(x) for x in v):
                    out[k] = (v * (new // old + 1))[:new]
        return out

    def to_json(self) -> dict:
        return {"kind": self.kind, "target": self.target, "args": self.args, "attn": self.attn,
                "factory": self.factory, "dropped": list(self.dropped)}

    @staticmethod
    def from_json(d: dict | None) -> "Recipe | None":
        if not d:
            return None
        return Recipe(d["kind"], d["target"], dict(d["args"]), d.get("attn"),
                      bool(d.get("factory", False)), tuple(d.get("dropped", ())))


@contextlib.contextmanager
def building_on(device):
    """Modules made inside are made on ``device`` (None: torch's default); on the meta device
    in-place initialisation is skipped. The default device and the function mode are set only
    inside this ``with``, so an error in the build leaves the caller's torch state as it was."""
    with contextlib.ExitStack() as stack:
        if device is not None:
            stack.enter_context(torch.device(device))
            if str(device) == "meta":
                stack.enter_context(_SkipInPlaceOnMeta())
        yield


class _SkipInPlaceOnMeta(torch.overrides.TorchFunctionMode):
    """Weight initialisation on the meta device is only cost (a meta tensor has no values):
    in-place ops on meta tensors return their input untouched (timm's trunc_normal_ of a small
    ConvNeXt takes 0.15 s per build otherwise)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if (name.endswith("_") and not name.startswith("_") and args
                and isinstance(args[0], torch.Tensor) and args[0].is_meta):
            return args[0]
        return func(*args, **(kwargs or {}))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _signature_defaults(fn) -> dict:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return {}
    return {k: p.default for k, p in sig.parameters.items()
            if p.default is not inspect.Parameter.empty and p.kind in (
                inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}


def hf_recipe(model) -> Recipe | None:
    """The recipe of a Hugging Face model (any model with a ``config`` and a ``config_class``)."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict") or getattr(type(model), "config_class", None) is None:
        return None
    return Recipe(HF, qualname(type(model)), cfg.to_dict(),
                  attn=getattr(cfg, "_attn_implementation", None))


def recipe_of(model) -> Recipe | None:
    """What capture records without help: the Hugging Face recipe, if the model is one."""
    return hf_recipe(model)


def watched_recipe(build, model) -> Recipe | None:
    """The recipe of ``model`` (just made by ``build()``) as a call of its own class: ``build``
    runs once more on the meta device with ``type(model).__init__`` watched, and the arguments
    of its outermost call that differ from the class's defaults are recorded."""
    found = hf_recipe(model)
    if found is not None:
        return found
    cls = type(model)
    seen: list[dict] = []
    original = cls.__init__
    sig = inspect.signature(original)

    @functools.wraps(original)
    def watch(self, *args, **kwargs):
        if type(self) is cls and not seen:
            bound = sig.bind(self, *args, **kwargs)
            seen.append({k: v for k, v in list(bound.arguments.items())[1:]})
        original(self, *args, **kwargs)

    try:
        with _init_replaced(cls, watch), torch.device("meta"):
            build()
    except Exception:  # noqa: BLE001 - a build that cannot run on meta has no recorded recipe
        return None
    if not seen:
        return None
    defaults = _signature_defaults(cls)
    args, dropped = {}, []
    for k, v in seen[0].items():
        if sig.parameters[k].kind is inspect.Parameter.VAR_KEYWORD:
            items = v.items()
        elif sig.parameters[k].kind is inspect.Parameter.VAR_POSITIONAL:
            return None  # positional-only extras cannot be named
        else:
            items = [(k, v)]
        for name, value in items:
            if name in defaults and _same(defaults[name], value):
                continue
            if isinstance(value, tuple):
                value = list(value)
            if _jsonable(value):
                args[name] = value
            else:
                dropped.append(name)
    return Recipe(CALL, qualname(cls), args, dropped=tuple(dropped))


@contextlib.contextmanager
def _init_replaced(cls, init):
    """``cls.__init__`` is ``init`` inside the ``with``; on exit the class's own ``__dict__`` is
    as it was (an ``__init__`` it inherited is not left behind as its own)."""
    own = cls.__dict__.get("__init__")
    cls.__init__ = init
    try:
        yield
    finally:
        if own is None:
            del cls.__init__
        else:
            cls.__init__ = own


def _same(a, b) -> bool:
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:  # noqa: BLE001
        return False
