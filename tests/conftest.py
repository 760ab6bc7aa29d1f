"""Shared fixtures: real zoo models (random weights), captured once per session."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile

import pytest
import torch

# every pass's check also compares the shapes it wrote with a fake re-execution of its graph
# (passes/contract.py); set before vcyclefx is imported, inherited by the commands tests run
os.environ.setdefault("VCYCLEFX_VERIFY", "1")
# the capture cache (vcyclefx/capture/cache.py) of this process's commands: a fresh folder,
# removed at exit, never the user's own ~/.cache
_CAPTURES = tempfile.mkdtemp(prefix="vcyclefx-test-captures-")
os.environ["VCYCLEFX_CAPTURE_CACHE"] = _CAPTURES
atexit.register(shutil.rmtree, _CAPTURES, True)

import vcyclefx as vf
from vcyclefx import zoo

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n: a core per worker, not a pool per worker
    torch.set_num_threads(1)

# -- torch state: a test leaves it as it found it ---------------------------------------------
# DESIGN: "Global torch state is the same after any public call as before, error or not". A
# default device or a function mode left behind turns every later tensor of the process into a
# meta tensor, so the failure shows up tests later, far from its cause: this fixture fails the
# test that changed it, names what changed, and puts it back for the next test.


def _module_inits() -> dict:
    """Every nn.Module class defined so far -> the ``__init__`` in its own ``__dict__`` (None:
    inherited). A watched or patched ``__init__`` left behind, or an inherited one restored onto
    the class itself, differs here. About 1 ms for 1,500 classes."""
    out, todo = {torch.nn.Module: torch.nn.Module.__dict__.get("__init__")}, [torch.nn.Module]
    while todo:
        for sub in type.__subclasses__(todo.pop()):
            if sub not in out:
                out[sub] = sub.__dict__.get("__init__")
                todo.append(sub)
    return out


def _torch_state() -> dict:
    import torch.utils._device  # noqa: F401 - CURRENT_DEVICE below
    from torch.overrides import _get_current_function_mode_stack
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return {
        "default device": torch.get_default_device(),
        "default dtype": torch.get_default_dtype(),
        "grad mode": torch.is_grad_enabled(),
        "torch-function modes": list(_get_current_function_mode_stack()),
        "torch-dispatch modes": list(_get_current_dispatch_mode_stack()),
        "set_default_device": getattr(torch._GLOBAL_DEVICE_CONTEXT, "device_context", None),
        "__init__ of": _module_inits(),
        # not compared (it follows the device modes above), only put back with them
        "current device": getattr(torch.utils._device, "CURRENT_DEVICE", None),
    }


def _mode_names(modes) -> str:
    return "[" + ", ".join(f"{type(m).__name__}({m.device})" if hasattr(m, "device")
                           else type(m).__name__ for m in modes) + "]"


def _state_changes(before: dict, after: dict) -> list[str]:
    out = []
    for k in ("default device", "default dtype", "grad mode"):
        if before[k] != after[k]:
            out.append(f"{k} {before[k]} -> {after[k]}")
    for k in ("torch-function modes", "torch-dispatch modes"):
        if list(map(id, before[k])) != list(map(id, after[k])):
            out.append(f"{k} {_mode_names(before[k])} -> {_mode_names(after[k])}")
    if before["set_default_device"] is not after["set_default_device"]:
        out.append("torch.set_default_device was called")
    now = after["__init__ of"]
    for cls, init in before["__init__ of"].items():
        if now[cls] is not init:
            how = ("is a wrapper still installed" if hasattr(now[cls], "__wrapped__")
                   else "was inherited and is now the class's own" if init is None
                   else "was the class's own and is now inherited" if now[cls] is None
                   else "was replaced")
            out.append(f"{cls.__module__}.{cls.__qualname__}.__init__ {how}")
    return out


def _restore_torch_state(s: dict) -> None:
    import torch.overrides as ov
    import torch.utils._device as device_mod
    import torch.utils._python_dispatch as pd

    while torch._C._len_torch_function_stack():
        ov._pop_mode()
    for m in s["torch-function modes"]:
        ov._push_mode(m)
    while torch._C._len_torch_dispatch_stack():
        pd._pop_mode()
    for m in s["torch-dispatch modes"]:
        pd._push_mode(m)
    torch._GLOBAL_DEVICE_CONTEXT.device_context = s["set_default_device"]
    device_mod.CURRENT_DEVICE = s["current device"]
    torch.set_default_dtype(s["default dtype"])
    torch.set_grad_enabled(s["grad mode"])
    for cls, init in s["__init__ of"].items():
        if cls.__dict__.get("__init__") is not init:
            if init is None:
                delattr(cls, "__init__")
            else:
                cls.__init__ = init


@pytest.fixture(autouse=True)
def torch_state_is_left_as_found():
    """Fails (at teardown) a test after which the default device or dtype, grad mode, the
    torch-function or torch-dispatch mode stack, or the ``__init__`` of an nn.Module class differ
    from before it, naming what changed; the state is restored first."""
    before = _torch_state()
    yield
    after = _torch_state()
    changes = _state_changes(before, after)
    if changes:
        _restore_torch_state(before)
        pytest.fail("torch state leaked by this test: " + "; ".join(changes), pytrace=False)


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

