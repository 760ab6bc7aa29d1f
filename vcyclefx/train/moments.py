"""AdamW moments through a coalesce or de-coalesce: they follow the gradients, not the weights.

Width. De-coalescing is a linear map of the parameters, ``theta_big = D theta_small``, that
sends every element of a larger-level tensor from one element of the smaller level times a
factor ``d`` (1 on producer axes, ``1/|G|`` on consumer axes, ``1/k`` on the norm that carries a
tied tensor's compensation), and each smaller element to ``k`` larger ones. With equal groups the
larger model computes the smaller one's function, so by the chain rule ``g_small = D^T g_big``,
and as the ``k`` copies of an element are symmetric they receive equal gradients::

    g_big[i] = g_small[g(i)] / (k * d)          (k * d = the producer group size: a copied
                                                 producer gets 1/k, a split consumer all of it)
    exp_avg[i]    = exp_avg[g(i)] / (k d)       exp_avg_sq[i] = exp_avg_sq[g(i)] / (k d)^2

which is the transpose of the coalescing map (``C^T``, ``C = D^+``). Coalescing applies ``D^T``,
its inverse on the moments: ``exp_avg[g] = sum_i d_i exp_avg[i]`` (a producer group's sum, a
consumer group's mean) and ``exp_avg_sq[g] = sum_i k_i d_i^2 exp_avg_sq[i]`` (producer ``k^2 x``
the mean, consumer the mean), exact for symmetric copies, so that
``coalesce(decoalesce(state)) == state`` (bit for bit with power-of-two groups).

What this makes exact, for one AdamW step from ``theta_big = D theta_small`` with the mapped
state (tested): the moments after the step are the mapping of the smaller level's moments after
its step, and so is every tensor whose axes are all producers (embeddings, biases, norms).
AdamW's update ``m / (sqrt(v) + eps)`` does not change when ``m`` and ``v`` are scaled by ``c`` and
``c^2``, so a tensor with a split consumer axis moves ``1/d`` times the mapped update of the
smaller level (its parts each move as far as their whole did). Training the larger level with
learning rate ``lr * d`` and weight decay ``wd / d`` on such tensors (``d`` is one number per
tensor with equal groups; the same ``1/fan_in`` rule as muP for Adam) makes the whole step
exact, up to ``eps`` (its term is ``k d eps`` instead of ``eps``).

Depth. A de-coalesced block copy is not the same function as the block it copies, so there is no
exact relation; each copy writes into the residual stream as the original did, so to first
order it receives the original block's whole gradient: moments are copied (also for
``depth_init="identity"``, whose zeroed writes then keep the moments of the write they replace),
and coalescing averages them, the inverse. Width is undone before depth when coalescing and
after it when de-coalescing, as for the weights.

Tensors other than ``exp_avg`` / ``exp_avg_sq`` / ``max_exp_avg_sq`` (second-moment-like) are
mapped like the parameters.
"""

from __future__ import annotations

import math

import torch

from vcyclefx.api import _depth, _width
from vcyclefx.level import clone_level
from vcyclefx.plan.choices import COALESCE, DECOALESCE
from vcyclefx.plan.mapping import Mapping

SQUARED = ("exp_avg_sq", "max_exp_avg_sq")  # keys that hold squared gradients
FIRST = ("exp_avg",)


def _params(module) -> dict[str, torch.nn.Parameter]:
    return dict(module.named_parameters(remove_duplicate=False))


def _carrier(shape_module, tensors: dict[str, torch.Tensor] | None, fill=None):
    """A copy of ``shape_module`` holding ``tensors`` (by name) as its weights; parameters not in
    ``tensors`` hold ``fill(param)`` (zeros by default)."""
    out = clone_level(shape_module)
    with torch.no_grad():
        for p in out.parameters():  # tied names share one tensor: filled once
            p.copy_(fill(p) if fill is not None else torch.zeros_like(p))
        for name, p in _params(out).items():
            if tensors is not None and name in tensors:
                p.copy_(tensors[name])
    return out


def _read(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in _params(module).items()}


def _width_sources(small_shapes, spaces) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """For every parameter of the width-de-coalesced ``small_shapes``: (flat index of the smaller
    element each element comes from, its factor d, its multiplicity k), found by running the width
    pass on carriers holding ones and the digits of every element's flat index."""
    d = _read(_width(_carrier(small_shapes, None, torch.ones_like), spaces, DECOALESCE)[0])
    src = {k: torch.zeros(v.shape, dtype=torch.long, device=v.device) for k, v in d.items()}
    ref = next(iter(_params(small_shapes).values()))
    mantissa = round(-math.log2(torch.finfo(ref.dtype).eps))  # 23 for float32
    base = 2 ** (mantissa - 3)  # a digit times d, divided by d, rounds back to the digit
    n_max = max(p.numel() for p in _params(small_shapes).values())
    for pos in range(max(1, math.ceil(math.log(n_max, base)))):
        def digit(p, pos=pos):
            flat = torch.arange(p.numel(), device=p.device)
            return ((flat // base ** pos) % base + 1).to(p.dtype).reshape(p.shape)
        got = _read(_width(_carrier(small_shapes, None, digit), spaces, DECOALESCE)[0])
        for k, v in got.items():
            src[k] += (torch.round(v.double() / d[k].double()).long() - 1) * base ** pos
    sizes = {k: p.numel() for k, p in _params(small_shapes).items()}
    out = {}
    for k, s in src.items():
        # bincount as index_add_ (exact integer counts), which also runs on the meta device:
        # a transition under FSDP records this on meta tensors and replays it per parameter
        flat = s.flatten()
        counts = torch.zeros(sizes[k], dtype=torch.long, device=s.device).index_add_(
            0, flat, torch.ones_like(flat))
        out[k] = (s, d[k], counts[s].to(d[k].dtype))
    return out


def _width_moments(small_shapes, spaces, moments, direction):
    """Moments through the width part of a mapping (module docstring). ``small_shapes`` has the
    shapes of the narrower side; ``moments`` are shaped like the side the map starts from."""
    where = _width_sources(small_shapes, spaces)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensors in moments.items():
        power = 2 if key in SQUARED else 1 if key in FIRST else 0
        mapped = {}
        for name, (s, d, k) in where.items():
            if name not in tensors:
                continue
            t = tensors[name]
            if direction == DECOALESCE:
                scale = d if power == 0 else (k * d) ** -power
                mapped[name] = t.flatten()[s] * scale
            else:
                weight = {0: 1 / (k * d), 1: d, 2: k * d * d}[power]
                flat = torch.zeros(_params(small_shapes)[name].numel(), dtype=t.dtype,
                                   device=t.device)
                mapped[name] = flat.index_add_(0, s.flatten(), (t * weight).flatten()).reshape(
                    _params(small_shapes)[name].shape)
        out[key] = mapped
    return out


def _depth_moments(shape_module, chains, moments, direction):
    """Moments through the depth part: copied when de-coalescing, averaged when coalescing."""
    out = {}
    for key, tensors in moments.items():
        carrier = _carrier(shape_module, tensors)
        out[key] = _read(_depth(carrier, chains, direction, "copy"))
    return out


def map_moments(source, moments: dict[str, dict[str, torch.Tensor]], direction: str,
                mapping: Mapping) -> dict[str, dict[str, torch.Tensor]]:
    """Per-parameter optimizer tensors of ``source`` (``{"exp_avg": {name: tensor}, ...}``) sent
    through ``mapping`` in ``direction`` ("coalesce" or "decoalesce"), keyed by the names of the
    other side's parameters."""
    if direction == DECOALESCE:  # depth, then width
        cur, shapes = moments, source
        if mapping.chains:
            cur = _depth_moments(source, mapping.chains, cur, DECOALESCE)
            shapes = _depth(clone_level(source), mapping.chains, DECOALESCE, "copy")
        if mapping.spaces:
            cur = _width_moments(shapes, mapping.spaces, cur, DECOALESCE)
        return cur
    if direction != COALESCE:
        raise ValueError(f"direction {direction!r} must be {COALESCE!r} or {DECOALESCE!r}")
    cur, shapes = moments, source
    if mapping.spaces:  # width, then depth
        shapes = _width(clone_level(source), mapping.spaces, COALESCE)[0]
        cur = _width_moments(shapes, mapping.spaces, cur, COALESCE)
    if mapping.chains:
        cur = _depth_moments(shapes, mapping.chains, cur, COALESCE)
    return cur
