"""Benchmark: what the self-check (issue 30) costs on GPT-2-base (124M, float32, CPU).

Times ``vf.decoalesce(level, width=2.0)`` and ``vf.coalesce(level, width=0.5, depth=0.5)`` (whose
check is finite outputs and the round trip back through its own mapping) with the default check
and with ``check=False``
(median of --repeats runs in one process, after one warm-up of each), and the check alone: one
run of the level and one of its de-coalesced copy on the example inputs (batch 2 x 16 tokens),
outputs compared through the mapping. The table is printed last.

    python tools/bench_check.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import vcyclefx as vf  # noqa: E402
from vcyclefx import selfcheck, zoo  # noqa: E402


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model, example = zoo.gpt2_base_real()
    model.eval()
    level = vf.capture(model, example)
    checks: list[float] = []
    real = selfcheck._compare

    def counted(*a, **k):  # the time spent inside the check itself
        dt, out = timed(lambda: real(*a, **k))
        checks.append(dt)
        return out

    selfcheck._compare = counted
    rows = {}
    for check in (True, False):
        vf.decoalesce(level, width=2.0, check=check)  # warm-up
        times = []
        for _ in range(args.repeats):
            dt, _ = timed(lambda: vf.decoalesce(level, width=2.0, check=check))
            times.append(dt)
        rows[check] = statistics.median(times)
    check_alone = statistics.median(checks[1:]) if len(checks) > 1 else checks[0]
    co = {}
    for check in (True, False):
        vf.coalesce(level, width=0.5, depth=0.5, check=check)  # warm-up
        co[check] = statistics.median(
            timed(lambda: vf.coalesce(level, width=0.5, depth=0.5, check=check))[0]
            for _ in range(args.repeats))
    selfcheck._compare = real
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} after a warm-up")
    print(f"{'decoalesce(gpt2-base, width=2.0)':<40} {'seconds':>8} {'share':>7}")
    print(f"{'check=True (default)':<40} {rows[True]:8.2f} {'':>7}")
    print(f"{'check=False':<40} {rows[False]:8.2f} {'':>7}")
    print(f"{'difference':<40} {rows[True] - rows[False]:8.2f} "
          f"{(rows[True] - rows[False]) / rows[False]:7.1%}")
    print(f"{'the check alone (timed inside)':<40} {check_alone:8.2f} "
          f"{check_alone / rows[False]:7.1%}")
    print(f"{'coalesce(gpt2-base, 0.5, 0.5)':<40} {'seconds':>8} {'share':>7}")
    print(f"{'check=True (default: round trip)':<40} {co[True]:8.2f} {'':>7}")
    print(f"{'check=False':<40} {co[False]:8.2f} {'':>7}")
    print(f"{'difference':<40} {co[True] - co[False]:8.2f} "
          f"{(co[True] - co[False]) / co[False]:7.1%}")


if __name__ == "__main__":
    main()
