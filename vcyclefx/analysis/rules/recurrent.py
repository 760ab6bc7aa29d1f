"""Recurrent cells: ``aten.lstm``, ``aten.gru``, ``aten.rnn_tanh``, ``aten.rnn_relu``.

torch.export (non-strict, CPU, train or eval) keeps ``nn.LSTM``/``nn.GRU``/``nn.RNN`` as one op
(``aten.lstm.input``; ``.data`` for packed sequences) with a flat parameter list, per layer and
direction (forward, then reverse)::

    w_ih (G*H, I_l), w_hh (G*H, R), [b_ih (G*H), b_hh (G*H)], [w_hr (R, H)]   # G gates

with G = 4 (LSTM: i, f, g, o), 3 (GRU: r, z, n) or 1 (plain RNN), H the hidden size and R the
size of the recurrent state h (H, or ``proj_size`` for an LSTM with a projection ``w_hr``).
Sizes are implied by the weights and the initial states ``hx`` (``aten.zeros([L*D, B, R])``
whose literal sizes the factory rule rewrites), so the op itself has no literal to rewrite.

Axes: the gate rows are gate-major ``PROD[gate, H]`` (the gate axis is pinned), so a unit of the
hidden space spans the G gate rows of one hidden feature; the rows, biases and ``w_hr``'s
columns are producers/consumers of the hidden space as usual (rows copied per gate, biases
copied). The recurrent state is its own space R (H without a projection): ``w_hh``'s columns
and ``w_hr``'s columns contract against it, so they are split when it is widened, and the
recurrence stays exact (h_t duplicated, the split columns sum back). The output's last axis is
R (one direction) or ``PROD[direction, R]`` (bidirectional: forward and backward states
concatenated); layer l > 0 reads it, so its ``w_ih`` columns have that layout too. All layers
of one op share H and R (the op takes one ``hx``).

Depth: the layers of one multi-layer op are not a chain (they are one node); a model made of
several single-layer recurrent ops chains as any repeated block does.
"""

from __future__ import annotations

from torch.fx import Node

from vcyclefx.analysis.dims import PROD
from vcyclefx.analysis.registry import register_rule
from vcyclefx.analysis.rules._util import aten, family
from vcyclefx.errors import AnalysisError

_GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


def _layer_params(ctx, node: Node, params: list, layers: int, dirs: int, has_biases: bool):
    """The parameter list as one dict per (layer, direction): w_ih, w_hh, b_ih, b_hh, w_hr."""
    n = len(params)
    if n % (layers * dirs):
        raise AnalysisError(f"{node.format_node()}: {n} parameters do not divide into "
                            f"{layers} layers x {dirs} directions")
    per = n // (layers * dirs)
    names = ["w_ih", "w_hh"] + (["b_ih", "b_hh"] if has_biases else [])
    if per == len(names) + 1:
        names.append("w_hr")
    if per != len(names):
        raise AnalysisError(f"{node.format_node()}: {per} parameters per layer and direction; "
                            f"expected {len(names)} (has_biases={has_biases})")
    out = []
    for k in range(layers * dirs):
        chunk = params[k * per:(k + 1) * per]
        if not all(isinstance(p, Node) for p in chunk):
            raise AnalysisError(f"{node.format_node()}: a parameter of the recurrent op is not a "
                                "graph value")
        out.append(dict(zip(names, chunk)))
    return out


@register_rule(aten.lstm, aten.gru, aten.rnn_tanh, aten.rnn_relu)
def _recurrent(ctx, node):
    name = family(node)
    gates = _GATES[name]
    packed = ctx.arg(node, "batch_sizes", None) is not None
    x = ctx.arg(node, "data") if packed else ctx.arg(node, "input")
    hx = ctx.arg(node, "hx")
    hx = list(hx) if isinstance(hx, (list, tuple)) else [hx]
    layers, dirs = ctx.arg(node, "num_layers"), 2 if ctx.arg(node, "bidirectional") else 1
    per_layer = _layer_params(ctx, node, list(ctx.arg(node, "params")), layers, dirs,
                              bool(ctx.arg(node, "has_biases")))
    xd = ctx.dims(x)
    h0 = ctx.dims(hx[0])  # (L*D, [B,] R)
    state = h0[-1]  # R: the recurrent state h
    first = per_layer[0]
    rows = ctx.dims(first["w_ih"])[0]  # G*H
    hidden = ctx.dims(first["w_hr"])[1] if "w_hr" in first else state  # H
    if len(hx) > 1:  # LSTM's cell state c: (L*D, [B,] H)
        ctx.unify(ctx.dims(hx[1])[-1], hidden, node)
    for h in hx:
        hd = ctx.dims(h)
        ctx.unify(hd[0], h0[0], node)
        ctx.pin(hd[0], f"layers x directions of the recurrent state at {ctx.where(node)}")
        if len(hd) == 3 and not packed:
            ctx.unify(hd[1], xd[0 if ctx.arg(node, "batch_first") else 1], node)
        elif len(hd) == 3:
            ctx.unify(hd[1], h0[1], node)
    # the output of a layer: R, or PROD[direction, R] for a bidirectional op
    if dirs == 1:
        layer_out = state
    else:
        layer_out = ctx.table.new(2 * state.size)
        direction = ctx.table.new(2)
        ctx.refine(layer_out, PROD, [direction, state], node)
        ctx.pin(direction, f"direction (forward, backward) of a bidirectional {name} at "
                           f"{ctx.where(node)}")
    for k, p in enumerate(per_layer):
        w_ih, w_hh = ctx.dims(p["w_ih"]), ctx.dims(p["w_hh"])
        ctx.unify(w_ih[0], rows, node)
        ctx.unify(w_hh[0], rows, node)
        for b in ("b_ih", "b_hh"):
            if b in p:
                ctx.unify(ctx.dims(p[b])[0], rows, node)
        ctx.unify(w_ih[1], xd[-1] if k < dirs else layer_out, node)
        ctx.unify(w_hh[1], state, node)
        # the columns are contracted against the layer's input and the state h_{t-1}; the
        # activations named are the op's input and h0 (the only graph values they meet)
        ctx.contract(node, [(p["w_ih"], 1), (x, len(xd) - 1)])
        ctx.contract(node, [(p["w_hh"], 1), (hx[0], len(h0) - 1)])
        if "w_hr" in p:
            w_hr = ctx.dims(p["w_hr"])
            ctx.unify(w_hr[0], state, node)
            ctx.unify(w_hr[1], hidden, node)
            ctx.contract(node, [(p["w_hr"], 1), (hx[-1], len(h0) - 1)])
    if gates > 1:
        gate = ctx.table.new(gates)
        ctx.refine(rows, PROD, [gate, hidden], node)
        ctx.pin(gate, f"gates of {name} (gate-major rows) at {ctx.where(node)}")
    else:
        ctx.unify(rows, hidden, node)
    out = ctx.out_fresh(node)  # (output, h_n[, c_n])
    ctx.unify_all(out[0][:-1], xd[:-1], node)
    ctx.unify(out[0][-1], layer_out, node)
    for o, h in zip(out[1:], hx):
        ctx.unify_all(o, ctx.dims(h), node)
