"""Issue 30, item 1: two structures that gave wrong results.

(a) Attention pooling with a learned query through ``nn.MultiheadAttention`` (open_clip's
    AttentionalPooler): the query is made from a parameter, so q·kᵀ contracted a
    parameter-derived query against activation keys. head_dim became a "consumer" axis of the
    packed ``in_proj_weight`` rows, which are producers on the heads: the axis was taken as
    tied, copied and then "compensated", and width x2 was silently wrong (0.2 relative here).
(b) A mixture of attention heads whose selected heads' outputs are combined with
    ``index_add`` into ``new_zeros(tokens, d)``: the rule of the index-write family did not
    tie ``source`` to ``self``, so resizing the heads' output axis wrote a wider source into
    the old-size buffer (a raw RuntimeError from index_add).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vcyclefx as vf
from tests.conftest import rel_error


def _states_equal(a: nn.Module, b: nn.Module) -> None:
    """Bitwise equal state dicts."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k], sb[k]), f"{k}: max diff {float((sa[k] - sb[k]).abs().max())}"


# -- (a) attention pooling with a learned query -------------------------------------------------
class AttentionPool(nn.Module):
    """Embed, pool with n_queries learned queries through nn.MultiheadAttention, norm, head."""

    def __init__(self, d: int = 32, heads: int = 4, n_queries: int = 4, need_weights: bool = False):
        super().__init__()
        self.need_weights = need_weights  # True: the bmm/softmax path, False: SDPA
        self.embed = nn.Linear(16, d)
        self.query = nn.Parameter(torch.randn(1, n_queries, d))
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 8)

    def forward(self, x):
        x = self.embed(x)  # (B, T, 16) -> (B, T, d)
        q = self.query.expand(x.shape[0], -1, -1)  # (1, nq, d) -> (B, nq, d)
        o, _ = self.attn(q, x, x, need_weights=self.need_weights)  # (B, nq, d)
        return self.head(self.norm(o).mean(1))


def _pool(need_weights: bool, mode: str):
    torch.manual_seed(0)
    model = AttentionPool(need_weights=need_weights)
    getattr(model, mode)()
    return model, (torch.randn(3, 7, 16),)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("need_weights", [False, True], ids=["sdpa", "bmm"])
def test_attention_pool_with_learned_query_width_x2_is_exact_and_round_trips(need_weights, mode):
    model, example = _pool(need_weights, mode)
    big, mapping = vf.decoalesce(model, example, width=2.0)
    x = (torch.randn(5, 11, 16),)  # another batch size and sequence length
    with torch.no_grad():
        assert rel_error(big(*x), model(*x)) <= 1e-5
    heads = [s for s in mapping.spaces if s.small == 4 and s.large == 8]
    assert heads, "the attention heads are resized"
    back, _ = vf.coalesce(big, mapping=mapping)
    _states_equal(back, model)


@pytest.mark.parametrize("need_weights", [False, True], ids=["sdpa", "bmm"])
def test_attention_pool_head_dim_is_pinned_and_not_tied(need_weights):
    model, example = _pool(need_weights, "eval")
    report = vf.inspect(model, example)
    head_dim = [s for s in report.spaces if s.size == 8 and s.unit == 1
                and any("in_proj" in m.tensor for m in s.members)]
    assert head_dim and not any(s.resizable for s in head_dim)
    assert all("q·kᵀ" in s.reason or "contracted" in s.reason for s in head_dim)
    assert "tied tensors" not in str(report)  # in_proj rows are producers only
    small, _ = vf.coalesce(model, example, width=0.5)
    with torch.no_grad():
        assert torch.isfinite(small(*example)).all()


# -- (b) mixture of attention heads, combined by index_add ---------------------------------------
class MixtureOfHeads(nn.Module):
    """A router picks k of E attention heads per token; every head's output is projected back
    to d, the selected ones are gathered, weighted by the router and summed per token with
    ``index_add`` into a zero buffer."""

    def __init__(self, d: int = 32, experts: int = 4, k: int = 2, head_dim: int = 8,
                 residual: bool = True):
        super().__init__()
        self.k, self.residual = k, residual
        self.embed = nn.Linear(16, d)
        self.router = nn.Linear(d, experts)
        self.wq = nn.Parameter(torch.randn(experts, d, head_dim) / d**0.5)
        self.wk = nn.Parameter(torch.randn(experts, d, head_dim) / d**0.5)
        self.wv = nn.Parameter(torch.randn(experts, d, head_dim) / d**0.5)
        self.wo = nn.Parameter(torch.randn(experts, head_dim, d) / head_dim**0.5)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 8)

    def forward(self, x):
        h = self.embed(x)  # (B, T, d)
        B, T, D = h.shape
        gate, idx = self.router(h).softmax(-1).topk(self.k, dim=-1)  # (B, T, k)
        q = torch.einsum("btd,edh->beth", h, self.wq)  # (B, E, T, dh)
        k = torch.einsum("btd,edh->beth", h, self.wk)
        v = torch.einsum("btd,edh->beth", h, self.wv)
        o = nn.functional.scaled_dot_product_attention(q, k, v)  # (B, E, T, dh)
        y = torch.einsum("beth,ehd->bted", o, self.wo)  # (B, T, E, d)
        if not self.residual:
            y = self.norm(y)
        sel = torch.gather(y, 2, idx.unsqueeze(-1).expand(B, T, self.k, D))  # (B, T, k, d)
        sel = (sel * gate.unsqueeze(-1)).reshape(B * T * self.k, D)
        token = torch.arange(B * T, device=x.device).unsqueeze(1).expand(B * T, self.k).reshape(-1)
        out = h.new_zeros(B * T, D).index_add(0, token, sel).view(B, T, D)  # sum per token
        if not self.residual:
            return out  # the combined heads are the output: d is pinned there
        return self.head(self.norm(h + out)).mean(1)


def _moh(residual: bool = True):
    torch.manual_seed(0)
    return MixtureOfHeads(residual=residual).eval(), (torch.randn(3, 7, 16),)


def test_mixture_of_heads_index_add_width_x2_is_exact_and_round_trips():
    model, example = _moh()
    big, mapping = vf.decoalesce(model, example, width=2.0)
    x = (torch.randn(5, 11, 16),)
    with torch.no_grad():
        assert rel_error(big(*x), model(*x)) <= 1e-5
    assert [(s.small, s.large) for s in mapping.spaces] == [(32, 64)]  # d, with wo's output
    back, _ = vf.coalesce(big, mapping=mapping)
    _states_equal(back, model)


def test_mixture_of_heads_coalesced_runs_and_exports_to_onnx(tmp_path):
    model, example = _moh()
    small, _ = vf.coalesce(model, example, width=0.5)
    assert small.get_parameter("wo").shape == (4, 8, 16)
    with torch.no_grad():
        assert torch.isfinite(small(*example)).all()
    vf.export_onnx(small, None, str(tmp_path / "level1.onnx"), check=True)


def test_index_add_source_shares_the_pinned_axis_of_its_buffer():
    # the combined heads are the model's output: wo's output axis is the buffer's axis, pinned
    # by the output (before: a space of its own, resized into the old-size buffer)
    model, example = _moh(residual=False)
    report = vf.inspect(model, example)
    wo_out = [s for s in report.spaces if s.size == 32 and any(m.tensor == "wo" for m in s.members)]
    assert wo_out and not any(s.resizable for s in wo_out)
    small, _ = vf.coalesce(model, example, width=0.5)
    with torch.no_grad():
        assert small(*example).shape == (3, 7, 32)


class WritesIntoBuffers(nn.Module):
    """Features written into zero buffers by index_put (values of more axes than the buffer's
    trailing ones) and by scatter_add (an index as wide as the features)."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, d), nn.Linear(d, d), nn.Linear(d, 4)

    def forward(self, x):
        h = self.a(x)  # (B, T, d)
        rows = (x[0, :2, 0] * 0).long() + torch.arange(2) * 2  # positions 0 and 2
        buf = torch.ops.aten.index_put(h.new_zeros(x.shape[0], 5, h.shape[-1]), [None, rows],
                                       self.b(h[:, :2]))  # (B, 5, d)
        first = (h[:, 0] * 0).long()  # (B, d): every row into row 0
        z = h.new_zeros(x.shape[0], h.shape[-1]).scatter_add(0, first, self.b(h).mean(1))
        return self.c(buf.mean(1) + z)


def test_index_put_and_scatter_add_values_follow_the_resized_features():
    torch.manual_seed(0)
    model, example = WritesIntoBuffers(), (torch.randn(3, 7, 16),)
    big, mapping = vf.decoalesce(model, example, width=2.0)
    assert [(s.small, s.large) for s in mapping.spaces] == [(32, 64)]
    with torch.no_grad():
        assert rel_error(big(*example), model(*example)) <= 1e-5
    back, _ = vf.coalesce(big, mapping=mapping)
    _states_equal(back, model)
