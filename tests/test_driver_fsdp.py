"""The V-cycle under FSDP2 (torchrun, 2 processes, gloo on CPU): carried AdamW moments through
every level transition, sharded checkpoints (torch.distributed.checkpoint) resumed on another
number of processes, and the --cpu-offload checks.

One process accumulating 2 micro-batches and two processes with one each see the same global
batch (micro-batch j of step s is the same data whichever process draws it), so their losses
agree up to float summation order. The V-cycle here: 20 steps, stages of 1 (level 0), 9 (level 1,
half width and depth) and 10 (level 0) steps; the moments are carried through the coalescing
after step 1 and the de-coalescing after step 10, one parameter at a time (``--fsdp-transitions
tensor``, the default; compared with ``whole``, every rank gathering the whole level).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vcyclefx.driver.cli import add_train_arguments, config_from_args
from vcyclefx.driver.config import ConfigError, TrainConfig, check_runtime
from vcyclefx.driver.train import main
from tests.conftest import kill_after_checkpoint as kill_run

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "tools" / "train.py")
OPTS = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--seq-len", "32",
        "--batch-size", "4", "--grad-accum", "2", "--steps", "20", "--vcycle-budget", "1",
        "--warmup", "1", "--log-every", "1", "--eval-every", "10", "--eval-batches", "2",
        "--ckpt-every", "4", "--schedule", "vcycle", "--device", "cpu", "--quiet",
        "--fractions", "0.05,0.45,0.5"]  # stages end at steps 1 and 10: a long stage on each level
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "2", TRAIN]


def env() -> dict:
    e = {k: v for k, v in os.environ.items()
         if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                      "PYTHONHASHSEED")}  # each process its own hash seed, as in real runs
    return dict(e, OMP_NUM_THREADS="1")


def rows(out: Path, event: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["event"] == event]


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())["schedules"]["vcycle"]


def assert_same_run(a: Path, b: Path, tol: float = 1e-4) -> None:
    """Every training and validation loss within ``tol``, and the same steps, tokens and FLOPs."""
    ta, tb = rows(a, "train"), rows(b, "train")
    assert [r["step"] for r in ta] == [r["step"] for r in tb] == list(range(1, 21))
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(ta, tb)) < tol
    assert [(r["tokens"], r["flops"], r["level"]) for r in ta] == \
        [(r["tokens"], r["flops"], r["level"]) for r in tb]
    va, vb = rows(a, "eval"), rows(b, "eval")
    assert [r["step"] for r in va] == [r["step"] for r in vb] and len(va) >= 4
    assert max(abs(x["val_loss"] - y["val_loss"]) for x, y in zip(va, vb)) < tol
    sa, sb = summary(a), summary(b)
    assert abs(sa["final_val_loss"] - sb["final_val_loss"]) < tol
    assert sa["total_flops"] == sb["total_flops"] and sa["tokens"] == sb["tokens"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 1-process V-cycle (in this process) and the uninterrupted 2-process --fsdp one."""
    tmp = tmp_path_factory.mktemp("fsdp")
    data = tmp / "corpus.txt"
    data.write_bytes(b"".join(Path(m.__file__).read_bytes() for m in (json, os, subprocess)))
    common = [*OPTS, "--data", str(data), "--cache-dir", str(tmp / "cache")]
    args = add_train_arguments(argparse.ArgumentParser()).parse_args([*common, "-o", str(tmp / "one")])
    main(config_from_args(args))  # default: the optimizer is carried
    subprocess.run([*TORCHRUN, *common, "--fsdp", "--carry-optimizer", "-o", str(tmp / "two")],
                   env=env(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                   timeout=300)
    return tmp, common


def kill_after_checkpoint(cmd: list[str], out: Path, min_step: int) -> int:
    """Start ``cmd`` (torchrun), SIGKILL its workers and itself once a checkpoint at step >=
    ``min_step`` exists."""
    return kill_run(cmd, out, env(), min_step)


def resume_on_one_process(out: Path) -> None:
    subprocess.run([sys.executable, TRAIN, "--resume", str(out), "--quiet"], env=env(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)


def test_fsdp_with_carried_optimizer_equals_the_one_process_vcycle(runs):
    tmp, _ = runs
    assert_same_run(tmp / "one", tmp / "two")
    stages = rows(tmp / "two", "stage")
    assert [(r["level"], r["optimizer"]) for r in stages] == [(0, "fresh"), (1, "carried"),
                                                                (0, "carried")]
    assert [(r["level"], r["optimizer"]) for r in rows(tmp / "one", "stage")] == \
        [(r["level"], r["optimizer"]) for r in stages]
    from vcyclefx.driver.checkpoint import load_weights
    from vcyclefx.zoo.gpt import GPT, GPTConfig

    a, b = (GPT(GPTConfig(block_size=32, vocab_size=256, n_layer=2, n_head=2, n_embd=32))
            for _ in range(2))
    load_weights(a, tmp / "one" / "vcycle.safetensors")
    load_weights(b, tmp / "two" / "vcycle.safetensors")
    diff = max((x - y).abs().max().item() for x, y in zip(a.state_dict().values(),
                                                          b.state_dict().values()))
    assert diff < 1e-4


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process is meant
def test_sharded_checkpoint_is_per_rank_shards_and_loads_whole_without_a_process_group(runs):
    """The final checkpoint of the 2-process run: each rank wrote its own shard file (nothing
    gathered on rank 0), and it loads here, one process, no process group, into whole tensors
    equal to the run's final weights."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from vcyclefx.driver.checkpoint import latest_checkpoint, load_weights
    from vcyclefx.zoo.gpt import GPT, GPTConfig

    tmp, _ = runs
    point = latest_checkpoint(tmp / "two")
    assert point.sharded and point.state.step == 20 and not dist.is_initialized()
    files = sorted(p.name for p in (point.dir / "dcp").iterdir())
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (point.dir / "model.safetensors").exists() and not (point.dir / "optim.pt").exists()
    final, loaded = (GPT(GPTConfig(block_size=32, vocab_size=256, n_layer=2, n_head=2, n_embd=32))
                     for _ in range(2))
    load_weights(final, tmp / "two" / "vcycle.safetensors")
    state = {"model": {k: torch.zeros_like(v) for k, v in loaded.state_dict().items()}}
    dcp.load(state, checkpoint_id=point.dir / "dcp")
    for k, v in final.state_dict().items():
        assert torch.equal(state["model"][k], v), k


def test_sharded_run_killed_in_the_coarse_stage_resumes_on_one_process_with_the_same_metrics(runs):
    tmp, common = runs
    cut = tmp / "cut"
    rc = kill_after_checkpoint([*TORCHRUN, *common, "--fsdp", "-o", str(cut)], cut, min_step=4)
    assert rc == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (cut / "summary.json").exists()
    at = json.loads((cut / "ckpt" / "latest.json").read_text())["dir"]
    assert 4 <= int(at.rsplit("-", 1)[1]) < 20
    resume_on_one_process(cut)
    assert_same_run(tmp / "two", cut)
    assert len(rows(cut, "train")) == 20  # nothing logged twice, nothing missing


def test_sharded_run_killed_resumes_on_two_processes_into_its_shards_exactly(runs):
    tmp, common = runs
    cut = tmp / "cut-two"
    assert kill_after_checkpoint([*TORCHRUN, *common, "--fsdp", "-o", str(cut)], cut,
                                 min_step=8) == -signal.SIGKILL
    assert not (cut / "summary.json").exists()
    subprocess.run([*TORCHRUN, "--resume", str(cut), "--quiet"], env=env(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
    assert_same_run(tmp / "two", cut, tol=1e-6)


def test_two_process_checkpoint_at_a_stage_end_resumes_on_one_process(runs):
    """Checkpoints only at stage ends (--ckpt-every 0): killed after the coarse stage's end
    (step 10), the 1-process resume carries the moments saved in shards by 2 processes through
    the de-coalescing, and ends where the uninterrupted 2-process run does."""
    tmp, common = runs
    cut = tmp / "cut-stage-end"
    cmd = [*TORCHRUN, *common, "--fsdp", "--ckpt-every", "0", "-o", str(cut)]
    assert kill_after_checkpoint(cmd, cut, min_step=10) == -signal.SIGKILL
    assert json.loads((cut / "ckpt" / "latest.json").read_text())["dir"] == "vcycle-0000010"
    resume_on_one_process(cut)
    assert abs(summary(cut)["final_val_loss"] - summary(tmp / "two")["final_val_loss"]) < 1e-4
    assert abs(rows(cut, "train")[-1]["loss"] - rows(tmp / "two", "train")[-1]["loss"]) < 1e-4
    assert [r["optimizer"] for r in rows(cut, "stage")] == ["fresh", "carried", "carried"]


@pytest.mark.slow
def test_two_process_checkpoint_at_a_stage_end_resumes_on_two_processes_exactly(runs):
    """As above, resumed on 2 processes: the per-tensor path carries the moments of the sharded
    checkpoint (loaded into an optimizer over the coarse level's shards) through the
    de-coalescing, and the run ends exactly where the uninterrupted one does."""
    tmp, common = runs
    cut = tmp / "cut-stage-end-two"
    cmd = [*TORCHRUN, *common, "--fsdp", "--ckpt-every", "0", "-o", str(cut)]
    assert kill_after_checkpoint(cmd, cut, min_step=10) == -signal.SIGKILL
    assert json.loads((cut / "ckpt" / "latest.json").read_text())["dir"] == "vcycle-0000010"
    subprocess.run([*TORCHRUN, "--resume", str(cut), "--quiet"], env=env(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
    assert [r["loss"] for r in rows(cut, "train")] == \
        [r["loss"] for r in rows(tmp / "two", "train")]
    assert summary(cut)["final_val_loss"] == summary(tmp / "two")["final_val_loss"]


def test_per_tensor_transitions_give_the_whole_level_path_s_losses_at_every_step(runs):
    """The 2-process run above maps each transition one parameter at a time (``--fsdp-transitions
    tensor``, the default: levels on the meta device, one group gathered at a time); with
    ``--fsdp-transitions whole`` every rank gathers the whole level and its moments. The same
    ops run on the same values: every loss, validation loss, final weight and V-cycle
    checkpoint tensor is equal bit for bit."""
    from vcyclefx.store import load_tensors

    tmp, common = runs
    two, whole = tmp / "two", tmp / "whole"
    subprocess.run([*TORCHRUN, *common, "--fsdp", "--carry-optimizer", "--fsdp-transitions",
                    "whole", "-o", str(whole)], env=env(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
    assert [r["step"] for r in rows(two, "train")] == list(range(1, 21))
    assert [r["loss"] for r in rows(two, "train")] == [r["loss"] for r in rows(whole, "train")]
    assert [r["val_loss"] for r in rows(two, "eval")] == \
        [r["val_loss"] for r in rows(whole, "eval")]
    assert [r["optimizer"] for r in rows(two, "stage")] == ["fresh", "carried", "carried"]
    files = sorted(p.relative_to(two) for p in two.rglob("*.safetensors"))
    assert files == sorted(p.relative_to(whole) for p in whole.rglob("*.safetensors"))
    assert len(files) == 5  # the result; the V-cycle's stages 0, 1 (and its kept level 0), 2
    for f in files:
        a, b = load_tensors(two / f), load_tensors(whole / f)
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), f


def test_cpu_offload_on_cpu_fails_at_start_up_with_the_fix_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    args = add_train_arguments(argparse.ArgumentParser()).parse_args(
        [*OPTS, "--cpu-offload", "--fsdp", "-o", str(out)])
    with pytest.raises(ConfigError, match="--cpu-offload .* on cpu .*drop --cpu-offload"):
        main(config_from_args(args))
    assert not out.exists()
    with pytest.raises(ConfigError, match="--cpu-offload .*add --fsdp"):
        check_runtime(TrainConfig(cpu_offload=True, grad_accum=2), "cuda", 2)
    check_runtime(TrainConfig(cpu_offload=True, fsdp=True, grad_accum=2), "cuda", 2)  # allowed
