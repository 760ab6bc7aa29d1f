"""Two processes (torchrun, gloo on CPU; DDP and FSDP2) train like one process with the same
global batch.

Global batch = batch_size * grad_accum micro-batches; micro-batch j of step s is the same data
whichever process draws it, so 1 process accumulating 2 micro-batches and 2 processes with one
each (DDP averaging their gradients) must give the same losses, up to float summation order.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vcyclefx.driver.cli import add_train_arguments, config_from_args
from vcyclefx.driver.train import main

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "tools" / "train.py")
OPTS = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--seq-len", "32",
        "--batch-size", "4", "--grad-accum", "2", "--steps", "5", "--warmup", "1",
        "--log-every", "1", "--eval-every", "5", "--eval-batches", "4", "--ckpt-every", "0",
        "--schedule", "baseline", "--device", "cpu", "--quiet"]


def env() -> dict:
    e = {k: v for k, v in os.environ.items()
         if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return dict(e, OMP_NUM_THREADS="1")


def metrics(out: Path, event: str, key: str) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if r["event"] == event]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    data = tmp / "corpus.txt"
    data.write_bytes(Path(json.__file__).read_bytes() * 4 + Path(os.__file__).read_bytes())
    common = [*OPTS, "--data", str(data), "--cache-dir", str(tmp / "cache")]
    # the one-process reference runs in this process (saves a start-up; RANK is not set here)
    args = add_train_arguments(argparse.ArgumentParser()).parse_args([*common, "-o", str(tmp / "one")])
    main(config_from_args(args))
    return tmp / "one", common


def torchrun(common: list[str], out: Path, *extra: str) -> None:
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", "2", TRAIN, *common, *extra, "-o", str(out)],
                   env=env(), check=True, stdout=subprocess.DEVNULL, timeout=300)


def assert_same_run(one: Path, two: Path) -> None:
    a, b = metrics(one, "train", "loss"), metrics(two, "train", "loss")
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4, 5]
    assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) < 1e-4
    assert a[-1][1] < a[0][1]  # it learned something in 5 steps
    va, vb = metrics(one, "eval", "val_loss"), metrics(two, "eval", "val_loss")
    assert len(va) == len(vb) == 2
    assert max(abs(x - y) for (_, x), (_, y) in zip(va, vb)) < 1e-4
    # tokens count the global batch in both runs
    ta = json.loads((one / "summary.json").read_text())["schedules"]["baseline"]["tokens"]
    tb = json.loads((two / "summary.json").read_text())["schedules"]["baseline"]["tokens"]
    assert ta == tb == 5 * 4 * 2 * 32


def test_two_process_ddp_matches_one_process_with_same_global_batch(one_process_run, tmp_path):
    one, common = one_process_run
    torchrun(common, tmp_path / "two")
    assert_same_run(one, tmp_path / "two")


def test_two_process_fsdp2_matches_one_process_and_saves_whole_weights(one_process_run, tmp_path):
    one, common = one_process_run
    torchrun(common, tmp_path / "fsdp", "--fsdp")
    assert_same_run(one, tmp_path / "fsdp")
    from vcyclefx.driver.train import load_weights
    from vcyclefx.zoo.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32))
    load_weights(model, tmp_path / "fsdp" / "baseline.safetensors")  # full, strict, unsharded
