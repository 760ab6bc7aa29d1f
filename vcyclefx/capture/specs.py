"""MODEL on the command line: what it may name, and the example inputs it comes with.

- ``package.module:factory`` — ``factory()`` returns ``(model, example_inputs)``;
- ``timm:NAME`` / ``torchvision:NAME`` — the library's model with random weights
  (``pretrained=False`` / ``weights=None``); images of the model's configured size;
- a Hugging Face model directory (``save_pretrained`` output: ``config.json`` + weights),
  loaded with the class its ``config.architectures`` names, nothing downloaded; token ids inside
  the vocabulary for text models, images of the configured size for vision models;
- a ``.pt2`` file saved with ``torch.export.save`` (its own example inputs);
- a level directory.

Keyword overrides follow the name after ``?``, joined by ``&``; values are Python literals
(numbers, booleans, strings, tuples), anything else is a string::

    timm:convnext_atto?num_classes=10&drop_path_rate=0.0
    torchvision:vit_b_16?image_size=64&num_layers=2
    vcyclefx.zoo:gpt2?n_layer=4

``--batch`` / ``--seq`` set the example batch size and sequence length of models whose inputs
vcyclefx makes (defaults 2 and 16).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from vcyclefx.errors import VCycleError
from vcyclefx.capture.recipe import CALL, Recipe, recipe_of, watched_recipe
from vcyclefx.export.leveldir import load_level, load_pt2
from vcyclefx.level import LevelInfo, level_info, make_level

BATCH, SEQ, IMAGE = 2, 16, 224


@dataclass
class ModelSpec:
    model: torch.nn.Module
    example: tuple
    recipe: Recipe | None = None


def parse_overrides(spec: str, text: str) -> dict:
    out = {}
    for item in filter(None, text.split("&")):
        key, eq, value = item.partition("=")
        if not eq or not key.isidentifier():
            raise VCycleError(f"MODEL {spec!r}: override {item!r} is not NAME=VALUE (write "
                              "e.g. timm:convnext_atto?num_classes=10&depths=(1,1,2,1))")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tokens(vocab: int, batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=_generator())


def _image(channels: int, size, batch: int) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
    return torch.randn(batch, channels, h, w, generator=_generator())


def hf_example(model, spec: str, batch: int, seq: int) -> tuple:
    """Example inputs for a Hugging Face model, from its config and forward() signature."""
    cfg = model.config
    params = inspect.signature(model.forward).parameters
    if getattr(cfg, "is_encoder_decoder", False):
        raise VCycleError(f"MODEL {spec!r}: an encoder-decoder model needs decoder inputs as "
                          "keyword arguments; name a pkg.mod:factory that returns them")
    if "input_ids" in params and getattr(cfg, "vocab_size", None):
        limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        return (_tokens(cfg.vocab_size, batch, min(seq, limit) if limit else seq),)
    if "pixel_values" in params:
        size = getattr(cfg, "image_size", IMAGE)
        return (_image(getattr(cfg, "num_channels", 3), size, batch),)
    raise VCycleError(f"MODEL {spec!r}: cannot make example inputs for {type(model).__name__} "
                      "(its forward takes neither input_ids nor pixel_values); name a "
                      "pkg.mod:factory that returns (model, example_inputs)")


def hf_class(p: Path, spec: str):
    """(config, model class) of a Hugging Face directory: the class its
    ``config.architectures`` names, with the key/value cache off."""
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        cfg = transformers.AutoConfig.from_pretrained(str(p), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise VCycleError(f"MODEL {spec!r}: {p / 'config.json'} is not a Hugging Face config "
                          f"({type(e).__name__}: {e})") from e
    archs = getattr(cfg, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise VCycleError(f"MODEL {spec!r}: config.json names no architecture this transformers "
                          f"knows ({archs or 'architectures is empty'}); add one, e.g. "
                          '"architectures": ["LlamaForCausalLM"]')
    if getattr(cfg, "use_cache", None):
        cfg.use_cache = False  # a key/value cache in the outputs cannot be captured (nor trained)
    return cfg, cls


def _hf_directory(p: Path, spec: str, batch: int, seq: int) -> ModelSpec:
    cfg, cls = hf_class(p, spec)
    has_weights = any(p.glob("*.safetensors")) or any(p.glob("*.bin"))
    try:
        model = (cls.from_pretrained(str(p), config=cfg, local_files_only=True) if has_weights
                 else cls(cfg))
    except Exception as e:  # noqa: BLE001
        raise VCycleError(f"MODEL {spec!r}: {cls.__name__}.from_pretrained failed "
                          f"({type(e).__name__}: {e})") from e
    model.eval()
    return ModelSpec(model, hf_example(model, spec, batch, seq), recipe_of(model))


def _library(spec: str, batch: int) -> ModelSpec:
    lib, _, rest = spec.partition(":")
    name, _, query = rest.partition("?")
    kwargs = parse_overrides(spec, query)
    if lib == "timm":
        import timm

        def build(**kw):
            return timm.create_model(name, pretrained=False, **kw)
    else:
        import torchvision

        def build(**kw):
            return torchvision.models.get_model(name, weights=None, **kw)

    def build_plain():
        return build()

    def build_given():
        return build(**kwargs)

    recipe = None
    try:
        torch.manual_seed(0)
        try:
            model = build_given()
        except TypeError as e:
            if "multiple values for keyword argument" not in str(e):
                raise
            # a builder that fixes the argument itself (torchvision's vit_b_16 and patch_size):
            # call the model's class with the builder's arguments and the overrides
            with torch.device("meta"):
                plain = build_plain()
            base = watched_recipe(build_plain, plain)
            if base is None:
                raise
            recipe = Recipe(CALL, base.target, {**base.args, **kwargs})
            torch.manual_seed(0)
            model = recipe.build()
    except Exception as e:  # noqa: BLE001
        raise VCycleError(f"MODEL {spec!r}: {lib} could not build {name!r} "
                          f"({type(e).__name__}: {e})") from e
    model.eval()
    size = kwargs.get("img_size", kwargs.get("image_size"))
    if size is None:
        size = getattr(model, "image_size", None)
    if size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = tuple(cfg.get("input_size", (3, IMAGE, IMAGE)))[-2:]
    channels = kwargs.get("in_chans", 3)
    recipe = recipe or watched_recipe(build_given, model)
    return ModelSpec(model, (_image(channels, size, batch),), recipe)


def _factory(spec: str) -> ModelSpec:
    target, _, query = spec.partition("?")
    kwargs = parse_overrides(spec, query)
    mod_name, _, attr = target.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise VCycleError(f"MODEL {spec!r}: cannot import module {mod_name!r} ({e})") from e
    factory = getattr(mod, attr, None)
    if not callable(factory):
        raise VCycleError(f"MODEL {spec!r}: module {mod_name!r} has no callable {attr!r}")
    result = factory(**kwargs)
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)):
        raise VCycleError(f"MODEL {spec!r}: {attr}() must return (model, example_inputs), "
                          f"got {type(result).__name__}")
    model, example = result
    if isinstance(example, torch.Tensor):
        example = (example,)
    recipe = recipe_of(model) or Recipe(CALL, target, kwargs, factory=True)
    return ModelSpec(model, tuple(example), recipe)


def _pt2(p: Path, spec: str) -> ModelSpec:
    if not p.is_file():
        raise VCycleError(f"MODEL {spec!r}: no such file")
    ep = load_pt2(p, f"MODEL {spec!r}")
    args = tuple(ep.example_inputs[0]) if ep.example_inputs else None
    if not args:
        raise VCycleError(f"MODEL {spec!r}: the .pt2 file has no example inputs; save it with "
                          "torch.export.save(torch.export.export(model, example_inputs), path)")
    gm = ep.module()
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    dyn = tuple((i, d) for i, x in enumerate(vals) if isinstance(x, torch.Tensor)
                for d, s in enumerate(x.shape)
                if isinstance(s, torch.SymInt) and not s.node.expr.is_number)
    gm = make_level(gm, LevelInfo(example_inputs=args, frontend="export",
                                  source_class=_root_class(gm), dynamic_dims=dyn), training=False)
    return ModelSpec(gm, args)


def _root_class(gm) -> str | None:
    """The exported model's own class, as export recorded it in ``nn_module_stack``."""
    for n in gm.graph.nodes:
        for path, typ in (n.meta.get("nn_module_stack") or {}).values():
            if path == "" and isinstance(typ, str):
                return typ
            if not isinstance(typ, str):
                return None
    return None


def model_from_spec(spec: str, batch: int | None = None, seq: int | None = None) -> ModelSpec:
    """MODEL (see the module docstring) -> model, example inputs and recipe."""
    batch, seq = batch or BATCH, seq or SEQ
    p = Path(spec)
    if spec.endswith(".pt2"):
        return _pt2(p, spec)
    if p.is_dir():
        if (p / "level.json").is_file():
            gm, _ = load_level(p)
            return ModelSpec(gm, level_info(gm).example_inputs, level_info(gm).recipe)
        if (p / "config.json").is_file():
            return _hf_directory(p, spec, batch, seq)
        raise VCycleError(f"MODEL {spec!r} is not a level directory (no level.json) and not a "
                          "Hugging Face model directory (no config.json); make a level with "
                          "'vcyclefx coalesce MODEL -o DIR'")
    if spec.startswith(("timm:", "torchvision:")):
        return _library(spec, batch)
    if ":" not in spec:
        raise VCycleError(f"MODEL {spec!r}: expected 'package.module:factory', timm:NAME, "
                          "torchvision:NAME, a Hugging Face model directory, a .pt2 file or a "
                          "level directory")
    return _factory(spec)


__all__ = ["ModelSpec", "model_from_spec", "parse_overrides", "hf_example", "hf_class"]
