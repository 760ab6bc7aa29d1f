"""The V-cycle inside a real ``transformers.Trainer`` (vcyclefx.integrations.hf), on CPU with tiny
random-weight models: carried moments, the driver's recipe, resume, save_pretrained."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import vcyclefx as vf
from vcyclefx.driver.config import TrainConfig
from vcyclefx.driver.data import Batches
from vcyclefx.driver.models import lm_loss
from vcyclefx.driver.train import cycle_options, train_vcycle_on
from vcyclefx.train.optim_state import optimizer_state_by_name

transformers = pytest.importorskip("transformers")
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,  # noqa: E402
                          Trainer, TrainerCallback, TrainingArguments)

from vcyclefx.integrations.hf import train_vcycle  # noqa: E402

VOCAB, T, B = 64, 16, 4
CFG = TrainConfig(vocab_size=VOCAB, seq_len=T, batch_size=B, grad_accum=1, lr=3e-3, min_lr=3e-4,
                  warmup=2, vcycle_steps=10, fractions=(0.2, 0.6, 0.2), lr_scales=(1.0, 2.0),
                  eval_every=0, eval_batches=1, log_every=1, ckpt_every=0, device="cpu",
                  compile=False, dtype="float32", carry_optimizer=True, quiet=True)


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=T, n_embd=32, n_layer=2,
                                      n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      use_cache=False))


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=T,
                                        use_cache=False))


def batches():
    tokens = np.random.default_rng(0).integers(0, VOCAB, 4000).astype(np.uint16)
    return Batches(tokens, "train", B, T, seed=1, device=torch.device("cpu"))


class Rows(torch.utils.data.IterableDataset):
    """The driver's batches from global step ``start`` on, row by row, in the driver's order."""

    def __init__(self, data: Batches, start: int, steps: int):
        self.data, self.start, self.steps = data, start, steps

    def __iter__(self):
        for s in range(self.start, self.start + self.steps):
            x, y = self.data.get(s, 0)
            for i in range(len(x)):
                yield {"input_ids": x[i], "labels": y[i]}


class Moments(TrainerCallback):
    """The optimizer state by name of each stage at its first and its last step."""

    def __init__(self, run, seen):
        self.run, self.seen = run, seen

    def _take(self, optimizer):
        return copy.deepcopy(optimizer_state_by_name(optimizer, self.run.stage.model))

    def on_train_begin(self, args, state, control, optimizer=None, **kw):
        self.seen[self.run.index] = {"stage": self.run.stage, "begin": self._take(optimizer)}

    def on_train_end(self, args, state, control, optimizer=None, **kw):
        self.seen[self.run.index]["end"] = self._take(optimizer)


def hf_args(out, **kw):
    kw = {"save_strategy": "no", **kw}
    return TrainingArguments(str(out), learning_rate=CFG.lr, warmup_steps=CFG.warmup,
                             lr_scheduler_type="cosine_with_min_lr",
                             lr_scheduler_kwargs={"min_lr": CFG.min_lr},
                             weight_decay=CFG.weight_decay, adam_beta1=CFG.beta1,
                             adam_beta2=CFG.beta2, max_grad_norm=CFG.grad_clip,
                             per_device_train_batch_size=B, report_to=[], logging_steps=1,
                             use_cpu=True, optim="adamw_torch",
                             dataloader_num_workers=0, **kw)


def example():
    return (batches().get(0, 0)[0][:2],)


def run_hf(model, out, seen, *, extra=lambda run: [], resume=False, **kw):
    data = batches()

    def make_trainer(module, args, run):
        return Trainer(model=module, args=args, train_dataset=Rows(data, run.before.step, run.steps),
                       compute_loss_func=lambda out, labels, num_items_in_batch=None:
                       lm_loss(out, labels), callbacks=[Moments(run, seen), *extra(run)])

    return train_vcycle(model, example(), make_trainer, hf_args(out, **kw), resume=resume,
                        **cycle_options(CFG))


def assert_carried_exactly(seen):
    assert sorted(seen) == [0, 1, 2]
    for i in (1, 2):
        want = seen[i]["stage"].map_optimizer_state(seen[i - 1]["end"])
        got = seen[i]["begin"]
        assert set(got) == set(want) and got
        for name in want:
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(got[name][key], want[name][key]), (i, name, key)
            assert float(got[name]["step"]) == float(want[name]["step"])


def eval_loss(model) -> float:
    x, y = batches().get(10_000, 0)
    with torch.no_grad():
        return lm_loss(model(x), y).item()


def test_trainer_vcycle_on_gpt2_matches_the_driver_recipe_and_carries_moments_exactly(tmp_path):
    level0 = vf.capture(tiny_gpt2(), example())  # one capture for both runs (a VCycle copies it)
    seen = {}
    final = run_hf(level0, tmp_path / "hf", seen)
    assert_carried_exactly(seen)
    ours, records = train_vcycle_on(CFG, level0, batches(), tmp_path / "driver")
    driver_train = [r for r in records if r["event"] == "train"]
    hf_log = [r for r in _metrics(tmp_path / "hf") if "loss" in r]
    assert len(hf_log) == len(driver_train) == 10
    for a, b in zip(hf_log, driver_train):  # the same losses step by step, the same schedule
        assert (a["global_step"], a["level"]) == (b["step"], b["level"])
        assert abs(a["loss"] - b["loss"]) <= 1e-4, (a, b)
        assert math.isclose(a["learning_rate"], b["lr"], rel_tol=1e-6)
    assert abs(eval_loss(final) - eval_loss(ours)) <= 1e-4
    back = GPT2LMHeadModel.from_pretrained(tmp_path / "hf" / "final")
    assert abs(eval_loss(back) - eval_loss(final)) == 0.0


def _metrics(root):
    import json

    return [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # 58 s measured on the 2-core machine under load ~8 (2026-12-07)
def test_trainer_vcycle_on_llama_logs_one_global_count_and_loads_into_its_class(tmp_path):
    seen = {}
    final = run_hf(tiny_llama(), tmp_path / "hf", seen)
    assert_carried_exactly(seen)
    log = [r for r in _metrics(tmp_path / "hf") if "loss" in r]
    assert [r["global_step"] for r in log] == list(range(1, 11))
    assert [(r["level"], r["phase"]) for r in log] == ([(0, "down")] * 2 + [(1, "bottom")] * 6
                                                       + [(0, "up")] * 2)
    assert all(math.isfinite(r["loss"]) for r in log)
    assert [r["tokens"] for r in log] == [B * T * s for s in range(1, 11)]
    flops = np.diff([0.0] + [r["flops"] for r in log])
    assert flops[2] < flops[0] / 2 and flops[9] == pytest.approx(flops[0])  # level 1 is cheaper
    back = LlamaForCausalLM.from_pretrained(tmp_path / "hf" / "final")
    assert back.config.hidden_size == 32 and back.config.num_hidden_layers == 2
    assert abs(eval_loss(back) - eval_loss(final)) == 0.0


class Killed(Exception):
    pass


class KillAt(TrainerCallback):
    """Stops the process's training (an exception) after optimizer step ``step`` of a stage."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            raise Killed(f"killed after step {self.step}")


@pytest.mark.slow
def test_trainer_vcycle_killed_inside_a_stage_resumes_to_the_same_model(tmp_path):
    level0 = vf.capture(tiny_gpt2(), example())
    full = run_hf(level0, tmp_path / "full", {}, save_strategy="steps", save_steps=1)
    with pytest.raises(Killed):  # in stage 1 (the coarse level) after its 3rd step
        run_hf(level0, tmp_path / "cut", {}, save_strategy="steps", save_steps=1,
               extra=lambda run: [KillAt(3)] if run.index == 1 else [])
    assert (tmp_path / "cut" / "vcycle" / "stage-000").is_dir()
    assert not (tmp_path / "cut" / "stage-001" / "end").exists()
    # killed after its 3rd step, before that step's log and checkpoint
    assert sorted(p.name for p in (tmp_path / "cut" / "stage-001").iterdir()) == \
        ["checkpoint-1", "checkpoint-2"]
    with pytest.raises(Exception, match="already holds a V-cycle run"):
        run_hf(level0, tmp_path / "cut", {}, save_strategy="steps", save_steps=1)
    seen = {}
    resumed = run_hf(level0, tmp_path / "cut", seen, save_strategy="steps", save_steps=1,
                     resume=True)
    assert sorted(seen) == [1, 2]  # stage 0 was not trained again
    a, b = full.state_dict(), resumed.state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    log = [r for r in _metrics(tmp_path / "cut") if "loss" in r]
    assert [r["global_step"] for r in log] == list(range(1, 11))  # one count, nothing repeated
