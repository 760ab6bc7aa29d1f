"""``driver.sharded``: the V-cycle's transitions replayed one tensor at a time into FSDP2 shards
(``--fsdp-transitions tensor``), against the in-memory V-cycle, in this process (a gloo group
of one process: the shards are whole, every code path runs; tests/test_driver_fsdp.py runs it
on two processes). Every weight, every carried moment and the checkpoint files are equal bit
for bit."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from vcyclefx.capture.frontend import as_level
from vcyclefx.driver.config import TrainConfig
from vcyclefx.driver.parallel import optimizer_state_by_name
from vcyclefx.driver.sharded import ShardedLevels
from vcyclefx.driver.stage import make_optimizer
from vcyclefx.store import load_tensors
from vcyclefx.train.vcycle import VCycle
from vcyclefx.zoo.gpt import GPT, GPTConfig


@pytest.fixture
def group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _train_like(params: dict, sharded: dict, gen: torch.Generator) -> None:
    """The same made-up update on the whole and the sharded weights (levels then differ from
    the planning pass's, as trained ones do)."""
    with torch.no_grad():
        for name, p in params.items():
            delta = torch.randn(p.shape, generator=gen) * 0.1
            p.add_(delta)
            sharded[name].to_local().add_(delta)


def _moments(opt, params: dict, gen: torch.Generator, like: dict | None = None) -> None:
    """AdamW state for ``params`` (random moments, step 3), sharded as ``like``'s tensors."""
    from torch.distributed.tensor import distribute_tensor

    for name, p in params.items():
        m, v = torch.randn(p.shape, generator=gen), torch.rand(p.shape, generator=gen)
        if like is not None:
            q = like[name]
            m, v = (distribute_tensor(x, q.device_mesh, q.placements) for x in (m, v))
        opt.state[p if like is None else like[name]] = {"step": torch.tensor(3.0), "exp_avg": m,
                                                        "exp_avg_sq": v}


def test_every_transition_replayed_per_tensor_equals_the_whole_level_path(group, tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32))
    example = (torch.randint(0, 64, (2, 16)),)
    kw = dict(levels=2, steps=[1, 2, 3], alpha=0.25, depth_init="identity")
    level = as_level(model, example)  # captured once; each cycle trains its own copy
    ref, mine = VCycle(level, **kw), VCycle(level, **kw)
    cfg = TrainConfig(fsdp=True)
    rt = SimpleNamespace(cfg=cfg, device=torch.device("cpu"), world=1, rank=0, master=True)
    levels = ShardedLevels(rt, mine, flops_of=lambda m: sum(p.numel() for p in m.parameters()))
    assert levels.fpt == {0: sum(p.numel() for p in ref.level_module(0).parameters()),
                          1: sum(p.numel() for p in ref.level_module(1).parameters())}
    assert all(t.is_meta for m in mine.held_modules().values()
               for t in m.state_dict(keep_vars=True).values())
    gen = torch.Generator().manual_seed(1)
    ia, ib = iter(ref), iter(mine)
    opt_a = opt_b = None
    carried = 0
    for _ in range(3):
        a, b = next(ia), next(ib)
        assert (a.level, a.steps) == (b.level, b.steps)
        sharded = levels.sharded(b.model)
        if opt_a is not None:  # the moments through the transition
            want = a.map_optimizer_state(optimizer_state_by_name(a.transition[2],
                                                                 opt_a.state_dict()))
            got = levels.carry(b, opt_b)
            assert sorted(got) == sorted(want)
            for name, entry in want.items():
                for key, t in entry.items():
                    g = got[name][key]
                    g = g.full_tensor() if key != "step" else g
                    assert torch.equal(g, t), (b.index, name, key)
                    carried += key != "step"
            levels.release()
        assert set(levels.held) == {id(m) for r, m in mine.held_modules().items()
                                    if not r.startswith("shape")}  # the old level dropped
        whole = levels.materialize(b.model)
        ref_state = a.model.state_dict()
        assert sorted(whole.state_dict()) == sorted(ref_state)
        for name, t in whole.state_dict().items():
            assert torch.equal(t, ref_state[name]), (b.index, name)
        levels.save_weights(tmp_path / f"stage{b.index}.safetensors", b.model)
        saved = load_tensors(tmp_path / f"stage{b.index}.safetensors")
        assert all(torch.equal(saved[n], t) for n, t in ref_state.items())
        assert saved["lm_head.weight"].data_ptr() == saved["wte.weight"].data_ptr()  # tied
        params_a = dict(a.model.named_parameters())
        params_b = dict(sharded.named_parameters())
        _train_like(params_a, params_b, gen)
        opt_a = make_optimizer(a.model, cfg, 1e-3, rt.device)
        opt_b = make_optimizer(sharded, cfg, 1e-3, rt.device)
        state = gen.get_state()
        _moments(opt_a, params_a, gen)
        gen.set_state(state)
        _moments(opt_b, params_a, gen, like=params_b)
    assert carried == 2 * (16 + 28)  # 2 moments of the 16 parameters of level 1, the 28 of 0
