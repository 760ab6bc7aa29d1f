"""Peak memory (RSS) per rank during the V-cycle's transitions under FSDP2: ``--fsdp-transitions
whole`` (every rank gathers the whole level and its AdamW moments, and keeps the whole module of
the level beside its shard) against ``tensor`` (the levels on the meta device, one parameter's
group gathered at a time), the same run otherwise: the ``small`` preset's model (6 layers, width
384), 2 processes on the CPU (gloo), 2 steps per stage.

Each rank resets its peak RSS (``VmHWM``, via ``/proc/self/clear_refs``) after every optimizer
step and reads it before the next: the window between the last step of a stage and the first of
the next one holds the stage-end evaluation and checkpoint, the transition (weights and moments)
and the next stage's set-up. The table gives, per mode and rank, the peak of each transition
window, the peak during the steps of level 0, and the RSS when the run starts its first step.

    python tools/bench_fsdp_transition.py [--data FILE] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = ["--preset", "small", "--schedule", "vcycle", "--steps", "6", "--vcycle-budget", "1",
       "--fractions", "0.34,0.33,0.33", "--batch-size", "4", "--grad-accum", "2",
       "--eval-batches", "2", "--eval-every", "1000", "--ckpt-every", "0", "--log-every", "1",
       "--device", "cpu", "--quiet", "--fsdp"]
MODES = ("whole", "tensor")


def _kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current RSS


def worker(args) -> None:
    """One rank of one run: the driver with its optimizer step wrapped by the RSS probes."""
    import vcyclefx.driver.stage as stage
    from vcyclefx.driver.cli import add_train_arguments, config_from_args
    from vcyclefx.driver.train import main

    records = []
    step = stage._step

    def probed(rt, t, opt, state, lr, window):
        between = _kib("VmHWM")
        now = _kib("VmRSS")
        _reset_peak()
        step(rt, t, opt, state, lr, window)
        records.append(dict(stage=state.stage, stage_step=state.stage_step, between_kib=between,
                            rss_before_kib=now, during_kib=_kib("VmHWM")))
        _reset_peak()

    stage._step = probed
    parser = add_train_arguments(argparse.ArgumentParser())
    cfg = config_from_args(parser.parse_args([*RUN, "--data", args.data,
                                              "--fsdp-transitions", args.worker,
                                              "-o", str(args.out)]))
    main(cfg)
    rank = int(os.environ["RANK"])
    (args.out / f"rss-rank{rank}.json").write_text(json.dumps(records))


def summarise(records: list[dict]) -> dict:
    first = {}
    for r in records:
        first.setdefault(r["stage"], r)
    return {"start": records[0]["rss_before_kib"],
            "down": first[1]["between_kib"], "up": first[2]["between_kib"],
            "steps0": max(r["during_kib"] for r in records if r["stage"] in (0, 2))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="", help="text file to train on (default: the Python "
                                              "sources of json, os and subprocess)")
    p.add_argument("--out", type=Path, default=None, help="folder for the runs (default: temp)")
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-fsdp-"))
    out.mkdir(parents=True, exist_ok=True)
    if not args.data:
        args.data = str(out / "corpus.txt")
        Path(args.data).write_bytes(b"".join(Path(m.__file__).read_bytes()
                                             for m in (json, os, subprocess)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    rows = []
    for mode in MODES:
        run = out / mode
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", __file__, "--worker", mode, "--data", args.data,
                        "--out", str(run)], env=env, check=True, stdout=subprocess.DEVNULL)
        losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text()
                                          .splitlines()) if r["event"] == "train"]
        for rank in (0, 1):
            s = summarise(json.loads((run / f"rss-rank{rank}.json").read_text()))
            rows.append((mode, rank, s, losses))
    print(f"losses equal at every step: {rows[0][3] == rows[-1][3]} ({len(rows[0][3])} steps)")
    print(f"{'transitions':<11}  {'rank':>4}  {'RSS at step 1':>13}  {'peak, coalesce':>14}  "
          f"{'peak, decoalesce':>16}  {'peak, level-0 steps':>19}   (MiB)")
    for mode, rank, s, _ in rows:
        print(f"{mode:<11}  {rank:>4}  {s['start'] / 1024:>13.0f}  {s['down'] / 1024:>14.0f}  "
              f"{s['up'] / 1024:>16.0f}  {s['steps0'] / 1024:>19.0f}")


if __name__ == "__main__":
    main()
