"""Optimizer moments follow the gradients through coalesce / de-coalesce (vcyclefx/moments.py)."""

from __future__ import annotations

import pytest
import torch

import vcyclefx as vf
from tests.conftest import fresh_level, output_tensor
from vcyclefx.level import clone_level
from vcyclefx.train.vcycle import Stage


def _loss(model, ids):
    logits = output_tensor(model(ids))  # (B, T, vocab)
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             ids[:, 1:].reshape(-1))


def _batch(example, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, example[0].shape, generator=g)


def _state(model, opt):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: opt.state[p] for p in model.parameters() if p in opt.state}


def _step(model, opt, ids):
    opt.zero_grad()
    _loss(model, ids).backward()
    # The key biases' gradient is zero in exact arithmetic (softmax ignores a constant added to
    # a query's scores): it is rounding noise (~1e-11), which Adam normalises to full-size steps
    # of random sign. Make it the exact zero so both models see the same (zero) gradient there.
    for n, p in model.named_parameters():
        if n.endswith("attn.c_attn.bias"):
            third = p.shape[0] // 3
            p.grad[third:2 * third] = 0.0
    opt.step()


def _factors(small, mapping):
    """d per larger-level tensor (theta_big = d * theta_small, elementwise): one number per
    tensor with equal groups."""
    ones = clone_level(small)
    with torch.no_grad():
        for p in ones.parameters():
            p.fill_(1.0)
    big, _ = vf.decoalesce(ones, mapping=mapping)
    out = {}
    for n, p in big.named_parameters():
        values = p.detach().unique()
        assert len(values) == 1, n
        out[n] = float(values)
    return out


def _trained_small(steps=3, **adamw):
    example, small = fresh_level("gpt2")
    small.eval()  # dropout off: one exact function
    opt = torch.optim.AdamW(small.parameters(), **adamw)
    for s in range(steps):  # moments that are not zero
        _step(small, opt, _batch(example, s))
    return example, small, opt


ADAMW = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-16, weight_decay=0.1)


def test_one_adamw_step_on_the_decoalesced_model_is_the_decoalesced_step_of_the_small_one():
    """Width x2, equal groups: with the mapped moments and lr * d (wd / d) on the tensors whose
    split consumer axes make d < 1, one AdamW step of the larger model equals the de-coalescing
    of the smaller model's step, weights and both moments (eps 1e-16: exact up to its term)."""
    example, small, opt = _trained_small(**ADAMW)
    big, mapping = vf.decoalesce(small, width=2.0)
    big.eval()
    stage = Stage(1, 0, big, 1, 1.0, "up", ("decoalesce", mapping, small))
    carried = stage.map_optimizer_state(_state(small, opt))

    d = _factors(small, mapping)
    assert sorted(set(d.values())) == [0.5, 1.0]  # split consumers (and ln_f's fold) / the rest
    groups = [{"params": [p for n, p in big.named_parameters() if d[n] == f], "lr": ADAMW["lr"] * f,
               "weight_decay": ADAMW["weight_decay"] / f} for f in sorted(set(d.values()))]
    big_opt = torch.optim.AdamW(groups, **ADAMW)
    for n, p in big.named_parameters():
        big_opt.state[p] = {k: v.clone() for k, v in carried[n].items()}

    before = {n: p.detach().clone() for n, p in big.named_parameters()}
    ids = _batch(example, 99)
    _step(small, opt, ids)
    _step(big, big_opt, ids)
    want, _ = vf.decoalesce(small, mapping=mapping)
    want_state = Stage(1, 0, want, 1, 1.0, "up", ("decoalesce", mapping, small)) \
        .map_optimizer_state(_state(small, opt))
    got_state = _state(big, big_opt)
    wp = dict(want.named_parameters())
    for n, p in big.named_parameters():
        rel = float(((p - wp[n]).abs().max() / wp[n].abs().max()).detach())
        assert rel < 1e-6, (n, rel)
        step, want_step = p.detach() - before[n], wp[n].detach() - before[n]
        assert float((step - want_step).abs().max() / want_step.abs().max()) < 1e-3, n
        for k in ("exp_avg", "exp_avg_sq"):
            a, b = got_state[n][k], want_state[n][k]
            assert (a - b).abs().max() <= 1e-5 * b.abs().max(), (n, k)
        assert float(got_state[n]["step"]) == 4.0


def test_with_one_learning_rate_a_split_consumer_moves_1_over_d_times_the_mapped_step():
    """Adam's update does not change when m, v are scaled by c, c^2: a tensor whose axes are all
    producers takes the exact mapped step, one with a split consumer axis 2x it (width x2)."""
    adamw = dict(ADAMW, weight_decay=0.0)
    example, small, opt = _trained_small(**adamw)
    big, mapping = vf.decoalesce(small, width=2.0)
    big.eval()
    carried = Stage(1, 0, big, 1, 1.0, "up", ("decoalesce", mapping, small)) \
        .map_optimizer_state(_state(small, opt))
    big_opt = torch.optim.AdamW(big.parameters(), **adamw)
    for n, p in big.named_parameters():
        big_opt.state[p] = {k: v.clone() for k, v in carried[n].items()}
    before = {n: p.detach().clone() for n, p in big.named_parameters()}
    ids = _batch(example, 99)
    _step(small, opt, ids)
    _step(big, big_opt, ids)
    want, _ = vf.decoalesce(small, mapping=mapping)
    wp = dict(want.named_parameters())
    d = _factors(small, mapping)
    for n, p in big.named_parameters():
        mapped_step = wp[n] - before[n]
        ratio = (p - before[n]).norm() / mapped_step.norm()
        assert float(ratio.detach()) == pytest.approx(1 / d[n], rel=1e-4), n


def test_moments_map_back_exactly_and_follow_the_gradient_rules():
    """coalesce(decoalesce(state)) == state bit for bit (width and depth x2); a copied producer
    unit holds m/2 and v/4, a split consumer part m and v, a copied block the block's."""
    example, small, opt = _trained_small(**ADAMW)
    state = _state(small, opt)
    big, mapping = vf.decoalesce(small, width=2.0, depth=2.0)
    up = Stage(1, 0, big, 1, 1.0, "up", ("decoalesce", mapping, small)).map_optimizer_state(state)
    back = Stage(2, 1, small, 1, 1.0, "bottom", ("coalesce", mapping, big)).map_optimizer_state(up)
    assert back.keys() == state.keys()
    for n in state:
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(back[n][k], state[n][k]), (n, k)
    # block 1 of the small model became blocks 2 and 3 (adjacent depth pairing), width strided
    b = state["transformer.h.1.mlp.c_fc.bias"]  # producer of the MLP space
    for i in (2, 3):
        got = up[f"transformer.h.{i}.mlp.c_fc.bias"]
        assert torch.equal(got["exp_avg"], torch.cat([b["exp_avg"] / 2] * 2))
        assert torch.equal(got["exp_avg_sq"], torch.cat([b["exp_avg_sq"] / 4] * 2))
    w = state["transformer.h.0.mlp.c_proj.weight"]  # Conv1D (in=MLP: consumer, out=stream)
    got = up["transformer.h.0.mlp.c_proj.weight"]
    assert torch.equal(got["exp_avg"], w["exp_avg"].repeat(2, 2) / 2)  # consumer m, producer m/2
    assert torch.equal(got["exp_avg_sq"], w["exp_avg_sq"].repeat(2, 2) / 4)
