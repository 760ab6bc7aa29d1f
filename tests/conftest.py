"""Shared fixtures: real zoo models (random weights), captured once per session."""

from __future__ import annotations

import functools
import os

import pytest
import torch

# every pass's check also compares the shapes it wrote with a fake re-execution of its graph
# (passes/contract.py); set before vcyclefx is imported, inherited by the commands tests run
os.environ.setdefault("VCYCLEFX_VERIFY", "1")

import vcyclefx as vf
from vcyclefx import zoo

ZOO_NAMES = list(zoo.ZOO)
CHAIN_NAMES = ZOO_NAMES  # every zoo model has a chain


def output_tensor(out) -> torch.Tensor:
    """The main tensor of a model output (logits of a Hugging Face ModelOutput)."""
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def other_inputs(example: tuple, batch: int = 3, seq: int = 24, seed: int = 1) -> tuple:
    """Inputs like ``example`` at another batch size and (for token inputs) sequence length."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in example:
        if t.dtype == torch.long:
            hi = int(t.max()) + 1
            if hi <= 2:  # a mask or token-type ids: keep the same kind of pattern
                x = torch.zeros(batch, seq, dtype=torch.long)
                x[:, seq // 2 :] = 1 if t.min() == 0 else 0
                out.append(x if t.min() == 0 else torch.ones(batch, seq, dtype=torch.long))
            else:
                out.append(torch.randint(0, hi, (batch, seq), generator=g))
        else:
            out.append(torch.randn(batch, *t.shape[1:], generator=g))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _captured(name: str):
    model, example = zoo.ZOO[name]()
    model.eval()
    level = vf.capture(model, example, frontend=zoo.FRONTEND.get(name, "export"))
    return model, example, level


@pytest.fixture(params=ZOO_NAMES)
def zoo_level(request):
    """(name, original module, example inputs, level 0) for every zoo model."""
    model, example, level = _captured(request.param)
    return request.param, model, example, level


def captured(name: str):
    """(module, example inputs, level 0) of a zoo model, captured once per test session. The
    level is shared: tests that train or change it take ``fresh_level(name)``."""
    return _captured(name)


@functools.lru_cache(maxsize=None)
def _captured_kw(name: str, kwargs: tuple):
    model, example = zoo.ZOO[name](**dict(kwargs))
    level = vf.capture(model, example, frontend=zoo.FRONTEND.get(name, "export"))
    return model, example, level


def fresh_level(name: str, **kwargs):
    """(example inputs, a private copy of a captured zoo level) — capture happens once."""
    from vcyclefx.level import clone_level

    _, example, level = _captured_kw(name, tuple(sorted(kwargs.items())))
    return example, clone_level(level)


def assert_runs_elsewhere_and_trains(level, example) -> None:
    """``level`` runs at batch 3 / sequence 24 with finite outputs, and one step lowers its loss."""
    x = other_inputs(example)
    with torch.no_grad():
        out = output_tensor(level.eval()(*x))
    assert out.shape[0] == 3 and torch.isfinite(out).all()
    before, after = one_step_lowers_loss(level, example)
    assert after < before


def one_step_lowers_loss(level, example) -> tuple[float, float]:
    """Loss before/after one SGD step on a fixed batch (loss: mean square of the outputs
    against a fixed random target)."""
    level.train()
    torch.manual_seed(0)
    out = output_tensor(level(*example))
    target = torch.randn_like(out)
    params = [p for p in level.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-2)
    level.eval()  # no dropout: the comparison must see only the step

    def loss_fn():
        return ((output_tensor(level(*example)) - target) ** 2).mean()

    before = loss_fn()
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = loss_fn()
    return float(before.detach()), float(after)


def kill_after_checkpoint(cmd: list[str], out, env: dict, min_step: int, schedule: str | None = None,
                          timeout: float = 300) -> int:
    """Start ``cmd`` and SIGKILL it, with its children (torchrun's workers), as soon as
    ``out/ckpt/latest.json`` names a checkpoint of ``schedule`` (any schedule if None) at step
    >= ``min_step``; its return code (``-SIGKILL`` when it was killed)."""
    import json
    import os
    import signal
    import subprocess
    import time
    from pathlib import Path

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = Path(out) / "ckpt" / "latest.json"
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if pointer.exists():
                sched, step = json.loads(pointer.read_text())["dir"].rsplit("-", 1)
                if (schedule is None or sched == schedule) and int(step) >= min_step:
                    kids = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                          text=True).stdout.split()
                    for pid in kids:
                        os.kill(int(pid), signal.SIGKILL)
                    proc.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.005)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode

