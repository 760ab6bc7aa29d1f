"""Train/eval switching of a captured graph.

A captured graph bakes the module's mode into literal arguments: ``aten.dropout(x, p, train)``,
``aten.batch_norm(..., training, ...)``, the ``train`` of recurrent ops (``aten.lstm``'s dropout
between layers), the ``dropout_p`` of scaled-dot-product attention and the ``+1`` applied to
integer step counters (BatchNorm's ``num_batches_tracked``). This pass flips those literals so
that ``level.train()`` / ``level.eval()`` behave like they do on the original ``nn.Module``.
The probability that dropout uses in training is remembered in the
node's metadata (``meta["vcyclefx_train_p"]``), so eval -> train restores it.
"""

from __future__ import annotations


import torch
from torch.fx import GraphModule, Node

from vcyclefx.fx.args import get_arg, set_arg

aten = torch.ops.aten

_TRAIN_P = "vcyclefx_train_p"

# op -> name of its boolean "in training" argument
_TRAIN_FLAG = {
    aten.dropout.default: "train",
    aten.dropout_.default: "train",
    aten.feature_dropout_.default: "train",
    aten.alpha_dropout_.default: "train",
    aten.feature_dropout.default: "train",
    aten.alpha_dropout.default: "train",
    aten.feature_alpha_dropout.default: "train",
    aten.batch_norm.default: "training",
    aten.instance_norm.default: "use_input_stats",
}
# norms whose flag picks batch or running statistics; one without running statistics
# (BatchNorm(track_running_stats=False), timm's weight standardisation ScaledStdConv2d calling
# F.batch_norm(w, None, None, training=True)) uses the batch's in both modes, as the module does
_STATS_NORMS = {aten.batch_norm.default, aten.instance_norm.default}
# recurrent ops (dropout between layers): every overload of each family
_TRAIN_FLAG.update({getattr(p, o): "train" for p in (aten.lstm, aten.gru, aten.rnn_tanh,
                                                     aten.rnn_relu) for o in p.overloads()})


def _set(node: Node, name: str, value) -> bool:
    if get_arg(node, name) == value:
        return False
    set_arg(node, name, value)
    return True


def _switch_graph(gm: GraphModule, training: bool) -> bool:
    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _TRAIN_FLAG:
            if node.target in _STATS_NORMS and get_arg(node, "running_mean") is None:
                continue  # no running statistics: batch statistics in either mode
            changed |= _set(node, _TRAIN_FLAG[node.target], training)
        elif node.target is aten.scaled_dot_product_attention.default:
            node.meta.setdefault(_TRAIN_P, get_arg(node, "dropout_p"))
            changed |= _set(node, "dropout_p", node.meta[_TRAIN_P] if training else 0.0)
        elif node.target is aten.add_.Tensor and _is_step_counter(gm, node):
            changed |= _set(node, "other", 1 if training else 0)
    for sub in gm.children():
        if isinstance(sub, GraphModule) and _switch_graph(sub, training):
            sub.recompile()
    return changed


def _is_step_counter(gm: GraphModule, node: Node) -> bool:
    """``counter.add_(1)`` on an integer scalar buffer (BatchNorm's num_batches_tracked)."""
    target, step = get_arg(node, "self"), get_arg(node, "other")
    if not (isinstance(target, Node) and target.op == "get_attr" and step in (0, 1)):
        return False
    try:
        val = gm.get_buffer(target.target)
    except AttributeError:
        return False
    return not val.dtype.is_floating_point and val.dim() == 0


def switch_mode_(gm: GraphModule, training: bool) -> GraphModule:
    """Set ``gm``'s baked-in mode in place (what ``level.train()`` calls)."""
    if _switch_graph(gm, training):
        gm.recompile()
    object.__setattr__(gm, "training", training)
    for sub in gm.modules():
        object.__setattr__(sub, "training", training)
    return gm

