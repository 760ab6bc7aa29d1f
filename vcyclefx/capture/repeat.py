"""Capture by repetition: trace two periods of a model's blocks and repeat them.

``torch.export`` traces every block of a model, and on a meta-device model that trace is the
whole cost of a capture: about 0.3 s per GPT-2 block on a 2-core machine, so 4 s for GPT-2 base
and most of a minute for an 80-block checkpoint, where the streamed weights take seconds. When
the blocks of a Hugging Face model are identical (same classes, same settings, same tensor
shapes: one period ``p`` of layer kinds repeated, ``p`` = 1 for most models, 2 for Gemma-2's
sliding/global pattern), a model of the same config with ``2p`` blocks is captured instead and
grown to the full count by the depth pass (each new block a copy of the graph of the block at
its position in the period, the same construction ``decoalesce --depth`` uses). The result is
then checked against the full model: the same tensor names, shapes and dtypes, and it takes the
full model's (bound) tensors. Where anything differs (blocks that are not identical, a config
whose other fields depend on the layer count, a class that reads the layer count in a block's
``forward``), the model is captured whole, as before.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import logging
import re

import torch

from vcyclefx.fx.device import move_device_literals_

log = logging.getLogger(__name__)

# attributes that number a block (differ from block to block by construction)
_INDEX_NAMES = {"layer_idx", "layer_id", "layer_index", "layer_number", "block_idx", "idx",
                "block_id", "layer_num"}
_COUNT_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_SIMPLE = (int, float, str, bool, type(None))
MAX_PERIOD = 4
REPEATED = "and repeated them"  # in the level's note when it was captured by repetition


def _simple(v) -> bool:
    if isinstance(v, (tuple, list)):
        return all(_simple(x) for x in v)
    return isinstance(v, _SIMPLE) or isinstance(v, torch.dtype)


def block_signature(block: torch.nn.Module) -> tuple:
    """What makes two blocks compute the same function of their own tensors: each submodule's
    class and plain settings (the block's number left out), each tensor's name, shape, dtype."""
    out = []
    for name, mod in block.named_modules():
        settings = tuple(sorted((k, repr(v)) for k, v in vars(mod).items()
                                if not k.startswith("_") and k not in _INDEX_NAMES and _simple(v)))
        out.append((name, type(mod).__qualname__, settings))
    for name, t in block.state_dict(keep_vars=True).items():
        out.append((name, tuple(t.shape), t.dtype))
    for name, t in block.named_buffers():  # non-persistent ones too
        out.append(("buffer", name, tuple(t.shape), t.dtype))
    return tuple(out)


def _period(sigs: list) -> int | None:
    n = len(sigs)
    for p in range(1, MAX_PERIOD + 1):
        if n % p == 0 and all(sigs[i] == sigs[i % p] for i in range(n)):
            return p
    return None


def block_list(model: torch.nn.Module, n: int) -> str | None:
    """The path of the one ModuleList of ``n`` blocks of one class, or None."""
    found = [name for name, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) == n and
             len({type(b) for b in m}) == 1]
    return found[0] if len(found) == 1 else None


def _reads_count(block: torch.nn.Module) -> bool:
    """Whether a module class inside ``block`` names a layer-count field in its ``forward``."""
    pat = re.compile(r"\b(" + "|".join(_COUNT_FIELDS) + r")\b")
    for cls in {type(m) for m in block.modules()}:
        try:
            src = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            return True  # cannot tell
        if pat.search(src):
            return True
    return False


def _count_field(cfg) -> str | None:
    for f in _COUNT_FIELDS:
        if isinstance(getattr(cfg, f, None), int):
            return f
    return None


def template_config(cfg, n: int, k: int, p: int):
    """``cfg`` with ``k`` blocks: the count field set, each per-block list (``layer_types``)
    cut to its first ``k`` entries (it must repeat with period ``p``); None if another field
    of the config seems to depend on the block count."""
    field = _count_field(cfg)
    if field is None:
        return None
    small = copy.deepcopy(cfg)
    setattr(small, field, k)
    for key, v in vars(cfg).items():
        if isinstance(v, (list, tuple)) and len(v) == n and key != field:
            if any(v[i] != v[i % p] for i in range(n)):
                return None
            setattr(small, key, type(v)(v[:k]))
    if getattr(small, field) != k:  # an attribute map that did not take
        return None
    return small


@dataclasses.dataclass(frozen=True)
class Growth:
    """How a captured model of ``k`` blocks grows to the full model's ``n``: the block list at
    ``path`` repeats with period ``p``; ``names``: the full model's state names in its order.
    What the capture cache (:mod:`vcyclefx.capture.cache`) keeps beside the ``k``-block level."""
    path: str
    n: int
    k: int
    p: int
    names: tuple[str, ...]

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "names": list(self.names)}

    @classmethod
    def from_json(cls, d: dict) -> "Growth":
        return cls(d["path"], int(d["n"]), int(d["k"]), int(d["p"]), tuple(d["names"]))


def repeated_capture(model: torch.nn.Module, build, capture_one, min_blocks: int = 4,
                     captured=None):
    """The level of ``model`` captured from a model of ``2p`` blocks, or None where that cannot
    be shown to be the same graph (the caller then captures ``model`` whole).

    ``build(cfg)`` makes the smaller model on the meta device; ``capture_one(m)`` captures one.
    The level's tensors are ``model``'s own (its parameters and persistent buffers).
    ``captured(level, growth)``, where given, is told the ``2p``-block level (before it grows)
    and its :class:`Growth` once the grown level has passed every check."""
    from passes.contract import verify
    from vcyclefx.level import put_state

    cfg = getattr(model, "config", None)
    field = _count_field(cfg) if cfg is not None else None
    n = getattr(cfg, field) if field else None
    if not n or n < min_blocks:
        return None
    path = block_list(model, n)
    if path is None:
        return None
    blocks = list(model.get_submodule(path))
    sigs = [block_signature(b) for b in blocks]
    p = _period(sigs)
    if p is None or n // p < 3 or _reads_count(blocks[0]):
        return None
    k = 2 * p
    small_cfg = template_config(cfg, n, k, p)
    if small_cfg is None:
        return None
    try:
        small = build(small_cfg)
        small_blocks = list(small.get_submodule(path))
    except Exception as e:  # noqa: BLE001 - a config that refuses k blocks: capture whole
        log.info("repeated capture: %s with %d blocks failed (%s); capturing whole", type(model).__name__, k, e)
        return None
    if len(small_blocks) != k or [block_signature(b) for b in small_blocks] != sigs[:k]:
        return None
    full_state = model.state_dict(keep_vars=True)
    outside = {name: (tuple(t.shape), t.dtype) for name, t in full_state.items()
               if not name.startswith(path + ".")}
    small_outside = {name: (tuple(t.shape), t.dtype) for name, t in small.state_dict(keep_vars=True).items()
                     if not name.startswith(path + ".")}
    if outside != small_outside:
        return None
    with _fake_tensor_cache_off():
        level = capture_one(small)
    growth = Growth(path, n, k, p, tuple(full_state))
    grown, device = grow(level, growth)
    if grown is None:
        return None
    state = grown.state_dict(keep_vars=True)
    if {k_: (tuple(t.shape), t.dtype) for k_, t in state.items()} != \
            {k_: (tuple(t.shape), t.dtype) for k_, t in full_state.items()}:
        return None
    for name in state:  # the full model's own tensors (ties as the model has them)
        put_state(grown, name, full_state[name])
    if device is not None:  # the graph's device literals back with the tensors
        move_device_literals_(grown, device)
    verify(grown, what="capture by repetition")
    if captured is not None:
        captured(level, growth)
    return in_model_order(grown, growth)


@contextlib.contextmanager
def _fake_tensor_cache_off():
    """torch.export's fake-tensor cache off for the trace of ``2p`` blocks: few of its ops
    repeat, and rebuilding a cached output with symbolic sizes costs more than computing it
    (GPT-2's two blocks: 1.0 s -> 0.73 s per export; a trace of every block is faster with
    the cache, so only this one goes without). The graph is the same. Where a torch version
    lacks the setting, nothing changes."""
    try:
        import torch._dynamo.config as dynamo_config
    except ImportError:
        dynamo_config = None
    if not hasattr(dynamo_config, "fake_tensor_cache_enabled"):
        yield
        return
    with dynamo_config.patch(fake_tensor_cache_enabled=False):
        yield


def grow(level, growth: Growth):
    """(``level`` of ``growth.k`` blocks grown to ``growth.n`` by the depth pass, each new block
    a copy of the graph of the block at its place in the period, or None where the depth pass
    finds no such chain; the device its tensors were on, None for meta). The grown level's
    tensors are meta tensors of their shapes (nothing copied): the caller binds the model's."""
    from passes.contract import shape_check
    from passes.depth import DepthPass, DepthPlan
    from vcyclefx.api import _plan_depth
    from vcyclefx.plan.choices import DECOALESCE

    device = _state_on_meta(level)  # grown below: copies of meta tensors take no memory
    try:
        chains = _plan_depth(level, growth.n / growth.k, "adjacent", coalesce=False,
                             depth_init="copy")
    except Exception as e:  # noqa: BLE001 - no chain found in the small model: capture whole
        log.info("repeated capture: no chain to grow (%s); capturing whole", e)
        return None, device
    if len(chains) != 1 or chains[0].container != growth.path or \
            len(chains[0].large_blocks) != growth.n:
        return None, device
    with shape_check(False):  # its tensors are meta, its non-state ones not: checked by callers
        grown = DepthPass()(level, DepthPlan(DECOALESCE, tuple(chains))).module
    return grown, device


def in_model_order(grown, growth: Growth):
    """The grown level with its tensors in the full model's order and a note that says how it
    was captured."""
    from vcyclefx.level import KEY, level_info

    grown = _in_model_order(grown, list(growth.names))
    info = level_info(grown)
    note = (f"captured {growth.k} of the {growth.n} blocks of {growth.path} (identical, period "
            f"{growth.p}) {REPEATED}; --whole-capture traces every block")
    grown.meta[KEY] = dataclasses.replace(info, notes=(*info.notes, note))
    log.info(note)
    return grown


def _state_on_meta(level) -> torch.device | None:
    """``level``'s parameters and persistent buffers replaced by meta tensors of their shapes and
    dtypes (ties kept), and its graph's device literals with them: the depth growth then copies
    no memory (in memory, a grown copy of every block would be a second model), and the full
    model's own tensors replace them after. Returns the device they were on (None: on meta
    already)."""
    from vcyclefx.level import put_state

    state = level.state_dict(keep_vars=True)
    device = next((t.device for t in state.values() if not t.is_meta), None)
    if device is None:
        return None
    done: dict[int, torch.Tensor] = {}
    for name, t in state.items():
        if t.is_meta:
            continue
        if id(t) not in done:
            meta = torch.empty_like(t, device="meta")
            done[id(t)] = torch.nn.Parameter(meta, t.requires_grad) \
                if isinstance(t, torch.nn.Parameter) else meta
        put_state(level, name, done[id(t)])
    move_device_literals_(level, torch.device("meta"))
    return device


def _in_model_order(level, names: list[str]):
    """``level`` with its tensor reads first in the graph, in the order of ``names`` (the
    model's state_dict), and its tensors registered in that order, as a whole capture has
    them: its state_dict (and so the shards of a level directory) lists them alike."""
    from vcyclefx.level import build_level, level_info

    order = {name: i for i, name in enumerate(names)}
    graph = level.graph
    reads = sorted((n for n in graph.nodes if n.op == "get_attr"),
                   key=lambda n: order.get(n.target, len(order)))
    for n in reversed(reads):
        first = next(iter(graph.nodes))
        if first is not n:
            first.prepend(n)
    graph.lint()
    return build_level(level, graph, level_info(level), own=False)


@contextlib.contextmanager
def params_on_meta(dtype: torch.dtype):
    """Modules made inside put their parameters on the meta device (buffers stay real: a class
    computes its non-persistent ones in ``__init__``), with ``dtype`` as the default dtype, as
    ``from_pretrained`` builds a checkpoint of that dtype. Both are undone on exit."""
    register = torch.nn.Module.register_parameter
    old_dtype = torch.get_default_dtype()

    def on_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        torch.set_default_dtype(dtype)
        yield
    finally:
        torch.set_default_dtype(old_dtype)
        torch.nn.Module.register_parameter = register


def captured_by_repetition(model: torch.nn.Module, example, recipe=None):
    """A loaded Hugging Face ``model`` captured by repetition with ``example`` inputs (the level
    takes the model's own tensors, for a model the caller discards), or None (capture it whole).

    The smaller model is built on the meta device, then given uninitialised parameters on the
    model's device: traced with meta parameters, some ops would get other strides (the meta
    kernel of scaled_dot_product_attention) and the graph would differ from a trace of the
    model itself (a ``contiguous`` more or less). Its untouched memory is never resident."""
    from vcyclefx.capture.frontend import capture

    if not hasattr(model, "config"):
        return None
    first = next(iter(model.parameters()), None)
    if first is None:
        return None
    dtype = first.dtype if first.is_floating_point() else torch.float32
    cls = type(model)

    def build(cfg):
        with params_on_meta(dtype):
            m = cls(cfg)
        if first.device.type != "meta":
            made: dict[int, torch.nn.Parameter] = {}  # tied parameters stay tied
            for mod in m.modules():
                for name, p in list(mod._parameters.items()):
                    if p is not None and p.is_meta:
                        if id(p) not in made:
                            made[id(p)] = torch.nn.Parameter(
                                torch.empty(p.shape, dtype=p.dtype, device=first.device),
                                requires_grad=p.requires_grad)
                        mod._parameters[name] = made[id(p)]
        return m.train(model.training)

    return repeated_capture(model, build, lambda m: capture(m, example, copy_weights=False,
                                                           recipe=recipe))


__all__ = ["REPEATED", "Growth", "captured_by_repetition", "grow", "in_model_order", "repeated_capture", "block_signature", "block_list", "template_config"]
