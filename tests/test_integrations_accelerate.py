"""The README's accelerate loop, extracted from README.md and run as written (CPU, tiny GPT-2)."""

from __future__ import annotations

import math
import pathlib
import subprocess
import sys

import pytest
import torch

pytest.importorskip("accelerate")
from test_integrations_hf import T, VOCAB, batches, tiny_gpt2  # noqa: E402
from transformers import GPT2LMHeadModel  # noqa: E402


def _block(start: str) -> str:
    """The README's ```python block that contains ``start``."""
    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    i = text.rindex("```python\n", 0, text.index(start)) + len("```python\n")
    return text[i:text.index("```", i)]


@pytest.mark.slow  # 47 s measured on the 2-core machine under load ~8 (2026-12-07)
def test_the_readme_accelerate_loop_runs_the_cycle_and_carries_the_moments_to_the_end(capsys):
    data = batches()
    model = tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scope = dict(model=model, example_inputs=(data.get(0, 0)[0][:2],), total_steps=40,
                 peak_lr=3e-3, warmup=4, log_every=20, batches=(data.get(s, 0) for s in range(10**6)))
    exec(compile(_block("from accelerate import Accelerator"), "README.md", "exec"), scope)
    cycle, final = scope["cycle"], scope["final"]
    assert scope["step"] == 40 and [s.steps for s in cycle.schedule] == [2, 36, 2]
    assert isinstance(final, GPT2LMHeadModel) and final.config.n_embd == 32
    # the moments went through both transitions: AdamW's step count ran on over every stage
    names = {n for n, _ in cycle.result().named_parameters()}
    assert set(scope["moments"]) == names
    assert all(float(e["step"]) == 40 for e in scope["moments"].values())
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in printed] == ["20", "40"]
    assert "level 1 (bottom)" in printed[0] and "level 0 (up)" in printed[1]
    x, y = data.get(10_000, 0)
    with torch.no_grad():
        after = torch.nn.functional.cross_entropy(final(x).logits.flatten(0, 1), y.flatten())
        model.load_state_dict(before)
        start = torch.nn.functional.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())
    assert math.isfinite(after.item()) and after.item() < start.item()  # it learned
    assert final.config.vocab_size == VOCAB and final.config.n_positions == T


def test_importing_vcyclefx_and_its_integrations_imports_no_training_library():
    code = ("import sys, vcyclefx, vcyclefx.integrations, vcyclefx.integrations.hf, "
            "vcyclefx.integrations.lightning\n"
            "print(sorted(m for m in ('transformers', 'lightning', 'accelerate', 'tensorboard', "
            "'pytorch_lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=pathlib.Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"
