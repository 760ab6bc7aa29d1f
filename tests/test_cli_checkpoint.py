"""`vcyclefx coalesce` of a Hugging Face checkpoint directory, as a program: the level it writes
equals the in-process coalescing of the same model, its level takes the model's tensors without
copying them, and it leaves without interpreter teardown with its output complete."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import vcyclefx as vf
from vcyclefx import zoo
from vcyclefx.capture.specs import model_from_spec
from vcyclefx.cli import _capture_kwargs
from vcyclefx.export.leveldir import load_level

REPO = Path(__file__).resolve().parents[1]


def _checkpoint(tmp_path) -> Path:
    model, _ = zoo.gpt2()
    d = tmp_path / "ckpt"
    d.mkdir()
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(d)
    torch.save(model.state_dict(), d / "pytorch_model.bin")  # the old format, as in the issue
    return d


def test_capture_copies_weights_unless_told_not_to():
    model, x = zoo.gpt2()
    theirs = {p.data_ptr() for p in model.parameters()}
    copied = vf.capture(model, x)
    taken = vf.capture(model, x, copy_weights=False)
    assert not theirs & {p.data_ptr() for p in copied.parameters()}
    assert {p.data_ptr() for p in taken.parameters()} == theirs
    copied.eval(), taken.eval()
    assert torch.equal(copied(*x).logits, taken(*x).logits)


def test_the_command_line_takes_the_checkpoint_tensors(tmp_path):
    found = model_from_spec(str(_checkpoint(tmp_path)))
    kwargs = _capture_kwargs(found)
    assert kwargs["copy_weights"] is False
    level = vf.capture(found.model, found.example, **kwargs)
    assert {p.data_ptr() for p in level.parameters()} == {p.data_ptr() for p in found.model.parameters()}


def test_coalesce_of_a_checkpoint_directory_in_a_fresh_process(tmp_path):
    ckpt = _checkpoint(tmp_path)
    out = tmp_path / "small"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "vcyclefx.cli", "coalesce", str(ckpt), "--width", "0.5",
                          "--depth", "0.5", "-o", str(out)], capture_output=True, text=True,
                         env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "wrote" in res.stderr and "tied lm_head.weight" in res.stdout  # flushed before exit
    assert sorted(p.name for p in out.iterdir()) == [
        "inputs.safetensors", "level.json", "level.pt2", "mapping.json", "weights.safetensors"]
    assert json.loads((out / "level.json").read_text())["made_by"] == "coalesce"
    small, mapping = load_level(out)
    found = model_from_spec(str(ckpt))
    want, want_map = vf.coalesce(found.model, found.example, width=0.5, depth=0.5)
    assert mapping.small_shapes == want_map.small_shapes
    small.eval(), want.eval()
    ids = torch.randint(0, 128, (3, 11))
    assert torch.equal(small(ids).logits, want(ids).logits)
    assert not list(tmp_path.glob(".*small*"))  # no staging directory left behind
