"""Peak memory (RSS) per rank during the V-cycle's transitions under FSDP2: ``--fsdp-transitions
whole`` (every rank gathers the whole level and its AdamW moments, and keeps the whole module of
the level beside its shard) against ``tensor`` (the levels on the meta device, one parameter's
group gathered at a time), the same run otherwise: the ``small`` preset's model (6 layers, width
384), 2 processes on the CPU (gloo), 2 steps per stage.

Each rank resets its peak RSS (``VmHWM``, via ``/proc/self/clear_refs``) after every optimizer
step and reads it before the next: the window between the last step of a stage and the first of
the next one holds the stage-end evaluation and checkpoint, the transition (weights and moments)
and the next stage's set-up. The table gives, per mode and rank, the peak of each transition
window, the peak during the steps of level 0, the peak of the start-up (before the first step:
imports, data, level 0 built, captured and planned whole, then sharded) and the RSS when the
first step starts.

    python tools/bench_fsdp_transition.py [--repeats N] [--data FILE] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
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
    return {"startup": records[0]["between_kib"], "start": records[0]["rss_before_kib"],
            "down": first[1]["between_kib"], "up": first[2]["between_kib"],
            "steps0": max(r["during_kib"] for r in records if r["stage"] in (0, 2))}


COLUMNS = (("startup", "peak, start-up"), ("start", "RSS at step 1"),
           ("down", "peak, coalesce"), ("up", "peak, de-coalesce"),
           ("steps0", "peak, level-0 steps"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="", help="text file to train on (default: the Python "
                                              "sources of json, os and subprocess)")
    p.add_argument("--out", type=Path, default=None, help="folder for the runs (default: temp)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each mode, alternating; the "
                                                          "table gives medians")
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
    got: dict[tuple[str, int], list[dict]] = {}
    losses: dict[str, list] = {}
    for i in range(args.repeats):
        for mode in MODES:
            run = out / f"{mode}-{i}"
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc_per_node", "2", __file__, "--worker", mode, "--data",
                            args.data, "--out", str(run)], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            losses.setdefault(mode, []).append([r["loss"] for r in records
                                                if r["event"] == "train"])
            for rank in (0, 1):
                got.setdefault((mode, rank), []).append(
                    summarise(json.loads((run / f"rss-rank{rank}.json").read_text())))
    same = all(x == losses["whole"][0] for runs in losses.values() for x in runs)
    print(f"losses equal at every step in every run: {same} ({len(losses['whole'][0])} steps, "
          f"{args.repeats} run(s) of each mode)")
    head = [f"{'transitions':<11}", f"{'rank':>4}", *(h for _, h in COLUMNS)]
    print("  ".join(head) + "   (MiB, median)")
    for (mode, rank), runs in got.items():
        cells = [statistics.median(r[k] for r in runs) / 1024 for k, _ in COLUMNS]
        print("  ".join([f"{mode:<11}", f"{rank:>4}",
                         *(f"{c:>{len(h)}.0f}" for c, (_, h) in zip(cells, COLUMNS))]))


if __name__ == "__main__":
    main()
