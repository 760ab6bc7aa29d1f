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
    assert dict(small.state_dict())["rnn.weight_hh_l1"].shape[1] == (CASES[case].get("proj_size") or 6)
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


def test_every_overload_of_the_recurrent_ops_has_a_rule():
    for packet in (aten.lstm, aten.gru, aten.rnn_tanh, aten.rnn_relu):
        overloads = graph_overloads(packet)
        assert overloads and all(has_rule(o) for o in overloads), packet
    assert len(graph_overloads(aten.lstm)) == 2  # .input and .data
