"""Interpolation, the V-cycle API, FLOP accounting, checkpoints and resume."""

from __future__ import annotations

import re

import pytest
import torch

import vcyclefx as vf
from tests.conftest import captured, fresh_level, output_tensor
from vcyclefx import zoo


def _loss(model, batch):
    out = output_tensor(model(*batch))
    if out.dim() == 3:  # language model: next-token loss
        ids = batch[0]
        return torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]),
                                                 ids[:, 1:].reshape(-1))
    return torch.nn.functional.cross_entropy(out, torch.arange(out.shape[0]) % out.shape[-1])


def _batches(example, seed):
    g = torch.Generator().manual_seed(seed)
    while True:
        out = []
        for t in example:
            if t.dtype == torch.long and int(t.max()) > 1:
                out.append(torch.randint(0, int(t.max()) + 1, t.shape, generator=g))
            elif t.dtype == torch.long:
                out.append(t.clone())
            else:
                out.append(torch.randn(t.shape, generator=g))
        yield tuple(out)


def plain_loop(model, steps, lr, example, seed):
    """A plain PyTorch loop: fresh AdamW per stage (the paper), fixed data per seed."""
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    data = _batches(example, seed)
    loss = None
    for _ in range(steps):
        loss = _loss(model, next(data))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


@pytest.mark.parametrize("name,levels", [("gpt2", 2), ("gpt2", 3),
                                         pytest.param("bert", 2, marks=pytest.mark.slow), ("deit", 2),
                                         pytest.param("llama", 3, marks=pytest.mark.slow)])
def test_cycles_run_with_a_plain_loop_and_the_printed_schedule_is_what_ran(name, levels):
    kwargs = {"n_layer": 4} if name in ("gpt2", "llama") else {}
    example, level = fresh_level(name, **kwargs)
    cycle = vf.VCycle(level, levels=levels, width=0.5, depth=0.5, alpha=0.25,
                      total_steps=4 * (2 * levels - 1))
    printed = [tuple(int(v) for v in row.split()[:2]) + (int(row.split()[3]),)
               for row in str(cycle.schedule).splitlines()[1:-1]]
    ran = []
    params = []
    for stage in cycle:
        loss = plain_loop(stage.model, stage.steps, 1e-3 * stage.lr_scale, example, stage.index)
        assert loss == loss  # finite
        ran.append((stage.index, stage.level, stage.steps))
        params.append(sum(p.numel() for p in stage.model.parameters()))
    assert ran == printed
    assert params[0] > params[1] and params == params[::-1]  # down and back up, same shapes
    final = cycle.result()
    fresh, _ = zoo.ZOO[name](**kwargs)
    fresh.load_state_dict(final.state_dict(), strict=True)


def test_interpolate_endpoints_are_exact_and_mismatches_are_errors():
    _, _, level = captured("gpt2")
    big, mapping = vf.decoalesce(level, width=2.0)
    other, _ = vf.decoalesce(level, width=2.0, pairing="adjacent")
    a = vf.interpolate(big, other, alpha=0.0)
    b = vf.interpolate(big, other, alpha=1.0)
    for k, v in big.state_dict().items():
        assert torch.equal(a.state_dict()[k], v)
        assert torch.equal(b.state_dict()[k], other.state_dict()[k])
    mid = vf.interpolate(big, other, alpha=0.25)
    k = "transformer.h.0.mlp.c_fc.weight"
    assert torch.allclose(mid.state_dict()[k], 0.75 * big.state_dict()[k] + 0.25 * other.state_dict()[k])
    with pytest.raises(vf.MappingError, match="shape"):
        vf.interpolate(level, big, alpha=0.5)
    with pytest.raises(vf.PlanError, match="alpha"):
        vf.interpolate(big, other, alpha=1.5)


def test_gpt2_flops_per_token_match_6n_plus_attention_by_hand():
    n_layer, d, vocab, T = 3, 64, 128, 16
    example, level = fresh_level("gpt2", n_layer=n_layer)
    cycle = vf.VCycle(level, levels=2, width=0.5, depth=0.5, total_steps=100)
    for level, (L, width) in enumerate([(n_layer, d), (2, d // 2)]):
        non_embedding = L * (12 * width * width)  # attention 4 d^2 + MLP 8 d^2 weight entries
        head = vocab * width  # the LM head matmul (tied to the embedding)
        attention = L * 2 * T * width  # q.k^T and attn.v: 2 * T * d multiply-adds per token
        by_hand = 6 * (non_embedding + head) + 6 * attention
        got = cycle.flops_per_token(level)
        assert abs(got - by_hand) / by_hand < 0.02, (level, got, by_hand)


def test_report_lists_stages_and_the_flops_ratio():
    example, level = fresh_level("gpt2", n_layer=4)
    cycle = vf.VCycle(level, levels=2, total_steps=100, fractions=[0.1, 0.5, 0.4])
    text = cycle.report(tokens_per_step=512)
    ratio = float(re.search(r"= ([0-9.]+) x level 0", text).group(1))
    f0, f1 = cycle.flops_per_token(0), cycle.flops_per_token(1)
    assert ratio == pytest.approx((50 * f0 + 50 * f1) / (100 * f0), abs=1e-3)
    assert ratio < 0.6


def test_interrupted_and_resumed_cycle_ends_with_identical_weights(tmp_path):
    def run(ckpt, stop_after=None, resume=None):
        example, level = fresh_level("gpt2")
        cycle = vf.VCycle(level, levels=2, total_steps=12, checkpoint_dir=ckpt, resume=resume)
        for stage in cycle:
            plain_loop(stage.model, stage.steps, 1e-3 * stage.lr_scale, example, stage.index)
            if stop_after is not None and stage.index == stop_after:
                return None
        return cycle.result()

    straight = run(None)
    assert run(tmp_path / "ck", stop_after=1) is None  # "killed" after stage 1 finished
    resumed = run(None, resume=tmp_path / "ck")
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_bad_schedules_fail_before_training():
    example, level = fresh_level("gpt2")
    with pytest.raises(vf.ScheduleError, match="stage 0 .* 0 steps"):
        vf.VCycle(level, levels=2, steps=[0, 5, 5])
    with pytest.raises(vf.ScheduleError, match="alpha"):
        vf.VCycle(level, levels=2, alpha=1.5, total_steps=10)
    with pytest.raises(vf.ScheduleError, match="levels=5: level 1 cannot be coalesced to level 2"):
        vf.VCycle(level, levels=5, total_steps=1000)
    with pytest.raises(vf.ScheduleError, match="sum to 1"):
        vf.VCycle(level, levels=2, total_steps=10, fractions=[0.5, 0.5, 0.5])


def test_optimizer_moments_are_carried_through_the_mappings():
    example, level = fresh_level("gpt2")
    cycle = vf.VCycle(level, levels=2, steps=[3, 3, 3])
    state = None
    for stage in cycle:
        opt = torch.optim.AdamW(stage.model.parameters(), lr=1e-3)
        names = {id(p): n for n, p in stage.model.named_parameters()}
        if state is not None:
            carried = stage.map_optimizer_state(state)
            for p in stage.model.parameters():
                n = names[id(p)]
                assert carried[n]["exp_avg"].shape == p.shape
                assert (carried[n]["exp_avg_sq"] >= 0).all()
                opt.state[p] = {k: v.clone() if isinstance(v, torch.Tensor) else v
                                for k, v in carried[n].items()}
            if stage.phase == "bottom":  # strided width groups, then the two blocks averaged;
                # a producer's coalesced moment is the sum of its copies' (gradients add up)
                b0 = state["transformer.h.0.mlp.c_fc.bias"]["exp_avg"]
                b1 = state["transformer.h.1.mlp.c_fc.bias"]["exp_avg"]
                small = carried["transformer.h.0.mlp.c_fc.bias"]["exp_avg"]
                want = ((b0[:128] + b0[128:]) + (b1[:128] + b1[128:])) / 2
                assert torch.allclose(small, want, atol=1e-12)
        plain_loop(stage.model, stage.steps, 1e-3, example, stage.index)
        # the loop made its own optimizer; take one step with ours to get real moments
        loss = _loss(stage.model, next(_batches(example, 99)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        state = {names[id(p)]: opt.state[p] for p in stage.model.parameters()}


def test_identity_depth_init_makes_the_way_up_keep_the_coarse_function():
    example, level = fresh_level("gpt2", n_layer=4)
    cycle = vf.VCycle(level, levels=2, width=0.5, depth=0.5, alpha=1.0, depth_init="identity",
                      steps=[1, 1, 1])

    def out(model):
        with torch.no_grad():
            return output_tensor(model.eval()(*example))

    start, end = [], []
    for stage in cycle:
        start.append(out(stage.model))
        plain_loop(stage.model, stage.steps, 1e-3, example, seed=stage.index)
        end.append(out(stage.model))
    assert start[2].shape == start[0].shape
    # alpha 1 and identity blocks: level 0 after the way up is the trained coarse model
    assert float((start[2] - end[1]).norm() / end[1].norm()) <= 1e-5
    with pytest.raises(vf.ScheduleError, match="depth_init='zero'"):
        vf.VCycle(level, levels=2, depth_init="zero", steps=[1, 1, 1])


def test_the_readme_recommended_recipe_runs_and_carries_every_parameters_moments():
    """The README's recommended V-cycle block, run as written: 5/90/5 stages at lr x1/x2/x1, and
    every stage after the first starts with AdamW moments of its own parameters' shapes (the
    mapped ones, not zeros)."""
    import pathlib

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index("from vcyclefx.train.vcycle import recommended_fractions")
    block = text[start:text.index("```", start)]
    model, example_inputs = zoo.ZOO["gpt2"]()
    seen = []

    def my_train_loop(m, opt, steps):
        started = {n: opt.state[p]["exp_avg"].clone() for n, p in m.named_parameters()
                   if p in opt.state}
        seen.append((steps, started, {n: tuple(p.shape) for n, p in m.named_parameters()}))
        batches = _batches(example_inputs, len(seen))
        for _ in range(steps):
            opt.zero_grad()
            _loss(m, next(batches)).backward()
            opt.step()

    scope = dict(vf=vf, torch=torch, model=model, example_inputs=example_inputs, peak_lr=1e-3,
                 baseline_steps=40, my_train_loop=my_train_loop, tokens_per_param=60.0)
    exec(compile(block, "README.md", "exec"), scope)  # at 60 tokens per parameter: 2/8/90
    assert [(s.level, s.steps, s.lr_scale) for s in scope["cycle"].schedule.stages] == \
        [(0, 1, 1.0), (1, 5, 2.0), (0, 54, 1.0)]
    assert [shapes["transformer.wte.weight"][1] for _, _, shapes in seen] == [64, 32, 64]
    seen.clear()
    scope = dict(scope, tokens_per_param=5.0)  # below 20: 5/90/5
    exec(compile(block, "README.md", "exec"), scope)
    cycle = scope["cycle"]
    assert [(s.level, s.steps, s.lr_scale) for s in cycle.schedule.stages] == \
        [(0, 3, 1.0), (1, 54, 2.0), (0, 3, 1.0)]
    assert [steps for steps, _, _ in seen] == [3, 54, 3]
    assert [shapes["transformer.wte.weight"][1] for _, _, shapes in seen] == [64, 32, 64]
    assert seen[0][1] == {}  # a fresh optimizer at the start
    for _, started, shapes in seen[1:]:
        assert set(started) == set(shapes)  # every parameter's moments were carried
        assert all(tuple(t.shape) == shapes[n] for n, t in started.items())
        assert sum(float(t.abs().sum()) for t in started.values()) > 0
