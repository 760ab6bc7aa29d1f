"""The V-cycle inside real Lightning (vcyclefx.integrations.lightning): one fit() per stage of a
LightningModule whose network is ``self.net`` (a tiny GPT-2-like model, vcyclefx.zoo.gpt.GPT),
on CPU: the driver's recipe step for step, moments carried exactly, the result in its class."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import vcyclefx as vf
from vcyclefx.capture.specs import model_from_spec
from vcyclefx.driver.models import lm_loss
from vcyclefx.driver.train import cycle_options, train_vcycle_on
from vcyclefx.train.optim_state import optimizer_state_by_name
from vcyclefx.zoo.gpt import GPT, GPTConfig

L = pytest.importorskip("lightning")
from test_integrations_hf import CFG, T, VOCAB, assert_carried_exactly, batches, example  # noqa: E402

from vcyclefx.integrations.lightning import fit_vcycle  # noqa: E402

# the zoo's factory names the class's sizes, so vf.to_module can rebuild it at every level
SPEC = f"vcyclefx.zoo:nanogpt?n_layer=2&n_head=4&n_embd=32&vocab={VOCAB}"
GPT_CFG = GPTConfig(block_size=64, vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=32)


class LitLM(L.LightningModule):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        x, y = batch  # (B, T) each
        return lm_loss(self.net(x), y)

    def configure_optimizers(self):  # the driver's AdamW: weight decay on matrices only
        params = list(self.net.parameters())
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": CFG.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=CFG.lr, betas=(CFG.beta1, CFG.beta2))


class Moments(L.Callback):
    def __init__(self, run, seen):
        self.run, self.seen = run, seen

    def _take(self, trainer):
        return copy.deepcopy(optimizer_state_by_name(trainer.optimizers[0], self.run.stage.model))

    def on_train_start(self, trainer, pl_module):
        self.seen[self.run.index] = {"stage": self.run.stage, "begin": self._take(trainer)}

    def on_train_end(self, trainer, pl_module):
        self.seen[self.run.index]["end"] = self._take(trainer)


@pytest.mark.slow  # 55 s measured on the 2-core machine under load ~8 (2026-12-07)
def test_lightning_vcycle_matches_the_driver_recipe_carries_moments_and_ends_in_its_class(tmp_path):
    found = model_from_spec(SPEC)
    level0 = vf.capture(found.model, example(), recipe=found.recipe)
    data, seen = batches(), {}

    def make_trainer(run):
        return L.Trainer(max_steps=run.steps, default_root_dir=run.dir, accelerator="cpu",
                         devices=1, gradient_clip_val=CFG.grad_clip, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=1,
                         callbacks=[Moments(run, seen)])

    def loader(run):
        steps = range(run.before.step, run.before.step + run.steps)
        return torch.utils.data.DataLoader([data.get(s, 0) for s in steps], batch_size=None)

    lit = LitLM(found.model)  # recipe=: how vf.to_module rebuilds the class at each level's sizes
    net = fit_vcycle(lit, "net", example(), make_trainer, loader, tmp_path / "lit",
                     warmup=CFG.warmup, min_lr_ratio=CFG.min_lr / CFG.lr, recipe=found.recipe,
                     **cycle_options(CFG))
    assert lit.net is net and isinstance(net, GPT)

    assert_carried_exactly(seen)  # each stage began with the mapping of the last one's moments

    ours, records = train_vcycle_on(CFG, level0, batches(), tmp_path / "driver")
    driver = [r for r in records if r["event"] == "train"]
    log = [json.loads(x) for x in (tmp_path / "lit" / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == len(driver) == 10
    assert [r["tokens"] for r in log] == [r["tokens"] for r in driver]  # B * T per step, global
    assert [(r["level"], r["phase"]) for r in log] == [(0, "down")] * 2 + [(1, "bottom")] * 6 + \
        [(0, "up")] * 2
    for a, b in zip(log, driver):
        assert (a["global_step"], a["level"]) == (b["step"], b["level"])
        assert abs(a["loss"] - b["loss"]) <= 1e-4, (a, b)
        assert math.isclose(a["lr"], b["lr"], rel_tol=1e-6)
    x, y = batches().get(10_000, 0)
    with torch.no_grad():
        final_loss = lm_loss(net(x), y).item()
        assert abs(final_loss - lm_loss(ours(x), y).item()) <= 1e-4
        mine = GPT(GPT_CFG)
        mine.load_state_dict(net.state_dict(), strict=True)
        assert lm_loss(mine(x), y).item() == final_loss
