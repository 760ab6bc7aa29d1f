"""Recurrent cells (aten.lstm / gru / rnn_tanh / rnn_relu) and weight normalisation.

A recurrent op's hidden space is resized with its gates: widening copies the G gate rows of a
hidden feature (input-to-hidden and hidden-to-hidden rows, both biases) and splits the columns
that read the recurrent state, so the recurrence stays exact. ``_weight_norm`` compensates the
change of ``||v||`` that copying or splitting ``v`` inside the norm makes.

torch.export specialises the sequence length of nn.LSTM/GRU/RNN (the op's fake-tensor
decomposition loops over time steps), so "another input" here is another batch size.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

import vcyclefx as vf
from tests.conftest import rel_error
from vcyclefx.analysis.registry import graph_overloads, has_rule

aten = torch.ops.aten
VOCAB = 40


class RecurrentLM(nn.Module):
    """embedding -> recurrent stack -> linear head."""

    def __init__(self, cell: str = "lstm", dim: int = 16, hidden: int = 12, layers: int = 2,
                 bidirectional: bool = False, bias: bool = True, proj_size: int = 0,
                 dropout: float = 0.0):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, dim)
        kw = dict(num_layers=layers, batch_first=True, bidirectional=bidirectional, bias=bias,
                  dropout=dropout)
        if cell == "lstm":
            self.rnn = nn.LSTM(dim, hidden, proj_size=proj_size, **kw)
        elif cell == "gru":
            self.rnn = nn.GRU(dim, hidden, **kw)
        else:
            self.rnn = nn.RNN(dim, hidden, nonlinearity=cell.removeprefix("rnn_"), **kw)
        out = (proj_size or hidden) * (2 if bidirectional else 1)
        self.head = nn.Linear(out, VOCAB)

    def forward(self, x):
        h, _ = self.rnn(self.emb(x))  # (B, T, D*R)
        return self.head(h)


CASES = {
    "lstm": dict(cell="lstm"),
    "gru": dict(cell="gru"),
    "lstm_bidirectional": dict(cell="lstm", bidirectional=True),
    "gru_without_biases": dict(cell="gru", bias=False),
    "lstm_without_biases_bidirectional": dict(cell="lstm", bias=False, bidirectional=True),
    "rnn_tanh": dict(cell="rnn_tanh"),
    "rnn_relu_bidirectional": dict(cell="rnn_relu", bidirectional=True),
    "lstm_proj_size": dict(cell="lstm", proj_size=8),
}


def _tokens(batch: int, seq: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("case", list(CASES))
def test_recurrent_width_x2_is_exact_and_round_trips_bit_exactly(case):
    torch.manual_seed(0)
    model = RecurrentLM(**CASES[case]).eval()
    x, other = _tokens(3), _tokens(5, seed=1)
    big, mapping = vf.decoalesce(model, (x,), width=2.0)
    hidden = mapping.space(next(s.key for s in mapping.spaces if s.small == 12))
    assert (hidden.large, hidden.small) == (24, 12)
    with torch.no_grad():
        assert rel_error(big(x), model(x)) <= 1e-5
        assert rel_error(big(other), model(other)) <= 1e-5  # another batch size
    sd = dict(big.state_dict())
    gates = {"lstm": 4, "gru": 3}.get(CASES[case]["cell"], 1)
    assert sd["rnn.weight_hh_l0"].shape[0] == gates * 24
    back, _ = vf.coalesce(big, mapping=mapping)
    assert _state_equal(dict(back.state_dict()), dict(model.state_dict()))
    again = RecurrentLM(**CASES[case])
    again.load_state_dict(back.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), model(x))


@pytest.mark.parametrize("case", ["lstm", "gru_without_biases", "rnn_relu_bidirectional"])
def test_recurrent_coalesce_to_half_width_runs_finite(case):
    torch.manual_seed(0)
    model = RecurrentLM(**CASES[case]).eval()
    x = _tokens(3)
    small, mapping = vf.coalesce(model, (x,), width=0.5)
    assert dict(small.state_dict())["rnn.weight_hh_l1"].shape[1] == 6
    with torch.no_grad():
        assert torch.isfinite(small(_tokens(4, seed=2))).all()
    # the smaller level loads into the user's class at the smaller sizes
    narrow = RecurrentLM(**{**CASES[case], "dim": 8, "hidden": 6})
    narrow.load_state_dict(small.state_dict(), strict=True)


def test_recurrent_hidden_unit_spans_its_gates_and_the_gate_axis_is_pinned():
    report = vf.inspect(RecurrentLM(cell="lstm"), (_tokens(3),))
    gate = [s for s in report.spaces if s.size == 4]
    assert gate and not gate[0].resizable and "gates of lstm" in gate[0].reason
    hidden = [s for s in report.spaces if s.size == 12]
    assert len(hidden) == 1 and hidden[0].resizable


def test_recurrent_dropout_between_layers_follows_train_and_eval():
    torch.manual_seed(0)
    model = RecurrentLM(cell="lstm", dropout=0.5).eval()
    x = _tokens(3)
    level = vf.capture(model, (x,))
    level.train()
    with torch.no_grad():
        assert not torch.equal(level(x), model(x))  # dropout between the two layers
        level.eval()
        assert torch.equal(level(x), model(x))


def test_every_overload_of_the_recurrent_and_weight_norm_ops_has_a_rule():
    for packet in (aten.lstm, aten.gru, aten.rnn_tanh, aten.rnn_relu, aten._weight_norm,
                   aten._weight_norm_interface):
        overloads = graph_overloads(packet)
        assert overloads and all(has_rule(o) for o in overloads), packet
    assert len(graph_overloads(aten.lstm)) == 2  # .input and .data


# -- weight normalisation ----------------------------------------------------------------------
class WeightNormConv(nn.Module):
    """A positional convolution with weight norm over a resizable channel space (``dim=0``:
    one norm per output channel, over input channels and kernel; ``dim=2``: wav2vec2's, one per
    kernel tap over output and input channels)."""

    def __init__(self, channels: int = 8, dim: int = 0):
        super().__init__()
        self.inp = nn.Conv1d(3, channels, 1)
        self.pos = weight_norm(nn.Conv1d(channels, channels, 5, padding=2), name="weight", dim=dim)
        self.out = nn.Conv1d(channels, 4, 1)

    def forward(self, x):  # (B, 3, T)
        h = self.inp(x)  # (B, C, T)
        return self.out(h + nn.functional.gelu(self.pos(h)))


class WeightNormHead(nn.Module):
    def __init__(self, hidden: int = 8):
        super().__init__()
        self.up = nn.Linear(3, hidden)
        self.head = weight_norm(nn.Linear(hidden, 5))  # dim=0: a norm per output row

    def forward(self, x):
        return self.head(torch.relu(self.up(x)))


def _scale_nodes(level) -> int:
    from passes.weight_norm import WN_SCALE_META

    return sum(WN_SCALE_META in n.meta for n in level.graph.nodes)


def _signal(batch: int, seq: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, seq, generator=torch.Generator().manual_seed(seed))


def test_weight_norm_compensation_of_a_split_consumer_is_one_over_sqrt_k():
    # the derivation in passes/weight_norm.py, in numbers: splitting v's columns k ways
    # (each v/k) divides ||v|| by sqrt(k), so g / sqrt(k) gives w's columns split exactly
    torch.manual_seed(0)
    v, g, k = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64), 2
    w = torch._weight_norm(v, g, 0)
    w_split = torch._weight_norm(torch.cat([v / k] * k, 1), g / k ** 0.5, 0)
    assert torch.allclose(w_split, torch.cat([w / k] * k, 1), rtol=0, atol=1e-15)


def test_weight_norm_conv_input_channels_width_x2_is_exact_and_round_trips_bit_exactly():
    torch.manual_seed(0)
    model = WeightNormConv().eval()
    x = _signal(2)
    big, mapping = vf.decoalesce(model, (x,), width=2.0)
    (comp,) = mapping.compensations
    assert comp.kind == "weight_norm" and comp.factor == pytest.approx(2 ** 0.5)
    assert _scale_nodes(big) == 1  # sqrt(2) is not exact in g: a scale node on the larger level
    with torch.no_grad():
        assert rel_error(big(x), model(x)) <= 1e-5
        other = _signal(3, seed=1)  # another batch size
        assert rel_error(big(other), model(other)) <= 1e-5
    sd = dict(big.state_dict())
    assert sd["pos.parametrizations.weight.original1"].shape == (16, 16, 5)
    WeightNormConv(channels=16).load_state_dict(sd, strict=True)  # the user's names and shapes
    back, _ = vf.coalesce(big, mapping=mapping)
    assert _scale_nodes(back) == 0  # the inverse cancels it exactly
    assert _state_equal(dict(back.state_dict()), dict(model.state_dict()))
    again = WeightNormConv()
    again.load_state_dict(back.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), model(x))


def test_weight_norm_over_output_and_input_channels_of_one_space_needs_no_compensation():
    torch.manual_seed(0)
    model = WeightNormConv(dim=2).eval()  # wav2vec2's positional convolution
    x = _signal(2)
    big, mapping = vf.decoalesce(model, (x,), width=2.0)
    assert not mapping.compensations and _scale_nodes(big) == 0
    wide = WeightNormConv(channels=16, dim=2).eval()
    wide.load_state_dict(big.state_dict(), strict=True)
    with torch.no_grad():
        assert rel_error(wide(x), model(x)) <= 1e-5  # the user's class at the new width
    back, _ = vf.coalesce(big, mapping=mapping)
    assert _state_equal(dict(back.state_dict()), dict(model.state_dict()))


def test_weight_norm_power_of_two_compensation_is_folded_into_g():
    torch.manual_seed(0)
    model = WeightNormHead().eval()
    x = torch.randn(4, 3)
    big, mapping = vf.decoalesce(model, (x,), width=4.0)  # s = sqrt(4) = 2: exact in g
    (comp,) = mapping.compensations
    assert comp.fold == ["head.parametrizations.weight.original0"] and _scale_nodes(big) == 0
    wide = WeightNormHead(hidden=32).eval()
    wide.load_state_dict(big.state_dict(), strict=True)
    with torch.no_grad():
        assert rel_error(wide(x), model(x)) <= 1e-5
    back, _ = vf.coalesce(big, mapping=mapping)
    assert _state_equal(dict(back.state_dict()), dict(model.state_dict()))


def test_weight_norm_coalesced_level_carries_the_scale_and_level_0_comes_back_without_it():
    torch.manual_seed(0)
    model = WeightNormConv().eval()
    x = _signal(2)
    small, mapping = vf.coalesce(model, (x,), width=0.5)
    assert _scale_nodes(small) == 1
    with torch.no_grad():
        assert torch.isfinite(small(x)).all()
    restored, _ = vf.decoalesce(small, mapping=mapping)  # a V-cycle's way back to level 0
    assert _scale_nodes(restored) == 0
    with torch.no_grad():
        assert rel_error(restored(x), small(x)) <= 1e-5
    user = WeightNormConv().eval()
    user.load_state_dict(restored.state_dict(), strict=True)
    with torch.no_grad():
        assert rel_error(user(x), restored(x)) <= 1e-6


def test_weight_norm_with_unequal_groups_is_refused_naming_the_node():
    model = WeightNormHead(hidden=8).eval()
    with pytest.raises(vf.VCycleError, match=r"_weight_norm.*equal group sizes"):
        vf.decoalesce(model, (torch.randn(4, 3),), width=1.5)  # 8 -> 12: groups of 2 and 1


class WeightNormInterface(nn.Module):
    """``w`` from ``aten._weight_norm_interface`` (w, norms) called directly."""

    def __init__(self, hidden: int = 8):
        super().__init__()
        self.up = nn.Linear(3, hidden)
        self.v = nn.Parameter(torch.randn(5, hidden))
        self.g = nn.Parameter(torch.rand(5, 1) + 0.5)

    def forward(self, x):
        w, _ = torch._weight_norm_interface(self.v, self.g, 0)
        return torch.relu(self.up(x)) @ w.t()


def test_weight_norm_interface_width_x2_is_exact_and_round_trips():
    torch.manual_seed(0)
    model = WeightNormInterface().eval()
    x = torch.randn(4, 3)
    big, mapping = vf.decoalesce(model, (x,), width=2.0)
    assert _scale_nodes(big) == 1
    with torch.no_grad():
        assert rel_error(big(x), model(x)) <= 1e-5
    back, _ = vf.coalesce(big, mapping=mapping)
    assert _scale_nodes(back) == 0
    assert _state_equal(dict(back.state_dict()), dict(model.state_dict()))
