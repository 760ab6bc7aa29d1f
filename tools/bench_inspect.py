"""Benchmark: what ``inspect`` costs over the capture it cannot avoid.

In one process, alternating, several rounds: one plain ``torch.export.export`` of the model
with the dynamic batch/sequence dims vcyclefx uses (``strict=False``, torch's default FX
settings), against vcyclefx's capture (the same export with the guarded quick FX settings,
plus the level's own copies of the tensors) followed by the whole analysis (spaces, chains,
roles). Then the whole command ``vcyclefx inspect MODEL`` in fresh processes (interpreter
start, imports, building the model, capture, analysis, report). Medians; the target is a
ratio of at most 1.3.

    python tools/bench_inspect.py --repeats 5 vcyclefx.zoo:gpt2_base
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def in_process(spec: str, repeats: int) -> dict[str, list[float]]:
    import torch

    import vcyclefx as vf
    from vcyclefx.analysis.analyze import analyze
    from vcyclefx.capture.frontend import _auto_dims
    from vcyclefx.capture.specs import model_from_spec

    found = model_from_spec(spec)
    model, example = found.model, found.example
    shapes = _auto_dims(example)
    times: dict[str, list[float]] = {"export": [], "capture": [], "analysis": []}
    for _ in range(repeats):
        t = time.perf_counter()
        torch.export.export(model, example, dynamic_shapes=shapes, strict=False)
        times["export"].append(time.perf_counter() - t)
        t = time.perf_counter()
        level = vf.capture(model, example)
        times["capture"].append(time.perf_counter() - t)
        t = time.perf_counter()
        analyze(level)
        times["analysis"].append(time.perf_counter() - t)
    return times


def _command(spec: str) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vcyclefx.cli", "inspect", spec], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="vcyclefx.zoo:gpt2_base")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    times = in_process(args.model, args.repeats)
    command = [_command(args.model) for _ in range(args.repeats)]
    med = {k: statistics.median(v) for k, v in times.items()}
    both = statistics.median(c + a for c, a in zip(times["capture"], times["analysis"]))
    rows = [
        ("plain torch.export.export (same dynamic dims)", med["export"], times["export"]),
        ("vcyclefx capture", med["capture"], times["capture"]),
        ("analysis (spaces, chains, roles)", med["analysis"], times["analysis"]),
        ("capture + analysis", both, [c + a for c, a in zip(times["capture"], times["analysis"])]),
        (f"vcyclefx inspect {args.model} (fresh process)", statistics.median(command), command),
    ]
    print(f"\n{args.model}: medians of {args.repeats} runs (in-process rows alternate)")
    w = max(len(r[0]) for r in rows)
    print(f"{'step':<{w}}  {'median':>8}  {'min':>7}  {'max':>7}")
    for name, m, v in rows:
        print(f"{name:<{w}}  {m:>7.2f}s  {min(v):>6.2f}s  {max(v):>6.2f}s")
    print(f"{'ratio (capture + analysis) / plain export':<{w}}  {both / med['export']:>8.3f}")


if __name__ == "__main__":
    main()
