"""``vf.to_module(level)``: the user's own class at the level's sizes.

The level's recipe (``level.info.recipe``, see :mod:`vcyclefx.recipe`) says how the original
model is built; which of its fields control which tensor axes is found by building the class on
the meta device with changed values and comparing parameter shapes, never from a list of
families:

1. *ratios*: every axis whose size differs between the recipe's own build and the level, and
   every block container whose number of blocks differs, gives a ratio new/old;
2. *shapes*: starting from the recipe, the single field change (a field's value times a ratio;
   one entry of a list field at a time, or the whole list) that most reduces the number of
   tensors whose name or shape differs from the level is applied, until none differ;
3. *function*: fields that no shape shows (GPT-2's ``n_head``: the head count only appears in
   reshapes; a grouped-query model's query and key/value head counts, which change together)
   are settled by building modules (parameters on the meta device), giving them the level's
   weights with ``strict=True`` (assigned, not copied; a bf16/float16 level's as float32 views,
   :class:`Float32View`) and comparing outputs on the level's example inputs, one such field at
   a time, then two; the first candidate whose float32 relative error is <= 1e-6 is the answer.

Hugging Face modeling code reads some fields the config dict may lack (``getattr(config,
"head_dim", hidden_size // num_attention_heads)``): such a field is a candidate too, with the
value the built modules hold under its name, so a level that halves the hidden size but keeps
its heads of 16 is the class with ``head_dim=16`` written into its config.

Where no field change reproduces the level (uneven groups, a width that is not a constructor
argument), a :class:`~vcyclefx.errors.LevelError` names the tensor, its axis, the space it lies
in and what is missing.
"""

from __future__ import annotations

import inspect as _inspect
import re
import sys
from fractions import Fraction

import torch
import torch.utils._pytree as pytree
from torch import nn

from vcyclefx.analysis.analyze import analyze
from vcyclefx.errors import LevelError, VCycleError
from vcyclefx.level import level_info
from vcyclefx.capture.recipe import HF, Recipe, import_object

TOLERANCE = 1e-6
_INDEX = re.compile(r"\.(\d+)(?=\.)")


def _shapes(module: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _blocks(names) -> dict[str, int]:
    """Container -> number of numbered children (``model.layers`` -> 2; nested containers such
    as ``stages`` and ``stages.0.blocks`` each count)."""
    seen: dict[str, set] = {}
    for n in names:
        for m in _INDEX.finditer(n):
            seen.setdefault(n[: m.start()], set()).add(int(m.group(1)))
    return {k: len(v) for k, v in seen.items()}


def _ratios(base: dict, target: dict) -> set[Fraction]:
    out = set()
    for name, shape in target.items():
        old = base.get(name)
        if old is None or len(old) != len(shape):
            continue
        for a, b in zip(old, shape):
            if a != b and a > 0:
                out.add(Fraction(b, a))
    bb, tb = _blocks(base), _blocks(target)
    for k, n in tb.items():
        if k in bb and bb[k] != n and bb[k] > 0:
            out.add(Fraction(n, bb[k]))
    return out


def _mismatch(built: dict | None, target: dict) -> int:
    if built is None:
        return 10 ** 9
    names = set(built) | set(target)
    return sum(1 for n in names if built.get(n) != target.get(n))


def _candidates(value, ratios: set[Fraction], keep: bool = False):
    """Values of a field: its value times each ratio (for a list: the whole list, or one entry);
    ``keep``: the value itself first (a field the config lacks, written to keep what the
    modeling code would otherwise derive from other fields)."""
    if keep:
        yield value

    def scaled(v):
        for r in ratios:
            x = v * r
            if x.denominator == 1 and x > 0 and int(x) != v:
                yield int(x)

    if isinstance(value, int):
        yield from sorted(set(scaled(value)))
        return
    value = list(value)
    for r in ratios:  # the whole list
        xs = [v * r for v in value]
        if all(x.denominator == 1 and x > 0 for x in xs):
            yield [int(x) for x in xs]
    for i, v in enumerate(value):  # one entry
        for x in sorted(set(scaled(v))):
            yield value[:i] + [x] + value[i + 1 :]


_CONFIG_READ = re.compile(r"getattr\(\s*(?:self\.)?config\s*,\s*[\"'](\w+)[\"']"
                          r"|\bconfig\.(\w+)\b")


def _unwritten_fields(recipe: Recipe, base: nn.Module) -> dict:
    """Hugging Face: integer fields that the class's modeling code reads from its config but
    the config dict lacks, with the one value its built modules hold under that name
    (``head_dim``, derived as ``hidden_size // num_attention_heads`` unless written)."""
    if recipe.kind != HF:
        return {}
    try:
        cls = import_object(recipe.target)
        source = _inspect.getsource(sys.modules[cls.__module__])
    except (OSError, TypeError, KeyError):
        return {}
    names = {a or b for a, b in _CONFIG_READ.findall(source)} - set(recipe.args)
    # a property of the config class (Falcon's head_dim) is derived and cannot be written
    names = {n for n in names if not isinstance(getattr(cls.config_class, n, None), property)}
    out = {}
    for name in sorted(names):
        values = {getattr(m, name) for m in base.modules() if type(getattr(m, name, None)) is int}
        if len(values) == 1:
            out[name] = values.pop()
    return out


class _Builder:
    """Meta-device builds of the recipe, cached by overrides."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.cache: dict = {}
        self.errors: dict = {}  # why a combination did not build (the message of a refusal)
        self.builds = 0

    def shapes(self, overrides: dict) -> dict | None:
        key = repr(sorted(overrides.items()))
        if key not in self.cache:
            self.builds += 1
            try:
                self.cache[key] = _shapes(self.recipe.build(overrides, device="meta"))
            except Exception as e:  # noqa: BLE001 - an invalid combination is not a candidate
                self.cache[key] = None
                self.errors[key] = _why(e)
        return self.cache[key]


BEAM = 4  # configurations kept per step of the shape search


def _solve_shapes(builder: _Builder, fields: dict, target: dict, ratios,
                  unwritten=frozenset()) -> tuple[list[dict], dict]:
    """Configurations whose tensors all have the level's names and shapes (fewest changes
    first), found by a beam search over single field changes; and the closest one.
    ``unwritten``: fields the config lacks (their value is a candidate too)."""
    def key(o):
        return repr(sorted(o.items()))

    start: dict = {}
    scores = {key(start): _mismatch(builder.shapes(start), target)}
    beam, exact, closest = [start], [], start
    while beam:
        grown = {}
        for cur in beam:
            here = scores[key(cur)]
            if here == 0:
                continue
            for f, base in fields.items():
                for cand in _candidates(cur.get(f, base), ratios,
                                        keep=f in unwritten and f not in cur):
                    trial = {**cur, f: cand}
                    k = key(trial)
                    if k not in scores:
                        scores[k] = _mismatch(builder.shapes(trial), target)
                    if scores[k] < here:
                        grown[k] = trial
        beam = sorted(grown.values(), key=lambda o: scores[key(o)])[:BEAM]
        exact += [o for o in beam if scores[key(o)] == 0 and o not in exact]
        if beam and scores[key(beam[0])] < scores[key(closest)]:
            closest = beam[0]
    if scores[key(start)] == 0:
        exact.insert(0, start)
    exact.sort(key=len)
    return exact, closest


def _leaves(out) -> list[torch.Tensor]:
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


def _rel_error(a, b) -> float:
    la, lb = _leaves(a), _leaves(b)
    if not la or len(la) < len(lb[:1]):
        return float("inf")
    worst = 0.0
    for x, y in zip(la, lb):
        if x.shape != y.shape:
            return float("inf")
        x, y = x.detach().double(), y.detach().double()
        worst = max(worst, float((x - y).abs().max() / y.abs().max().clamp_min(1e-30)))
    return worst


def _why(e: Exception) -> str:
    """The exception's type and the first line of its message."""
    first = next(iter(str(e).strip().splitlines()), "")
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _built_with(recipe: Recipe, overrides: dict, state: dict) -> nn.Module:
    """The class built with ``overrides`` holding the tensors of ``state`` (not copies): built
    with its parameters on the meta device (no memory, no random initialisation; its
    non-persistent buffers, such as rotary frequencies, are computed as usual), then given
    ``state``'s tensors (:func:`hold_state`). A class that cannot be built so is built whole and
    ``state`` copied into it."""
    from vcyclefx.capture.repeat import params_on_meta

    try:
        with params_on_meta(torch.get_default_dtype()):
            module = recipe.build(overrides)
    except Exception:  # noqa: BLE001 - a class whose __init__ needs real parameters
        module = recipe.build(overrides)
        module.load_state_dict(state, strict=True)
        return module
    hold_state(module, state)
    return module


def hold_state(module: nn.Module, state: dict, copy: bool = False) -> None:
    """Make ``state``'s tensors ``module``'s parameters and buffers (``load_state_dict`` with
    ``strict=True, assign=True``), or copies of them (``copy``; float32 ones of bfloat16/float16
    tensors); names the class ties (a language model's head and its embedding) stay one
    parameter."""
    from vcyclefx.level import put_state

    groups: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    tied = [names for names in groups.values() if len(names) > 1]
    if copy:
        later = {n for names in tied for n in names[1:]}  # made the first of their group below
        state = {n: t if n in later else t.detach().to(
            torch.float32 if t.dtype in _LOW else t.dtype, copy=True) for n, t in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    for first, *rest in tied:
        for name in rest:
            put_state(module, name, module.get_parameter(first))


def _verify(recipe: Recipe, overrides: dict, level, state, info, inputs, reference=None):
    """(the module built with ``overrides`` holding ``state``'s tensors, its relative error on
    ``inputs`` (the level's example inputs), why it does not fit: None when it ran).
    ``reference``: the level's own output on them, where the caller has it."""
    try:
        module = _built_with(recipe, overrides, state)
    except Exception as e:  # noqa: BLE001 - a configuration the weights do not fit
        return None, float("inf"), f"building or loading it fails ({_why(e)})"
    module.eval()
    args, kwargs = info.as_call(inputs)
    try:
        with torch.no_grad():
            out = module(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the class's own forward refuses these sizes
        return None, float("inf"), f"its forward fails on the level's example inputs ({_why(e)})"
    if reference is None:
        with torch.no_grad():
            reference = level(*inputs)
    return module, _rel_error(out, reference), None


_LOW = (torch.bfloat16, torch.float16)


class Float32View(torch.Tensor):
    """A bfloat16/float16 tensor that every op sees as its float32 upcast, made for that op and
    dropped after it: it reports dtype float32 and holds no float32 memory, so a model verified
    through such weights holds one weight's float32 copy at a time, not a float32 model."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(
            cls, inner.shape, dtype=torch.float32, device=inner.device, strides=inner.stride(),
            storage_offset=inner.storage_offset(), requires_grad=False)

    def __init__(self, inner: torch.Tensor):
        self.inner = inner

    def __repr__(self):
        return f"Float32View({self.inner.dtype}, {list(self.shape)})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.detach.default:  # nn.Parameter(view), state_dict(): a view
            return Float32View(args[0].inner.detach())

        def up(x):
            return x.inner.float() if isinstance(x, Float32View) else x

        return func(*pytree.tree_map(up, args), **pytree.tree_map(up, kwargs or {}))


def float32_view(level):
    """:func:`float32_level` without the float32 copy: a copy of the module (its graph's dtype
    literals made float32) whose bfloat16/float16 parameters and buffers are
    :class:`Float32View`s of the level's own tensors; ``level`` itself where it is float32."""
    if not any(t.dtype in _LOW for t in level.state_dict().values()):
        return level
    import copy

    memo: dict = {}
    for _, t in [*level.named_parameters(remove_duplicate=False),
                 *level.named_buffers(remove_duplicate=False)]:
        if t.dtype in _LOW and id(t) not in memo:
            view = Float32View(t.detach())
            memo[id(t)] = nn.Parameter(view, requires_grad=False) \
                if isinstance(t, nn.Parameter) else view
    out = copy.deepcopy(level, memo)
    _float32_literals(out)
    return out


def float32_level(level):
    """``level`` computing in float32: a copy with its bfloat16/float16 tensors upcast and the
    dtype literals of its graph (``.to(bfloat16)`` casts baked in by the capture) made float32;
    ``level`` itself where it is float32 already. The class built by ``to_module`` computes in
    float32 (the default dtype), so both are compared without a low-precision rounding between
    them: a bf16 checkpoint's level is verified under the float32 tolerance."""
    if not any(t.dtype in _LOW for t in level.state_dict().values()):
        return level
    import copy

    out = copy.deepcopy(level)
    out.to(torch.float32)
    _float32_literals(out)
    return out


def _float32_literals(gm) -> None:
    from torch.fx import GraphModule
    from torch.fx.node import map_aggregate

    def up(v):  # dtype arguments are ints in the op schemas: match the values
        return torch.float32 if isinstance(v, torch.dtype) and v in _LOW else v

    for node in gm.graph.nodes:
        if node.op == "call_function":
            node.args = map_aggregate(node.args, up)
            node.kwargs = map_aggregate(node.kwargs, up)
    for sub in gm.children():
        if isinstance(sub, GraphModule):
            _float32_literals(sub)
    gm.recompile()


def solve(level, own: bool = True) -> tuple[Recipe, dict, nn.Module, float]:
    """(recipe, field overrides, a verified module with the level's weights, its error). The
    module holds copies of the level's tensors (``own``; float32 copies of bfloat16/float16
    ones), or the level's own tensors in their dtype. Verifying holds no second model: the
    candidates are built with meta parameters and given the level's tensors, which a bf16 or
    float16 level lends through float32 views (:class:`Float32View`: each weight upcast for the
    op that reads it), so the comparison is in float32 without a float32 copy of the level."""
    info = level_info(level)
    recipe = info.recipe if info is not None else None
    if recipe is None:
        src = info.source_class if info is not None else type(level).__name__
        raise LevelError(
            f"this level does not know how its original model ({src}) is built: Hugging Face "
            "models are recognised by capture; for other models name them as timm:NAME, "
            "torchvision:NAME or pkg.mod:factory on the command line, or pass "
            "recipe=vcyclefx.capture.recipe.Recipe('call', 'pkg.mod.Class', {kwargs}) to vf.capture")
    target = _shapes(level)
    builder = _Builder(recipe)
    base = builder.shapes({})
    if base is None:
        raise LevelError(f"cannot build {recipe.target} from its recipe on the meta device "
                         f"({builder.errors.get(repr([]), 'no reason given')})")
    fields = recipe.fields()
    unwritten = _unwritten_fields(recipe, recipe.build({}, device="meta"))
    fields.update(unwritten)
    ratios = _ratios(base, target)
    exact, closest = _solve_shapes(builder, fields, target, ratios, frozenset(unwritten))
    if not exact:
        raise LevelError(_no_config_message(level, recipe, builder.shapes(closest), target,
                                            closest))
    was_training = level.training
    level.eval()
    state = level.state_dict()
    module, err, overrides, tried = None, float("inf"), exact[0], []
    try:
        # the level seen in float32 through views of its own weights (no float32 copy); where
        # no candidate runs so, once more with a float32 copy (a graph the views cannot run)
        for make in (float32_view, float32_level):
            last = make is float32_level or not any(t.dtype in _LOW for t in state.values())
            try:
                checked = make(level)  # the level itself where it is float32 (in eval mode too)
                module, err, overrides, tried = _search(recipe, builder, exact, fields, ratios,
                                                        target, checked, info)
            except Exception:  # noqa: BLE001 - the level's graph does not run on the views
                if last:
                    raise
                continue
            if module is not None or last or any(t[2] is None for t in tried):
                break
    finally:
        level.train(was_training)
    if module is None:
        best = min(tried, key=lambda t: t[1]) if tried else (overrides, float("inf"), None)
        differ = (f"the outputs differ (relative error {best[1]:.3g} > {TOLERANCE})"
                  if best[2] is None else best[2])
        raise LevelError(
            f"no configuration of {recipe.target} computes this level's function: with "
            f"{_fmt(best[0])} every tensor has the level's shape but {differ}; a size the level "
            "changed (e.g. uneven groups, a head count with a different head size, or a size "
            "written as a constant in the class's forward) is not a field of the recipe")
    # the module holds real tensors: copies (float32 ones of bf16/float16 weights), or the
    # level's own
    hold_state(module, state, copy=own)
    return recipe, overrides, module, err


def _search(recipe, builder, exact, fields, ratios, target, checked, info):
    """(the first module whose function is ``checked``'s, its error, its overrides, every trial
    as (overrides, error, why it failed))."""
    state = checked.state_dict()
    tried: list = []
    # compared in float32: bf16/float16 example inputs (an image) too
    inputs = tuple(x.float() if isinstance(x, torch.Tensor) and x.dtype in _LOW else x
                   for x in info.example_inputs)
    with torch.no_grad():
        reference = checked(*inputs)
    for shaped in exact:
        # each shape solution, then with one field that no tensor shape shows changed too
        # (head counts that only appear in reshapes), then two (query and key/value heads)
        for trial in _function_trials(builder, shaped, fields, ratios, target):
            m, e, why = _verify(recipe, trial, checked, state, info, inputs, reference)
            tried.append((trial, e, why))
            if e <= TOLERANCE:
                return m, e, trial, tried
    return None, float("inf"), exact[0], tried


PAIRED = 6  # single changes (fewest tensors off) combined in pairs by the function search


def _function_trials(builder: _Builder, shaped: dict, fields: dict, ratios, target):
    """``shaped``; then with one field that no tensor shape shows changed; then with two:
    first two that each alone break shapes the other mends (grouped-query heads: the query and
    the key/value head counts change together), from the single changes that keep the most
    shapes; then two that each keep every shape."""
    yield shaped
    singles = [{**shaped, f: c} for f, b in fields.items() if f not in shaped
               for c in _candidates(b, ratios)]
    scored = sorted(((_mismatch(builder.shapes(t), target), i) for i, t in enumerate(singles)))
    invisible = [singles[i] for score, i in scored if score == 0]
    yield from invisible
    near = [singles[i] for score, i in scored if 0 < score < 10 ** 9][:PAIRED]
    for group in (near, invisible):
        for i, a in enumerate(group):
            for b in group[i + 1:]:
                (fa,), (fb,) = a.keys() - shaped.keys(), b.keys() - shaped.keys()
                if fa != fb:
                    pair = {**a, fb: b[fb]}
                    if _mismatch(builder.shapes(pair), target) == 0:
                        yield pair


def _fmt(overrides: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in overrides.items()) or "the original configuration"


def _no_config_message(level, recipe, built, target, overrides) -> str:
    built = built or {}
    bad = sorted(n for n in set(built) | set(target) if built.get(n) != target.get(n))
    name = bad[0]
    if name not in built:
        what = f"tensor {name} of the level has no counterpart"
    elif name not in target:
        what = f"tensor {name} of {recipe.target} is not in the level"
    else:
        axes = [i for i, (a, b) in enumerate(zip(built[name], target[name])) if a != b]
        what = (f"tensor {name} has shape {list(target[name])} in the level, "
                f"{list(built[name])} in the best configuration (axis {axes[0] if axes else '?'}"
                f"{_space_of(level, name, axes[0]) if axes else ''})")
    kind = "config field" if recipe.kind == HF else "constructor argument"
    return (f"no configuration of {recipe.target} reproduces this level: {what}; no {kind} "
            f"controls that size (closest: {_fmt(overrides)}; {len(bad)} tensors differ). "
            "Keep the level as a GraphModule, or use factors whose groups are even")


def _space_of(level, name: str, axis: int) -> str:
    try:
        a = analyze(level, chains=False)
        dim = a.tensors[name].dims[axis]
        leaves = a.table.leaves(dim)
        keys = [s.key for s in a.spaces if any(s.root.id == leaf.id for leaf in leaves)]
        return f", space {keys[0]}" if keys else ""
    except Exception:  # noqa: BLE001 - the name of the space is a courtesy
        return ""


def to_module(level, *, share: bool = False) -> nn.Module:
    """An instance of the level's original class at the level's sizes (for Hugging Face models
    with the config updated), its weights loaded with ``strict=True`` and checked inside the call
    to compute the level's function (float32 relative error <= 1e-6 on the level's example
    inputs). With ``share=True`` the module holds the level's own tensors (training one trains
    the other); by default it holds copies."""
    _, _, module, _ = solve(level, own=not share)
    if share:
        module.load_state_dict(level.state_dict(keep_vars=True), strict=True, assign=True)
    module.train(level.training)
    return module


def nearest_expressible(transform, model, example_inputs, width: float, depth: float,
                        **kwargs) -> list[tuple[float, float]]:
    """The factors nearest to ``(width, depth)`` whose level ``to_module`` can build as the
    model's class: depth alone, then width alone (``transform`` is ``vf.coalesce`` or
    ``vf.decoalesce``; each candidate is transformed without its self-check and solved)."""
    out = []
    for w, d in ((1.0, depth), (width, 1.0)):
        if (w, d) in ((1.0, 1.0), (width, depth)):
            continue
        try:
            level, _ = transform(model, example_inputs, width=w, depth=d, check=False, **kwargs)
            solve(level, own=False)
        except LevelError:
            continue
        except Exception as e:  # noqa: BLE001 - a candidate the transform refuses is no answer
            if not isinstance(e, VCycleError):
                raise
            continue
        out.append((w, d))
    return out


def module_call(level) -> dict:
    """``{"class": ..., "kwargs": ...}``: the call that builds the level's class at its sizes."""
    recipe, overrides, _, _ = solve(level, own=False)
    return {"class": recipe.target, "kind": recipe.kind, "kwargs": recipe.config(overrides),
            "factory": recipe.factory}
